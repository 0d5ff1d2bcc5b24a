"""Model loading: HF directories and hub names, GGUF files, random:<shape>, the shipped assets."""
