import django.utils.timezone
from django.db import migrations, models

PRIORITY_CHARS = [("1", "high"), ("2", "medium"), ("3", "low"), ("4", "deferred")]
RESULTS = [("1", "success"), ("2", "don't send"), ("3", "failure")]


def auto_id():
    return models.AutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")


class Migration(migrations.Migration):
    initial = True
    dependencies = []

    operations = [
        migrations.CreateModel(
            name="DontSendEntry",
            fields=[
                ("id", auto_id()),
                ("to_address", models.EmailField(max_length=254)),
                ("when_added", models.DateTimeField()),
            ],
            options={
                "verbose_name": "don't send entry",
                "verbose_name_plural": "don't send entries",
            },
        ),
        migrations.CreateModel(
            name="Message",
            fields=[
                ("id", auto_id()),
                ("message_data", models.TextField()),
                ("when_added", models.DateTimeField(default=django.utils.timezone.now)),
                ("priority", models.CharField(choices=PRIORITY_CHARS, default="2", max_length=1)),
            ],
            options={"verbose_name": "message", "verbose_name_plural": "messages"},
        ),
        migrations.CreateModel(
            name="MessageLog",
            fields=[
                ("id", auto_id()),
                ("message_data", models.TextField()),
                ("when_added", models.DateTimeField(db_index=True)),
                ("priority", models.CharField(choices=PRIORITY_CHARS, db_index=True, max_length=1)),
                ("when_attempted", models.DateTimeField(default=django.utils.timezone.now)),
                ("result", models.CharField(choices=RESULTS, max_length=1)),
                ("log_message", models.TextField()),
            ],
            options={"verbose_name": "message log", "verbose_name_plural": "message logs"},
        ),
    ]
