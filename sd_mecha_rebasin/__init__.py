"""Exact Git Re-Basin for Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL), as an sd-mecha merge method.

Importing the package registers the `sd2-ldm` model config with sd-mecha, the `git_rebasin` merge
method, and its implementations of sd-mecha's `rebasin` interface for sd1-ldm, sd2-ldm and sdxl-sgm
(`mecha.interface`), so that `sd_mecha.rebasin(a, ref)` is exact for SD1, SD2 and SDXL, and the
conversion of SD1 block weights to sd2-ldm keys (`mecha.blocks`).

The folders are the layers, lowest first: `common`, `model_configs`, `permutations`,
`architectures`, `search`, `files`, `mecha`, `cli`; a module imports only from its own layer or
below (tests/test_layers.py).
"""

from .architectures import permutation_spec
from .files.quantized import register_sd_mecha_formats
from .mecha.input_channels import fill_input_channels
from .mecha.merge_method import rebasin
from .mecha.merge_method_many import rebasin_many
from .model_configs import register_model_configs
from .permutations.spec import Permutations, PermutationSpec, apply_permutation, random_permutation
from .search.many import ManyResult, ModelStep, PassStats, SumRebuild, merge_many, merged_tensors
from .search.matching import MatchResult, SweepStats, weight_matching

register_model_configs()
register_sd_mecha_formats()  # sd-mecha reads GGUF and fp8 scaled files dequantized (files/quantized.py)

from .mecha import blocks, interface  # noqa: E402, F401  (register on import; need the sd2-ldm config above)

__all__ = [
    "ManyResult",
    "MatchResult",
    "ModelStep",
    "PassStats",
    "SumRebuild",
    "PermutationSpec",
    "Permutations",
    "SweepStats",
    "apply_permutation",
    "fill_input_channels",
    "merge_many",
    "merged_tensors",
    "permutation_spec",
    "random_permutation",
    "rebasin",
    "rebasin_many",
    "register_model_configs",
    "weight_matching",
]
