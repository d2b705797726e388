"""Adapters: LoRA, textual inversion and DreamBooth on top of a trained model."""
