"""Analogon: example-based image editing backend (PIXELS, Cross-Image Attention, DIA, Difference Inversion)."""

__version__ = "0.1.0"
