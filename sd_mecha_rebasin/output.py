"""Writing results: safetensors under a temporary name, renamed into place when complete, with metadata.

A failure or Ctrl-C leaves no half-written file: the data goes to a hidden temporary file in the
output directory (same file system, so the final rename is atomic) that is removed on any error.

Metadata (all values are strings, as safetensors requires):
- `mecha_recipe`: sd-mecha's serialized recipe, with model paths reduced to file names;
- `sd_merge_recipe` / `sd_merge_models`: the AUTOMATIC1111 merge-record convention (JSON), models
  identified by file name and sha256 of the whole file, never by full path; the inputs' own records
  are carried over so a merge of merges keeps its history;
- `modelspec.*`: the Stability AI model metadata standard (architecture, title, date, merged_from...).
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import pathlib
import secrets
import threading
from collections.abc import Mapping
from typing import Any

import torch

from .checkpoint import Checkpoint, UserError

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPE_NAMES[getattr(torch, _attr)] = _name

ARCHITECTURES = {
    "sd1-ldm": ("stable-diffusion-v1", "https://github.com/CompVis/stable-diffusion", "512x512", "epsilon"),
    "sd2-ldm": (
        "stable-diffusion-v2-768-v",
        "https://github.com/Stability-AI/stablediffusion",
        "768x768",
        "v",
    ),
    "sdxl-sgm": (
        "stable-diffusion-xl-v1-base",
        "https://github.com/Stability-AI/generative-models",
        "1024x1024",
        "epsilon",
    ),
}
"""config -> (modelspec architecture, implementation, resolution, prediction type) used when the
reference model's own modelspec does not say (SD2 defaults to 2.x-768-v, the base of most SD2 fine-tunes)."""

_ARCH_PREFIX = {
    "sd1-ldm": "stable-diffusion-v1",
    "sd2-ldm": "stable-diffusion-v2",
    "sdxl-sgm": "stable-diffusion-xl-v1",
}


PACKAGE = "sd-mecha-rebasin"


class AtomicOutput:
    """A destination file written under a temporary name and renamed into place by `commit`.

    Creating it checks everything about the destination that can fail early: the path is not a
    directory, exists only with `overwrite`, and its directory exists and is writable (the temporary
    file is created right away).
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, suffix: str = ".safetensors"):
        self.path = pathlib.Path(path)
        self.overwrite = overwrite
        if suffix and self.path.suffix.lower() != suffix:
            raise UserError(f"the output must be a {suffix} file", self.path, exit_code=2)
        if self.path.is_dir():
            raise UserError("is a directory; give a file name", self.path)
        if self.path.exists() and not overwrite:
            raise UserError("already exists; pass --overwrite to replace it", self.path)
        directory = self.path.parent
        if not directory.is_dir():
            raise UserError("output directory does not exist", directory)
        self.tmp = directory / f".{self.path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise UserError(f"output directory is not writable ({e.strerror or e})", directory) from None
        os.close(fd)
        self._done = False

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def abort(self) -> None:
        """Remove the temporary file (idempotent)."""
        self._done = True
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass

    def commit(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> int:
        """Write the file and move it into place; returns its size in bytes."""
        try:
            size = write_safetensors(self.tmp, tensors, metadata)
            self._move_into_place()
        except OSError as e:
            self.abort()
            if e.errno == errno.ENOSPC:
                raise UserError("no space left on the device while writing", self.path) from None
            raise UserError(f"cannot write: {e.strerror or e}", self.path) from None
        except BaseException:
            self.abort()
            raise
        self._done = True
        return size

    def commit_text(self, text: str) -> None:
        """Write a text file (a recipe) and move it into place."""
        try:
            with open(self.tmp, "w", encoding="utf-8") as f:
                f.write(text)
            self._move_into_place()
        except OSError as e:
            self.abort()
            raise UserError(f"cannot write: {e.strerror or e}", self.path) from None
        except BaseException:
            self.abort()
            raise
        self._done = True

    def _move_into_place(self) -> None:
        if self.overwrite:
            os.replace(self.tmp, self.path)
            return
        try:  # no-clobber rename: fails if someone created the destination meanwhile
            os.link(self.tmp, self.path)
        except FileExistsError:
            raise UserError("already exists; pass --overwrite to replace it", self.path) from None
        except OSError:  # file systems without hard links
            if self.path.exists():
                raise UserError("already exists; pass --overwrite to replace it", self.path) from None
            os.replace(self.tmp, self.path)
            return
        self.tmp.unlink()


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> int:
    """Write a safetensors file one tensor at a time (no second copy of the data); returns its size."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{key}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        header[key] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


# --------------------------------------------------------------------------------------------
# Metadata


def sha256_file(path: str | os.PathLike, chunk: int = 16 << 20, stop: threading.Event | None = None) -> str:
    """sha256 of the whole file (as AUTOMATIC1111 and civitai show it); `stop` cancels between chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if stop is not None and stop.is_set():
                raise InterruptedError("hashing cancelled")
            h.update(block)
    return h.hexdigest()


def legacy_hash(path: str | os.PathLike) -> str:
    """The AUTOMATIC1111 "legacy" model hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]


