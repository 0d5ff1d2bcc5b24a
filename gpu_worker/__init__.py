"""Ruvon's inference engine and GPU worker: importable and testable without Django."""
