"""Ruvon's own transformer modules (not Hugging Face's), built from a ModelConfig."""
