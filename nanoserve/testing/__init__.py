"""Offline test fixtures: tiny random-weight Hugging Face checkpoints and a transformers reference."""
