"""Personalisation adapters: fine-tuning methods that add to a trained model (DreamBooth, ...)."""
