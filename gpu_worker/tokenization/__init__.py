"""Text <-> token ids: BPE tokenizers, chat templates, incremental detokenising and stop strings."""
