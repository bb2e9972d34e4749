"""Bundled trained reference models (``invardiff models``): load them with ``invardiff.models.load(name)``."""

from .registry import MODELS, UNBUNDLED, BundledModel, get, load
