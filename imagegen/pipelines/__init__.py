"""Diffusers backends: named presets, model files, loading, batched rendering, and the conditioning
protocol through which identity reaches a pipeline (``conditioning.py``; nothing here imports identity)."""
