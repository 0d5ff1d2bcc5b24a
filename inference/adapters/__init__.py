"""The tenant-private LoRA adapter registry (docs/parts/18-lora.md, "The registry"): safe unpacking of uploads
(archive), validation against a live worker's LoRA info (validation, run by the Celery task in tasks),
creating, resolving `"<base>:<adapter>"`, deleting and the workers' control messages (registry), and the
/v1/adapters endpoints (api). The Adapter model itself lives in inference/models.py."""
