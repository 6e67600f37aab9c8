"""Model configs this package ships for sd-mecha: ``sd2-ldm`` and the UNet-only layouts (``unet_only.py``).

sd-mecha 1.1.8 has no entry points for configs: its builtin YAML configs are registered on import by
``sd_mecha.extensions.builtin.model_configs`` with ``model_configs.register(YamlModelConfig(path))``.
:func:`register_model_configs` does the same for every ``*.yaml`` next to this file. The identifier of a
``YamlModelConfig`` is the file's stem, and the YAML itself is parsed lazily on first use.
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from sd_mecha.extensions import model_configs as _mecha_model_configs

YAML_DIRECTORY = pathlib.Path(__file__).resolve().parent

_lock = threading.Lock()
_registered: list[str] = []


def yaml_paths() -> list[pathlib.Path]:
    """The YAML config files shipped in this folder, sorted by name."""
    return sorted(YAML_DIRECTORY.glob("*.yaml"))


def _is_ours(config: object, path: pathlib.Path) -> bool:
    other = getattr(config, "yaml_config_file", None)
    if other is None:
        return False
    try:
        return pathlib.Path(other).resolve() == path
    except OSError:
        return False


def register_model_configs() -> list[str]:
    """Register every YAML config of this folder with sd-mecha; safe to call any number of times.

    An identifier that is already registered from the same file is left alone. An identifier registered
    by anything else (a builtin of a newer sd-mecha, another plugin) is never overwritten: a RuntimeError
    says which one clashes. Returns the identifiers this package provides.
    """
    identifiers = []
    with _lock:
        for path in yaml_paths():
            config = _mecha_model_configs.YamlModelConfig(path)
            identifier = config.identifier
            try:
                existing = _mecha_model_configs.resolve(identifier)
            except KeyError:
                existing = None
            if existing is None:
                _mecha_model_configs.register(config)
            elif not _is_ours(existing, path):
                raise RuntimeError(
                    f"sd-mecha already has a model config '{identifier}' ({existing!r}, "
                    f"from {getattr(existing, 'yaml_config_file', type(existing).__module__)}); "
                    f"sd_mecha_rebasin will not replace it with {path}. "
                    "Your sd-mecha may be newer than this package supports (sd-mecha>=1.1.6,<1.2)."
                )
            identifiers.append(identifier)
        _registered[:] = identifiers
    return identifiers


def resolve(config: Any) -> Any:
    """sd-mecha's `ModelConfig` for an identifier (this package's configs registered first); a
    config object is returned as it is. KeyError (sd-mecha's) for an unknown identifier.

    Every layer below `mecha` reaches sd-mecha's config registry through this function only.
    """
    if not isinstance(config, str):
        return config
    if not _registered:  # once per process: a full check of the registry costs a YAML read per config
        register_model_configs()
    return _mecha_model_configs.resolve(config)


def sd1_or_sd2_from_shapes(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Tell an SD1 from an SD2 LDM checkpoint by tensor shapes (e.g. a safetensors header).

    sd-mecha detects configs by key names only and breaks ties in favour of the identifier that sorts
    last, so a file whose keys are common to sd1-ldm and sd2-ldm (a UNet-only or UNet+VAE file) is taken
    for ``sd2-ldm`` once it is registered. The cross-attention input width settles it: 768 (CLIP ViT-L)
    for SD1, 1024 (OpenCLIP ViT-H) for SD2. Returns None when there is no cross-attention key.
    """
    for key, shape in shapes.items():
        if (
            key.startswith("model.diffusion_model.")
            and key.endswith(".attn2.to_k.weight")
            and len(shape) == 2
        ):
            return {768: "sd1-ldm", 1024: "sd2-ldm"}.get(int(shape[1]))
    return None


__all__ = ["YAML_DIRECTORY", "register_model_configs", "resolve", "sd1_or_sd2_from_shapes", "yaml_paths"]
