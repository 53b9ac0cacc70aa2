from django.db import migrations, models

PRIORITIES = [(1, "high"), (2, "medium"), (3, "low"), (4, "deferred")]


class Migration(migrations.Migration):
    """Priorities become small integers ("1" → 1 and so on)."""

    dependencies = [("mailer", "0003_messagelog_message_id")]

    operations = [
        migrations.AlterField(
            "message", "priority", models.PositiveSmallIntegerField(choices=PRIORITIES, default=2)
        ),
        migrations.AlterField(
            "messagelog", "priority", models.PositiveSmallIntegerField(choices=PRIORITIES)
        ),
        migrations.AlterField(
            "messagelog",
            "priority",
            models.PositiveSmallIntegerField(choices=PRIORITIES, db_index=True),
        ),
    ]
