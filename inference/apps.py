"""App config for inference: connects the adapter registry's deletion hook."""

from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Inference"

    def ready(self) -> None:
        from django.db.models.signals import post_delete

        from inference.adapters.registry import adapter_deleted
        from inference.models import Adapter

        # However a row goes (the API, the admin's bulk delete, its tenant's deletion), its files go too.
        post_delete.connect(adapter_deleted, sender=Adapter, dispatch_uid="inference.adapter_deleted")
