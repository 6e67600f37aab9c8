"""Writing results: safetensors under a temporary name, renamed into place when complete, with metadata.

A failure or Ctrl-C leaves no half-written file: the data goes to a hidden partial file in the
output directory (same file system, so the final rename is atomic) that is removed on any error;
one that `kill -9` leaves is named for what it is and removed by the next run into that folder.

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
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..common import testhooks
from ..common.errors import UserError
from ..model_configs.unet_only import full_config
from . import safetensors_file
from .checkpoint import Checkpoint

_DTYPE_NAMES = {dtype: name for name, dtype in safetensors_file.DTYPES.items()}
"""torch dtype -> safetensors dtype name: the reader's table, inverted (one table for both ways)."""

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


PARTIAL_MARK = ".sd-rebasin-partial-"
"""A file being written is `.<name>.sd-rebasin-partial-<pid>` beside its target (`<pid>`: the
writing process), so a file that `kill -9` or a power cut leaves behind says what it is and whose."""


def partial_path(target: pathlib.Path, pid: int | None = None) -> pathlib.Path:
    """Where `target` is written before it is renamed into place."""
    return target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid() if pid is None else pid}"


def _writer_is_gone(path: pathlib.Path, pid: int) -> bool:
    """True when no running process can be writing `path`: `pid` is free, or belongs to a process
    started after the file was last written (the pid was reused)."""
    import psutil

    try:
        started = psutil.Process(pid).create_time()
        modified = path.stat().st_mtime
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, OSError):  # not ours to judge (access denied, file already gone)
        return False
    return started > modified + 1.0  # create_time is rounded; a writer starts before its file