def anonymize_recipe(recipe: str, names: Mapping[str, str]) -> str:
    """A serialized sd-mecha recipe with every model path in `names` (full path -> file name) replaced."""

    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for line in recipe.split("\n"):
        if line.startswith("model "):
            for full, name in names.items():
                line = line.replace(f"model {quoted(full)}", f"model {quoted(name)}", 1)
        lines.append(line)
    return "\n".join(lines)


def _input_record(ckpt: Checkpoint, sha256: str | None, legacy: str | None) -> dict[str, Any]:
    recipe = ckpt.metadata.get("sd_merge_recipe")
    try:
        recipe = json.loads(recipe) if recipe else None
    except json.JSONDecodeError:
        pass
    return {"name": ckpt.name, "legacy_hash": legacy, "sd_merge_recipe": recipe}


def _inherited_models(ckpt: Checkpoint) -> dict[str, Any]:
    try:
        models = json.loads(ckpt.metadata.get("sd_merge_models", "") or "{}")
    except json.JSONDecodeError:
        return {}
    return models if isinstance(models, dict) else {}


def modelspec(
    config: str,
    reference: Checkpoint,
    title: str,
    *,
    merged_from: list[str] | None,
    description: str,
    prediction_type: str | None = None,
) -> dict[str, str]:
    """`modelspec.*` keys; architecture, resolution and prediction type follow the reference model's
    own modelspec when it has one of the same family, else the family's default."""
    arch, impl, resolution, prediction = ARCHITECTURES[config]
    theirs = reference.metadata
    their_arch = str(theirs.get("modelspec.architecture", ""))
    if their_arch.startswith(_ARCH_PREFIX[config]) and "/" not in their_arch:  # not ".../lora" etc.
        arch = theirs["modelspec.architecture"]
        impl = theirs.get("modelspec.implementation", impl)
        resolution = theirs.get("modelspec.resolution", resolution)
        prediction = theirs.get("modelspec.prediction_type", prediction)
    elif config == "sd2-ldm":
        arch, resolution = "stable-diffusion-v2-768-v", "768x768"
    prediction = prediction_type or prediction
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.prediction_type": prediction,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "modelspec.description": description,
    }
    if merged_from:
        spec["modelspec.merged_from"] = ", ".join(merged_from)
    return spec


def build_metadata(
    *,
    mode: str,
    config: str,
    a: Checkpoint,
    b: Checkpoint,
    hashes: Mapping[str, tuple[str, str]],
    output: pathlib.Path,
    mecha_recipe: str | None,
    params: Mapping[str, Any],
    prediction_type: str | None = None,
) -> dict[str, str]:
    """Metadata of a merge (`mode="merge"`: A + alpha * pi(B)), an alignment (`mode="align"`: pi(B))
    or a plain weighted sum (`mode="average"`).

    `hashes` maps each input's file name to (sha256, legacy hash).
    """
    try:
        from importlib.metadata import version

        pkg_version = version("sd-mecha-rebasin")
    except Exception:  # noqa: BLE001 - metadata is best effort
        pkg_version = "unknown"
    sha_a, legacy_a = hashes.get(a.name, (None, None))
    sha_b, legacy_b = hashes.get(b.name, (None, None))
    method, interp = {
        "merge": ("weighted_sum(A, git_rebasin(B, A))", "Git Re-Basin"),
        "align": ("git_rebasin(B, A)", "Git Re-Basin alignment (no merge)"),
        "average": ("weighted_sum(A, B)", "Weighted sum (no re-basin)"),
    }[mode]
    recipe: dict[str, Any] = {
        "type": "sd-mecha-rebasin",
        "version": pkg_version,
        "method": method,
        "primary_model_hash": sha_a,
        "secondary_model_hash": sha_b,
        "tertiary_model_hash": None,
        "interp_method": interp,
        **dict(params),
    }
    models: dict[str, Any] = {}
    for ckpt in (a, b):
        models.update(_inherited_models(ckpt))
    if sha_a:
        models[sha_a] = _input_record(a, sha_a, legacy_a)
    if sha_b:
        models[sha_b] = _input_record(b, sha_b, legacy_b)
    alpha = params.get("alpha")
    if isinstance(alpha, Mapping):  # per-block weights: sd_merge_recipe lists them
        alpha = "alpha[block]"
    if mode == "merge":
        description = (
            f"Git Re-Basin merge by {PACKAGE} {pkg_version}: "
            f"(1 - {alpha}) * {a.name} + {alpha} * pi({b.name}), pi aligning {b.name} to {a.name}"
        )
    elif mode == "average":
        description = (
            f"Weighted sum by {PACKAGE} {pkg_version}: (1 - {alpha}) * {a.name} + {alpha} * {b.name}"
        )
    else:
        description = (
            f"{b.name} permuted into the basis of {a.name} by Git Re-Basin ({PACKAGE} {pkg_version}); "
            f"same function as {b.name}"
        )
    merged_from = None if mode == "align" else [a.name, b.name]
    reference = b if mode == "align" else a
    meta: dict[str, str] = {}
    if mecha_recipe:
        meta["mecha_recipe"] = mecha_recipe
    meta["sd_merge_recipe"] = json.dumps(recipe)
    meta["sd_merge_models"] = json.dumps(models)
    meta.update(
        modelspec(
            config,
            reference,
            output.stem,
            merged_from=merged_from,
            description=description,
            prediction_type=prediction_type,
        )
    )
    return meta
