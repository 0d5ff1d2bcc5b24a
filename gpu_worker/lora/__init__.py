"""LoRA: PEFT adapters read and checked (format), merged at load, or served many at once from stacked slots."""