def remove_stale_partials(directory: pathlib.Path) -> list[pathlib.Path]:
    """Remove partial files of this tool in `directory` whose writing process is gone; returns them.

    Only names of this tool's own pattern (`.*.sd-rebasin-partial-<pid>`) are touched, and only
    when that process no longer runs: a merge still writing into the same folder keeps its file.
    """
    removed = []
    for path in sorted(directory.glob(f".*{PARTIAL_MARK}*")):
        pid = path.name.rpartition(PARTIAL_MARK)[2]
        if not pid.isdigit() or int(pid) == os.getpid() or not _writer_is_gone(path, int(pid)):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # another run cleaned it up first
            continue
        except OSError:
            continue  # not ours to remove (permissions): left as it is
        removed.append(path)
    return removed


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _size(n: int) -> str:
    """Bytes for people: "37.3 MB", "2.13 GB"."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


class AtomicOutput:
    """A destination file written under a partial name and renamed into place by `commit`.

    Creating it checks everything about the destination that can fail early: the path is not a
    directory, exists only with `overwrite`, and its directory exists and is writable (the partial
    file is created right away). It also removes partial files that killed runs left in the
    directory (`removed_stale` lists them). At any moment, the target holds nothing or a complete
    file (the previous one, with `overwrite`, until the rename). Errors are `UserError`s naming the
    directory for a full disk or a read-only folder, the file otherwise.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, suffix: str = ".safetensors"):
        self.path = pathlib.Path(path)
        self.overwrite = overwrite
        self._done = True  # nothing to clean up until the partial file exists
        if suffix and self.path.suffix.lower() != suffix:
            raise UserError(f"the output must be a {suffix} file", self.path, exit_code=2)
        if self.path.is_dir():
            raise UserError("is a directory; give a file name", self.path)
        if self.path.exists() and not overwrite:
            raise UserError("already exists; pass --overwrite to replace it", self.path)
        self.directory = self.path.parent
        if not self.directory.is_dir():
            raise UserError("output directory does not exist", self.directory)
        self.removed_stale = remove_stale_partials(self.directory)
        self.tmp = partial_path(self.path)
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise UserError("is already being written by this process", self.path) from None
        except OSError as e:
            raise self._error(e, "create") from None
        os.close(fd)
        self._done = False

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def check_free_space(self, expected_bytes: int) -> None:
        """UserError naming the directory when its file system has less free space than
        `expected_bytes` (the output's estimated size); nothing when the free space is unknown."""
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return
        if free < expected_bytes:
            raise UserError(
                f"not enough free space for {self.path.name}: it needs about {_size(expected_bytes)}, "
                f"{_size(free)} free",
                self.directory,
            )

    def abort(self) -> None:
        """Remove the partial file (idempotent)."""
        self._done = True
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass

    def _error(self, e: OSError, doing: str) -> UserError:
        """One line for an OSError while creating or writing the output."""
        if e.errno in _FULL:
            return UserError(f"no space left on the device (writing {self.path.name})", self.directory)
        if e.errno in _NOT_WRITABLE:
            why = "read-only file system" if e.errno == errno.EROFS else (e.strerror or str(e))
            return UserError(f"output directory is not writable ({why})", self.directory)
        return UserError(f"cannot {doing}: {e.strerror or e}", self.path)

    def commit(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Write the file and move it into place; returns its size in bytes.

        `on_progress(bytes written, total bytes)` is called after the header and after each tensor.
        """
        try:
            size = write_safetensors(self.tmp, tensors, metadata, on_progress)
            testhooks.pause("written")
            self._move_into_place()
        except OSError as e:
            self.abort()
            raise self._error(e, "write") from None
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
            raise self._error(e, "write") from None
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
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write a safetensors file one tensor at a time (no second copy of the data); returns its size
    in bytes. `on_progress(bytes written, total bytes)` follows the header and each tensor."""
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
    total = 8 + len(raw) + offset
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        done = 8 + len(raw)
        if on_progress is not None:
            on_progress(done, total)
        for i, t in enumerate(tensors.values()):
            if t.numel():
                data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                done += data.nbytes
            if on_progress is not None:
                on_progress(done, total)
            if i == 0 and testhooks.active():
                f.flush()
                testhooks.pause("writing")  # a test kills the process here: a half-written file
        f.flush()
        os.fsync(f.fileno())
    return total


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


def _json_value(text: str | None) -> Any:
    """An input's metadata JSON as a value to nest in ours, or None where it cannot be nested.

    Metadata is whatever an earlier tool wrote: invalid JSON, or JSON nested so deeply that
    parsing or re-serialising it exhausts the recursion limit, is dropped, never an error.
    """
    if not text:
        return None
    try:
        value = json.loads(text)
        json.dumps(value)
    except (ValueError, RecursionError):
        return None
    return value


def _input_record(ckpt: Checkpoint, sha256: str | None, legacy: str | None) -> dict[str, Any]:
    recipe = ckpt.metadata.get("sd_merge_recipe")
    parsed = _json_value(recipe)
    return {"name": ckpt.name, "legacy_hash": legacy, "sd_merge_recipe": recipe if parsed is None else parsed}


def _inherited_models(ckpt: Checkpoint) -> dict[str, Any]:
    models = _json_value(ckpt.metadata.get("sd_merge_models"))
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
    config = full_config(config)  # a UNet-only layout: its family's architecture
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


def package_version() -> str:
    """This package's installed version, or "unknown" (metadata is best effort)."""
    try:
        from importlib.metadata import version

        return version(PACKAGE)
    except Exception:  # noqa: BLE001 - metadata is best effort
        return "unknown"


def input_records(ckpts: Sequence[Checkpoint], hashes: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """`sd_merge_models`: the models the inputs were merged from (from their own metadata), then
    each input by sha256 (`hashes`: file name -> (sha256, legacy hash)); inputs without a hash are
    left out."""
    models: dict[str, Any] = {}
    for ckpt in ckpts:
        models.update(_inherited_models(ckpt))
    for ckpt in ckpts:
        sha, legacy = hashes.get(ckpt.name, (None, None))
        if sha:
            models[sha] = _input_record(ckpt, sha, legacy)
    return models


def metadata_fields(
    *,
    config: str,
    reference: Checkpoint,
    output: pathlib.Path,
    recipe: Mapping[str, Any],
    models: Mapping[str, Any],
    mecha_recipe: str | None,
    merged_from: list[str] | None,
    description: str,
    prediction_type: str | None,
) -> dict[str, str]:
    """The output's metadata: `mecha_recipe`, `sd_merge_recipe`, `sd_merge_models`, `modelspec.*`."""
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
    pkg_version = package_version()
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
    models = input_records((a, b), hashes)
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
    return metadata_fields(
        config=config,
        reference=b if mode == "align" else a,
        output=output,
        recipe=recipe,
        models=models,
        mecha_recipe=mecha_recipe,
        merged_from=merged_from,
        description=description,
        prediction_type=prediction_type,
    )
