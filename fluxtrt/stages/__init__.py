"""The PyTorch stages of DESIGN 4: named, composable configurations applied to one loaded model.

Importing this package is light; ``fluxtrt.stages.apply`` (torch) applies a stage and returns runners.
"""

from fluxtrt.stages.config import DEFAULT_FBC_THRESHOLD, STAGES, StageConfig, stage_config

__all__ = ["DEFAULT_FBC_THRESHOLD", "STAGES", "StageConfig", "stage_config"]
