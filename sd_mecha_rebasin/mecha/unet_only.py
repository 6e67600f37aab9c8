"""sd-mecha conversions between each UNet-only config of this package and its full config.

`sd_mecha.convert(model, "sd1-ldm")` then turns a UNet-only model (`model_configs/unet_only.py`:
LDM names without `model.diffusion_model.`, SD1/SD2 diffusers names) into the full config's UNet
keys and back, and chains through the full config between two UNet-only layouts (sd-mecha ships
the SDXL diffusers <-> sdxl-sgm pair itself). The merge commands use them to merge a full
checkpoint with a UNet-only one; a conversion only renames keys, tensors pass through untouched.
"""

# No `from __future__ import annotations`: sd-mecha evaluates the Parameter annotations at runtime.
from sd_mecha import Parameter, Return, StateDict, merge_method
from sd_mecha.extensions import model_configs
from torch import Tensor

from ..model_configs import register_model_configs
from ..model_configs.unet_only import UNET_ONLY_LAYOUTS, UnetOnlyLayout, ldm_names


def _conversion(source, target, names: dict[str, str]) -> None:
    """Register sd-mecha's conversion `source` -> `target` config; `names` maps each target key to
    the source key it is read from (tensors pass through untouched)."""

    @merge_method(
        identifier=f"convert_'{source.identifier}'_to_'{target.identifier}'",
        is_conversion=True,
        reuse_outputs=False,
    )
    class rename:
        @staticmethod
        def map_keys(b):
            for name, source_name in names.items():
                b[name] = b.keys[source_name]

        def __call__(self, model: Parameter(StateDict[Tensor], model_config=source), **kwargs) -> Return(
            Tensor, model_config=target
        ):
            return model[names[kwargs["key"]]]


def _register(layout: UnetOnlyLayout) -> None:
    own = model_configs.resolve(layout.identifier)
    full = model_configs.resolve(layout.full)
    to_full = ldm_names(layout.identifier)  # own key -> full config's key
    _conversion(own, full, {ldm: name for name, ldm in to_full.items()})
    _conversion(full, own, to_full)


def register_conversions() -> None:
    """Register both conversions of every UNet-only config this package ships (once)."""
    register_model_configs()
    for layout in UNET_ONLY_LAYOUTS.values():
        if layout.ours:
            _register(layout)


register_conversions()
