"""``fluxtrt compare``: PyTorch stages and engine pipelines on identical inputs -> timing and fidelity report.

Importing this package is light; ``fluxtrt.bench.compare`` (torch) runs a comparison.
"""

from fluxtrt.bench.config import CompareConfig

__all__ = ["CompareConfig"]
