"""Adapters on a model's weights: LoRA files (kohya, diffusers/peft), merging, extraction."""
