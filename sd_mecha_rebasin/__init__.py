"""Exact Git Re-Basin for Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL), as an sd-mecha merge method.

Importing the package registers the `sd2-ldm` model config with sd-mecha.
"""

from .architectures import permutation_spec
from .many import ManyResult, ModelStep, PassStats, merge_many, merged_tensors
from .matching import MatchResult, SweepStats, weight_matching
from .merge_method import rebasin
from .model_configs import register_model_configs
from .spec import Permutations, PermutationSpec, apply_permutation, random_permutation

register_model_configs()

__all__ = [
    "ManyResult",
    "MatchResult",
    "ModelStep",
    "PassStats",
    "PermutationSpec",
    "Permutations",
    "SweepStats",
    "apply_permutation",
    "merge_many",
    "merged_tensors",
    "permutation_spec",
    "random_permutation",
    "rebasin",
    "register_model_configs",
    "weight_matching",
]
