"""Declarative component specs (DESIGN 1): names, symbolic shapes, dtypes, profiles, sample inputs, tolerances."""

from fluxtrt.specs.component import ComponentSpec, TensorSpec, Tolerance
from fluxtrt.specs.flux import COMPONENTS, FluxDims, Resolution, component_specs, dim_values

__all__ = [
    "COMPONENTS",
    "ComponentSpec",
    "FluxDims",
    "Resolution",
    "TensorSpec",
    "Tolerance",
    "component_specs",
    "dim_values",
]
