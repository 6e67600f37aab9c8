"""Exact Git Re-Basin for Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL), as an sd-mecha merge method.

Importing the package registers the `sd2-ldm` model config with sd-mecha, model formats that read
pickles, GGUF, fp8 scaled files and other tools' key layouts (`files.sd_mecha_formats`), the
`git_rebasin` merge method, and its implementations of sd-mecha's `rebasin` interface for sd1-ldm,
sd2-ldm and sdxl-sgm (`mecha.interface`), so that `sd_mecha.rebasin(a, ref)` is exact for SD1, SD2
and SDXL, and the conversion of SD1 block weights to sd2-ldm keys (`mecha.blocks`).

The folders are the layers, lowest first: `common`, `model_configs`, `permutations`,
`architectures`, `search`, `files`, `mecha`, `cli`, `comfyui`; a module imports only from its own layer or
below (tests/test_layers.py).

Started as the `sd-rebasin` command line, Ctrl-C during this import (seconds: torch, sd-mecha) ends
it with one line and exit code 130 (`common.launch`); the guard is set before any heavy import. The
console script stops this import after the guard and finishes it when a command runs, so that
`sd-rebasin --help` and usage errors need neither torch nor sd-mecha (`common.launch.finish_import`).
"""

from .common import launch as _launch
from .common import testhooks as _testhooks

_launch.guard_start()

if not _launch.import_deferred():  # the console script imports the rest when a command runs
    from .architectures import permutation_spec
    from .common import sd_mecha_compat  # noqa: F401  (torch and sd-mecha: after the guard; first, patches <1.1.8)

    _testhooks.pause("importing")

    from .files import sd_mecha_formats as _sd_mecha_formats
    from .mecha.input_channels import fill_input_channels
    from .mecha.merge_method import rebasin
    from .mecha.merge_method_many import rebasin_many
    from .model_configs import register_model_configs
    from .permutations.spec import (
        Permutations,
        PermutationSpec,
        apply_permutation,
        random_permutation,
    )
    from .search.many import ManyResult, ModelStep, PassStats, SumRebuild, merge_many, merged_tensors
    from .search.matching import MatchResult, SweepStats, weight_matching

    register_model_configs()
    _sd_mecha_formats.register()  # sd-mecha reads pickles, GGUF, fp8 scaled files and other tools' key layouts

    from .mecha import blocks, interface, unet_only  # noqa: F401  (register on import; need the configs above)

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
