"""fluxtrt: FLUX.1-Kontext image edits as deployable inference engines.

Importing the package is cheap: torch, diffusers and transformers are imported only by the modules that need them.
"""

__version__ = "0.1.0"
