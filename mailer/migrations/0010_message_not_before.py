from django.db import migrations, models


class Migration(migrations.Migration):
    """One "not before" time per message: scheduled sending and automatic retries.

    Nullable without a default, so a django-mailer 2.3.2 worker running
    against the same database during a rolling upgrade keeps inserting and
    sending (it ignores the column).
    """

    dependencies = [
        ("mailer", "0009_attachment_bundle"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="not_before",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(fields=["not_before"], name="mailer_msg_not_before"),
        ),
    ]
