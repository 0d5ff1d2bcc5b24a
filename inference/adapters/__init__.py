"""The tenant-private LoRA adapter registry: uploads (archive), validation (a Celery task), resolving
`"<base>:<adapter>"` in requests, deletion and the workers' control messages (registry), the /v1/adapters
endpoints (api). The Adapter model itself lives in inference/models.py."""
