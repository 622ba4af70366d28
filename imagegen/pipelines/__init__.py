"""Diffusers backends: named presets, loading, and batched rendering."""
