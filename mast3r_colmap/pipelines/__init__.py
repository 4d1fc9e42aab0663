"""Pipelines that only compose the library's stages (e.g. :mod:`.aachen`), runnable with ``python -m``."""
