"""The node classes ComfyUI shows: Re-Basin Align, Re-Basin Merge, Re-Basin Merge Many.

Align reads the weights of A's and B's MODEL (and CLIP) as ComfyUI would compute them (a model's
own patches, e.g. a LoRA, applied), aligns B to A through `mecha.memory.align_in_memory` (the
command line's pre-pass, on ComfyUI's key names mapped as data by `files.key_layouts`), and returns
clones of B's MODEL and CLIP with the moved weights set as patches (`("set", (tensor,))`): no
weight is copied except those that moved, once. With A's into ModelMergeSimple / CLIPMergeSimple
(ratio = model1's weight) it gives `sd-rebasin merge A B --alpha (1 - ratio)`. Merge is Align then
those two nodes. Merge Many runs `merge_many_files` on checkpoint files and loads the result with
ComfyUI's own loader. A problem the user can fix is raised as `RebasinError`, one line.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ..cli.jobs import RunOptions
from ..cli.many_job import merge_many_files, parse_weights
from ..common import events
from ..common.errors import UserError
from ..mecha.memory import align_in_memory
from .progress import EventBar, StepBar

CATEGORY = "advanced/model_merging/re-basin"
UNET_PREFIX = "diffusion_model."
DEVICES = ["cpu", "cuda"]
NONE = "(none)"


class RebasinError(Exception):
    """A problem the user can fix, in one line (ComfyUI shows it as the node's error)."""


@contextlib.contextmanager
def one_line_errors(node: str) -> Iterator[None]:
    """`UserError` and the matching's `ValueError` as a `RebasinError` naming the node."""
    try:
        yield
    except (UserError, ValueError) as e:
        raise RebasinError(f"{node}: {e}") from None


def weights_of(patcher: Any, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Key -> weight of a ModelPatcher as ComfyUI computes it: its own tensor where it has no patch,
    else its patches applied in float32 (as ModelMergeSimple reads model2)."""
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher

    out: dict[str, torch.Tensor] = {}
    for key, entry in patcher.get_key_patches(prefix).items():
        weight, convert = entry[0]
        converting = comfy.model_patcher.get_key_weight(patcher.model, key)[2] is not None
        if len(entry) == 1 and not converting:
            out[key] = weight
            continue
        start = comfy.model_management.cast_to_device(weight, weight.device, torch.float32, copy=True)
        out[key] = comfy.lora.calculate_weight(entry[1:], convert(start, inplace=True), key)
    return out


def set_patches(patcher_owner: Any, patches: Mapping[str, torch.Tensor]) -> Any:
    """A clone of a MODEL or CLIP with `patches` replacing its weights (strength 1)."""
    clone = patcher_owner.clone()
    clone.add_patches({key: ("set", (tensor,)) for key, tensor in patches.items()}, 1.0)
    return clone


def align_objects(
    model_a: Any,
    model_b: Any,
    clip_a: Any | None,
    clip_b: Any | None,
    iters: int,
    seed: int,
    device: str,
    node: str,
    bar: Callable[[int], Any] | None = None,
) -> tuple[Any, Any | None]:
    """B's MODEL and CLIP permuted into A's basis (clones with patches). Without both CLIPs only the
    UNets are aligned (the command line's rule for a UNet-only model) and the CLIP returned is B's
    as it is, or A's where B has none (so that CLIPMergeSimple gives A's text encoder, as
    `sd-rebasin merge` keeps the full model's)."""
    both = clip_a is not None and clip_b is not None
    ref = weights_of(model_a, UNET_PREFIX)
    model = weights_of(model_b, UNET_PREFIX)
    if both:
        ref.update(weights_of(clip_a.patcher))
        model.update(weights_of(clip_b.patcher))
    listener = EventBar() if bar is None else EventBar(bar)
    with one_line_errors(node), events.listening(listener), torch.inference_mode(False):
        result = align_in_memory(
            ref, model, iters=iters, seed=seed, device=device, names=("model A", "model B")
        )
    del ref, model
    unet = {k: t for k, t in result.patches.items() if k.startswith(UNET_PREFIX)}
    text = {k: t for k, t in result.patches.items() if not k.startswith(UNET_PREFIX)}
    model_out = set_patches(model_b, unet)
    if not both:
        return model_out, clip_b if clip_b is not None else clip_a
    return model_out, set_patches(clip_b, text)


def _options() -> dict[str, Any]:
    return {
        "iters": ("INT", {"default": 100, "min": 0, "max": 10000, "tooltip": "most weight-matching sweeps"}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "order of each sweep"}),
        "device": (DEVICES, {"default": "cpu", "tooltip": "where the matching products run"}),
    }


class RebasinAlign:
    """Model B (and its CLIP) permuted into model A's basis: the same function as B, its units
    matched to A's, ready for ModelMergeSimple / CLIPMergeSimple with A."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"model_a": ("MODEL",), "model_b": ("MODEL",), **_options()},
            "optional": {"clip_a": ("CLIP",), "clip_b": ("CLIP",)},
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model_b_aligned", "clip_b_aligned")
    FUNCTION = "align"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Git Re-Basin (exact, function-preserving): permutes model B's units to match model A's. "
        "Feed the outputs with A into ModelMergeSimple / CLIPMergeSimple (ratio = A's weight). "
        "Without both CLIPs only the UNets are aligned."
    )

    def align(
        self,
        model_a: Any,
        model_b: Any,
        iters: int,
        seed: int,
        device: str,
        clip_a: Any = None,
        clip_b: Any = None,
    ) -> tuple[Any, Any]:
        return align_objects(model_a, model_b, clip_a, clip_b, iters, seed, device, "Re-Basin Align")


class RebasinMerge:
    """Re-Basin Align, then ModelMergeSimple and CLIPMergeSimple at `ratio` (A's weight)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        ratio = ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "A's weight"})
        return {
            "required": {"model_a": ("MODEL",), "model_b": ("MODEL",), "ratio": ratio, **_options()},
            "optional": {"clip_a": ("CLIP",), "clip_b": ("CLIP",)},
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "merge"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "ratio * A + (1 - ratio) * B re-based into A's basis (ratio as in ModelMergeSimple); "
        "equals sd-rebasin merge A B --alpha (1 - ratio)."
    )

    def merge(
        self,
        model_a: Any,
        model_b: Any,
        ratio: float,
        iters: int,
        seed: int,
        device: str,
        clip_a: Any = None,
        clip_b: Any = None,
    ) -> tuple[Any, Any]:
        from comfy_extras.nodes_model_merging import CLIPMergeSimple, ModelMergeSimple

        model, clip = align_objects(model_a, model_b, clip_a, clip_b, iters, seed, device, "Re-Basin Merge")
        (merged,) = ModelMergeSimple().merge(model_a, model, ratio)
        if clip_a is not None and clip_b is not None:
            (clip,) = CLIPMergeSimple().merge(clip_a, clip, ratio)
        return merged, clip


SAFE_NAME = re.compile(r"[^/\\]+\.safetensors")


def checkpoint_names(fixed: list[str], more: str) -> list[str]:
    """The chosen checkpoints: the combo inputs that are set, then one name per line or comma of
    `more`; UserError for a name the checkpoint loaders do not list."""
    import folder_paths

    names = [n for n in fixed if n and n != NONE]
    names += [n.strip() for n in re.split(r"[,\n]", more or "") if n.strip()]
    known = folder_paths.get_filename_list("checkpoints")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"{unknown[0]} is not in models/checkpoints (the checkpoint loaders' list)")
    return names


class RebasinMergeMany:
    """MergeMany (Git Re-Basin's Algorithm 3) over checkpoint files: each model aligned to the mean
    of the others until none moves, the weighted mean written to models/checkpoints/ and loaded."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        import folder_paths

        names = folder_paths.get_filename_list("checkpoints")
        return {
            "required": {
                "ckpt_name_1": (names,),
                "ckpt_name_2": (names,),
                "ckpt_name_3": ([NONE, *names], {"default": NONE}),
                "more_checkpoints": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "further checkpoints, one per line or comma",
                    },
                ),
                "weights": (
                    "STRING",
                    {"default": "", "tooltip": "w1,...,wN in the order above; empty: equal weights"},
                ),
                "output_name": ("STRING", {"default": "rebasin_merge_many.safetensors"}),
                "overwrite": ("BOOLEAN", {"default": False}),
                "max_passes": ("INT", {"default": 100, "min": 1, "max": 1000}),
                "output_dtype": (["fp16", "bf16", "fp32"], {"default": "fp16"}),
                **_options(),
            }
        }

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "merge_many"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "sd-rebasin merge-many on checkpoint files: the result is written to models/checkpoints/ "
        "in the first model's basis, with its VAE, and loaded."
    )

    def merge_many(
        self,
        ckpt_name_1: str,
        ckpt_name_2: str,
        ckpt_name_3: str,
        more_checkpoints: str,
        weights: str,
        output_name: str,
        overwrite: bool,
        max_passes: int,
        output_dtype: str,
        iters: int,
        seed: int,
        device: str,
    ) -> tuple[Any, Any, Any]:
        import comfy.sd
        import folder_paths

        # ComfyUI runs nodes in inference mode, which is per thread: tensors made here must stay
        # writable in the package's worker threads
        with one_line_errors("Re-Basin Merge Many"), torch.inference_mode(False):
            names = checkpoint_names([ckpt_name_1, ckpt_name_2, ckpt_name_3], more_checkpoints)
            output_name = output_name.strip()
            if not output_name.endswith(".safetensors"):
                output_name += ".safetensors"
            if not SAFE_NAME.fullmatch(output_name):
                raise UserError(f"output name {output_name!r}: a file name, without folders")
            paths = [pathlib.Path(folder_paths.get_full_path_or_raise("checkpoints", n)) for n in names]
            output = pathlib.Path(folder_paths.get_folder_paths("checkpoints")[0]) / output_name
            options = RunOptions(
                iters=iters,
                seed=seed,
                device=device,
                output_dtype=output_dtype,
                overwrite=overwrite,
                quiet=True,
                progress=False,
            )
            merge_many_files(
                paths,
                output,
                weights=parse_weights(weights, len(paths)) if weights.strip() else None,
                max_passes=max_passes,
                options=options,
                on_progress=StepBar(),
            )
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(output),
            output_vae=True,
            output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"),
        )
        return model, clip, vae


NODE_CLASS_MAPPINGS = {
    "RebasinAlign": RebasinAlign,
    "RebasinMerge": RebasinMerge,
    "RebasinMergeMany": RebasinMergeMany,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RebasinAlign": "Re-Basin Align",
    "RebasinMerge": "Re-Basin Merge",
    "RebasinMergeMany": "Re-Basin Merge Many",
}
