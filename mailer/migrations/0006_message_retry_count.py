from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("mailer", "0005_id_bigautofield")]

    operations = [
        migrations.AddField("message", "retry_count", models.IntegerField(default=0)),
    ]
