"""Adapters that personalise a model: textual-inversion embeddings, LoRA."""
