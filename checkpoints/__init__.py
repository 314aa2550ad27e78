"""Checkpoint conversion and the local checkpoint store (``checkpoints/store/``)."""
