"""Imports every built-in architecture module so that its ``@register_model`` runs."""

from . import backbones  # noqa: F401  "fpn": the single-scale baseline
