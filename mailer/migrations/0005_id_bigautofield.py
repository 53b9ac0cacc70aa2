from django.db import migrations, models


def big_id():
    return models.BigAutoField(
        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
    )


class Migration(migrations.Migration):
    dependencies = [("mailer", "0004_auto_20190920_1512")]

    operations = [
        migrations.AlterField(model, "id", big_id())
        for model in ("dontsendentry", "message", "messagelog")
    ]
