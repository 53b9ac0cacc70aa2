from django.db import migrations, models


class Migration(migrations.Migration):
    """MAILER_EMAIL_LOG_MESSAGE_DATA = False stores no content in the log."""

    dependencies = [("mailer", "0006_message_retry_count")]

    operations = [
        migrations.AlterField("messagelog", "message_data", models.TextField(null=True)),
    ]
