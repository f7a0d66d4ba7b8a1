"""Model sources: a diffusers-format checkpoint directory, the seeded tiny model, full-size random weights."""

from fluxtrt.models.loading import load_components

__all__ = ["load_components"]
