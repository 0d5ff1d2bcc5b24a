"""The engine: LLMEngine (add, abort, step), the one scheduler, the paged-KV block manager, cost attribution."""
