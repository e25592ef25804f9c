"""Flax CLIP encoders (`clip`) and strict Hugging Face checkpoint conversion (`convert`)."""
