"""Preference learning from picks: datasets built from the store, LoRA training, gates."""
