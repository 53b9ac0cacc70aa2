from django.db import migrations, models


class Migration(migrations.Migration):
    """Databases created before Django 1.7 may hold a 75-character column."""

    dependencies = [("mailer", "0001_initial")]

    operations = [
        migrations.AlterField("dontsendentry", "to_address", models.EmailField(max_length=254)),
    ]
