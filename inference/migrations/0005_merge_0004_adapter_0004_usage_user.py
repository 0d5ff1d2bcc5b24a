"""Joins the two 0004 migrations (the adapter registry and the usage record's `user`); changes nothing."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0004_adapter"),
        ("inference", "0004_usage_user"),
    ]

    operations: list[migrations.operations.base.Operation] = []
