"""Key layouts that other tools save, read into the canonical one at open time, in one place.

The canonical layout is the one A1111, Forge and ComfyUI load and sd-mecha's `sd1-ldm` /
`sd2-ldm` / `sdxl-sgm` configs name: `model.diffusion_model.`, `cond_stage_model.` (SD1 CLIP-L in
transformers' layout, SD2 OpenCLIP-H in open_clip's), `conditioner.embedders.0.transformer.` and
`conditioner.embedders.1.model.` (SDXL), `first_stage_model.`. Every file is read through `plan`:
when its keys are in another layout, `Layout` says which canonical key comes from which file keys,
and `Checkpoint.iter_tensors` and the sd-mecha reader (`sd_mecha_formats`) both yield the
canonical keys. The output is therefore always canonical. Renaming is exact: a key keeps its
tensor; OpenCLIP's fused `in_proj` is the concatenation of transformers' q, k, v (rows [0:d] q,
[d:2d] k, [2d:3d] v) and its `text_projection` (used as `x @ W`) is the transpose of transformers'
`text_projection.weight` (a Linear, `W x`).

What each layout is, as data:
- `WRAPPER_SEGMENTS`: `_orig_mod.` (torch.compile) and `module.` (DDP / DataParallel) segments,
  at the start of a key or after any prefix, are removed. No canonical SD key has such a segment.
- `PREFIX_RULES`: source layout -> (source prefix, canonical prefix, only when a key matches). Forge
  saves before 2025 (`backend/diffusion_engine/base.py` `save_checkpoint`): `text_encoders.<name>.`
  holding Forge's `IntegratedCLIP` (a transformers CLIPTextModel under `transformer.`, plus
  `logit_scale`; CLIP-G and CLIP-H in transformers' layout) and `vae.` (LDM VAE names).
- `OPENCLIP_PREFIXES`: where an OpenCLIP text encoder lives; one stored there in transformers'
  layout (`text_model.encoder.layers.N.self_attn.q_proj`, ...) is converted by `HF_TO_OPENCLIP`.
  SD2's layer count is checked (`OPENCLIP_LAYERS`): saved through diffusers it has 23 layers, not
  24 (diffusers drops the last one, which SD2 never runs: it reads the penultimate layer, and our
  `sd2-ldm` config marks layer 23 optional). Such a file is read as it is and `Layout.notes` says
  so (the output has 23 layers too: nothing is made up); fewer layers are refused.
- A diffusers pipeline folder is refused in one line (`refuse_diffusers_folder`).
- `MEMORY_RULES`: layouts that live in another program's memory, never in files (`plan(...,
  rules=MEMORY_RULES)`; files are never read through them). ComfyUI's MODEL names the UNet
  `diffusion_model.*`; its CLIP names are `clip_l.transformer.text_model.*` (SD1, SDXL's CLIP-L),
  `clip_h.transformer.*` (SD2) and `clip_g.transformer.*` (SDXL), the OpenCLIP encoders in
  transformers' layout (q/k/v split, `text_projection.weight` transposed), as ComfyUI's
  `supported_models.py` converts them. `MEMORY_ONLY`: keys such a program holds that no checkpoint
  has (ComfyUI's CLIP-L `text_projection` and `logit_scale`, dropped when it saves).
  `Layout.to_source` maps a canonical tensor back to the program's keys (the exact inverse).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from ..common.errors import UserError

WRAPPER_SEGMENTS = re.compile(r"(?:^|(?<=\.))(?:_orig_mod|module)\.")
"""A `_orig_mod.` or `module.` segment at the start of a key or after a dot."""
WRAPPER_LAYOUT = "torch.compile / DDP wrappers (_orig_mod. / module.)"

FORGE = "Forge (saved before 2025)"
HF_OPENCLIP = "OpenCLIP text encoder in Hugging Face layout"

PREFIX_RULES: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    FORGE: (
        # SDXL (a clip_g beside it) first: its CLIP-L lives under conditioner.embedders.0.
        ("text_encoders.clip_l.", "conditioner.embedders.0.", r"^text_encoders\.clip_g\."),
        ("text_encoders.clip_l.", "cond_stage_model.", None),
        ("text_encoders.clip_g.transformer.", "conditioner.embedders.1.model.", None),
        ("text_encoders.clip_g.", "conditioner.embedders.1.model.", None),
        ("text_encoders.clip_h.transformer.", "cond_stage_model.model.", None),
        ("text_encoders.clip_h.", "cond_stage_model.model.", None),
        ("vae.", "first_stage_model.", None),
    ),
    HF_OPENCLIP: (
        # ComfyUI's internal name of SDXL's CLIP-G, and sgm's FrozenOpenCLIPEmbedder2 with a
        # transformers model inside
        ("conditioner.embedders.1.transformer.", "conditioner.embedders.1.model.", None),
        (
            "conditioner.embedders.1.model.transformer.text_model.",
            "conditioner.embedders.1.model.text_model.",
            None,
        ),
    ),
}
"""Source layout -> (source prefix, canonical prefix, a pattern some key of the file must match
for the rule to apply, or None); the first rule whose prefix and condition match renames a key."""

COMFYUI = "ComfyUI (in memory: MODEL and CLIP)"

MEMORY_RULES: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    COMFYUI: (
        ("diffusion_model.", "model.diffusion_model.", None),
        # SDXL (a clip_g beside it) first: its CLIP-L lives under conditioner.embedders.0.
        ("clip_l.", "conditioner.embedders.0.", r"^clip_g\."),
        ("clip_l.", "cond_stage_model.", None),
        # the OpenCLIP encoders, in transformers' layout under `transformer.`: converted to
        # open_clip's names by `HF_TO_OPENCLIP` (q/k/v fused, text_projection transposed)
        ("clip_g.transformer.", "conditioner.embedders.1.model.", None),
        ("clip_g.", "conditioner.embedders.1.model.", None),
        ("clip_h.transformer.", "cond_stage_model.model.", None),
        ("clip_h.", "cond_stage_model.model.", None),
    ),
}
"""Layouts of models held in another program's memory (same form as `PREFIX_RULES`): read only
through `plan(..., rules=MEMORY_RULES)`, never applied to files."""

MEMORY_ONLY: dict[str, re.Pattern[str]] = {
    COMFYUI: re.compile(r"clip_l\.(?:transformer\.text_projection\.weight|logit_scale)"),
}
"""Layout -> the keys its program holds that no checkpoint has (ComfyUI's CLIP-L projection and
logit scale: SD1 and SDXL never use them, ComfyUI drops them when it saves); not renamed, never
permuted."""

OPENCLIP_PREFIXES = ("cond_stage_model.model.", "conditioner.embedders.1.model.")
OPENCLIP_LAYERS = {"cond_stage_model.model.": (24, 23)}
"""Canonical OpenCLIP prefix -> (the family's transformer blocks, the fewest read: SD2 without its
unused last block). SDXL's OpenCLIP-G is not checked: sdxl-sgm marks its last block optional."""
OPENCLIP_NAMES = {"cond_stage_model.model.": "SD2's OpenCLIP-H"}

SD2_HF_UNDER_CLIP_L = ("cond_stage_model.transformer.", "cond_stage_model.model.", 1024)
"""SD2's text encoder saved in transformers' layout under SD1's CLIP prefix: told apart by its
width (OpenCLIP-H 1024, CLIP-L 768)."""

HF_TO_OPENCLIP: tuple[tuple[str, str], ...] = (
    (r"text_model\.embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
    (
        r"text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
        r"transformer.resblocks.\1.attn.out_proj.\2",
    ),
    (r"text_model\.encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"transformer.resblocks.\1.ln_1.\2"),
    (r"text_model\.encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"transformer.resblocks.\1.ln_2.\2"),
    (r"text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (
        r"text_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)",
        r"transformer.resblocks.\1.mlp.c_proj.\2",
    ),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"ln_final.\1"),
)
"""transformers' CLIPTextModel name (after the OpenCLIP prefix) -> open_clip's, for the keys that
are renamed one to one; q/k/v (`HF_QKV`), `text_projection.weight` (transposed) and the
`position_ids` buffer (open_clip has none: dropped) are handled by `_hf_openclip`."""
HF_QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)")
HF_DROPPED = re.compile(r"text_model\.embeddings\.position_ids")


@dataclasses.dataclass(frozen=True)
class Source:
    """How one canonical tensor is made from file tensors: `op` "same" (one key), "cat" (q, k, v
    concatenated on dim 0) or "t" (the transpose of one 2-D key)."""

    keys: tuple[str, ...]
    op: str = "same"


@dataclasses.dataclass
class Layout:
    """A file's keys read into the canonical layout: canonical key -> `Source`, in file order."""

    names: list[str]
    """Source layouts found, e.g. ["Forge (saved before 2025)"] ([] for a canonical file)."""
    sources: dict[str, Source]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    renamed: int
    """File keys whose name changed (a fused q/k/v counts 3)."""
    example: str
    """One renaming, "file key -> canonical key"."""
    dropped: list[str]
    """File keys with no canonical counterpart (transformers' `position_ids` of an OpenCLIP encoder)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """What the reader wants the user told (one line each), e.g. an SD2 text encoder of 23 layers."""

    @property
    def identity(self) -> bool:
        return not self.names and not self.notes

    def describe(self) -> dict:
        """What `inspect` shows: the source layout and what was renamed."""
        return {
            "source": ", ".join(self.names) if self.names else "canonical",
            "renamed": self.renamed,
            "example": self.example or None,
            "fused": sum(1 for s in self.sources.values() if s.op == "cat"),
            "transposed": sum(1 for s in self.sources.values() if s.op == "t"),
            "dropped": len(self.dropped),
            "notes": list(self.notes),
        }

    def read(
        self, keys: Iterable[str], read_file: Callable[[list[str]], Iterator[tuple[str, torch.Tensor]]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(canonical key, tensor) for `keys`, reading the file keys through `read_file`."""
        for key in keys:
            source = self.sources[key]
            parts = [t for _, t in read_file(list(source.keys))]
            if source.op == "cat":
                yield key, torch.cat(parts, dim=0)
            elif source.op == "t":
                yield key, parts[0].t().contiguous()
            else:
                yield key, parts[0]

    def to_source(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The source keys and tensors that the canonical `key` holding `tensor` comes from: the
        exact inverse of `read` (a fused q/k/v split in equal thirds, views; a transposed key
        transposed back, contiguous)."""
        source = self.sources[key]
        if source.op == "cat":
            return list(zip(source.keys, torch.chunk(tensor, len(source.keys), dim=0)))
        if source.op == "t":
            return [(source.keys[0], tensor.t().contiguous())]
        return [(source.keys[0], tensor)]


def plan(
    path: str | pathlib.Path,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
    rules: Mapping[str, tuple[tuple[str, str, str | None], ...]] = PREFIX_RULES,
) -> Layout:
    """The canonical reading of a file with these keys; UserError for a layout that cannot be read.

    `rules`: the prefix rules to read with (`PREFIX_RULES` for files, `MEMORY_RULES` for a model
    held by another program; `path` then names the model in messages)."""
    path = pathlib.Path(path)
    names: list[str] = []
    renamed: dict[str, str] = {}  # file key -> name after prefix rules
    for key in shapes:
        new = WRAPPER_SEGMENTS.sub("", key)
        if new != key and WRAPPER_LAYOUT not in names:
            names.append(WRAPPER_LAYOUT)
        renamed[key] = new
    for layout, layout_rules in rules.items():
        active = [
            (src, dst)
            for src, dst, cond in layout_rules
            if cond is None or any(re.search(cond, k) for k in renamed.values())
        ]
        for key, name in renamed.items():
            for src, dst in active:
                if name.startswith(src):
                    renamed[key] = dst + name[len(src) :]
                    if layout not in names:
                        names.append(layout)
                    break
    src, dst, width = SD2_HF_UNDER_CLIP_L
    token = src + "text_model.embeddings.token_embedding.weight"
    by_name = {name: key for key, name in renamed.items()}
    if token in by_name and len(shapes[by_name[token]]) == 2 and shapes[by_name[token]][1] == width:
        renamed = {k: dst + n[len(src) :] if n.startswith(src) else n for k, n in renamed.items()}
    sources: dict[str, Source] = {}
    dropped: list[str] = []
    for key, name in renamed.items():
        if name in sources:
            raise UserError(f"has two keys for {name}: {sources[name].keys[0]} and {key}", path)
        sources[name] = Source((key,))
    fused = _hf_openclip(path, sources, shapes, dropped)
    if fused and HF_OPENCLIP not in names:
        names.append(HF_OPENCLIP)
    notes = _check_openclip_layers(path, sources)
    out_shapes: dict[str, tuple[int, ...]] = {}
    out_dtypes: dict[str, torch.dtype] = {}
    for name, source in sources.items():
        first = source.keys[0]
        if source.op == "cat":
            out_shapes[name] = (sum(shapes[k][0] for k in source.keys), *shapes[first][1:])
        elif source.op == "t":
            out_shapes[name] = tuple(reversed(shapes[first]))
        else:
            out_shapes[name] = tuple(shapes[first])
        out_dtypes[name] = dtypes[first]
    changed = [(s.keys[0], name) for name, s in sources.items() if s.keys != (name,)]
    count = sum(len(s.keys) for name, s in sources.items() if s.keys != (name,))
    example = f"{changed[0][0]} -> {changed[0][1]}" if changed else ""
    return Layout(names, sources, out_shapes, out_dtypes, count, example, dropped, notes)


def _hf_openclip(
    path: pathlib.Path, sources: dict[str, Source], shapes: Mapping[str, tuple[int, ...]], dropped: list[str]
) -> bool:
    """Convert, in place, every OpenCLIP encoder stored in transformers' layout; True if any was."""
    rules = [(re.compile(pattern), target) for pattern, target in HF_TO_OPENCLIP]
    found = False
    for prefix in OPENCLIP_PREFIXES:
        hf = {
            n: s
            for n, s in sources.items()
            if n.startswith(prefix + "text_model.") or n == prefix + "text_projection.weight"
        }
        if not hf:
            continue
        found = True
        qkv: dict[tuple[str, str], dict[str, str]] = {}
        for name, source in hf.items():
            del sources[name]
            rest = name[len(prefix) :]
            if rest == "text_projection.weight":
                _put(path, sources, prefix + "text_projection", Source(source.keys, "t"))
                continue
            if HF_DROPPED.fullmatch(rest):
                dropped.append(source.keys[0])
                continue
            m = HF_QKV.fullmatch(rest)
            if m:
                qkv.setdefault((m[1], m[3]), {})[m[2]] = source.keys[0]
                continue
            for rx, target in rules:
                if rx.fullmatch(rest):
                    _put(path, sources, prefix + rx.sub(target, rest), source)
                    break
            else:
                raise UserError(
                    f"{source.keys[0]}: not a key of a transformers CLIP text encoder, so its OpenCLIP "
                    "name is unknown",
                    path,
                )
        for (layer, param), parts in sorted(qkv.items(), key=lambda item: (int(item[0][0]), item[0][1])):
            missing = [p for p in "qkv" if p not in parts]
            if missing:
                raise UserError(
                    f"layer {layer} of its text encoder ({prefix}) has no {missing[0]}_proj.{param}: "
                    "q, k and v are needed to build OpenCLIP's fused in_proj",
                    path,
                )
            keys = tuple(parts[p] for p in "qkv")
            if len({tuple(shapes[k]) for k in keys}) != 1:
                raise UserError(f"the q, k, v projections of layer {layer} ({prefix}) differ in shape", path)
            _put(
                path,
                sources,
                f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}",
                Source(keys, "cat"),
            )
    return found


def _put(path: pathlib.Path, sources: dict[str, Source], name: str, source: Source) -> None:
    if name in sources:
        raise UserError(f"has {name} twice (in OpenCLIP and in transformers' layout: {source.keys[0]})", path)
    sources[name] = source


_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


def _check_openclip_layers(path: pathlib.Path, sources: Mapping[str, Source]) -> list[str]:
    """Notes for an SD2 text encoder without its unused last block; UserError for fewer blocks
    (a layer is never made up)."""
    notes = []
    for prefix, (want, fewest) in OPENCLIP_LAYERS.items():
        layers = {
            int(m[1]) for n in sources if n.startswith(prefix) and (m := _RESBLOCK.match(n[len(prefix) :]))
        }
        if not layers or len(layers) == want:
            continue
        if len(layers) < fewest or layers != set(range(len(layers))):
            raise UserError(
                f"its text encoder ({prefix}) has {len(layers)} layers, {OPENCLIP_NAMES[prefix]} has {want}: "
                "the missing layers cannot be made up; use a checkpoint with the full text encoder",
                path,
            )
        notes.append(
            f"its text encoder ({prefix}) has {len(layers)} layers, not {want} (saved through diffusers, "
            "which drops the last one; SD2 never runs it): read as it is, the output has "
            f"{len(layers)} layers too"
        )
    return notes


# --------------------------------------------------------------------------------------------
# Folders

DIFFUSERS_FOLDER_MARKER = "model_index.json"


def refuse_diffusers_folder(path: pathlib.Path) -> None:
    """A folder with model_index.json is a diffusers pipeline: refused, naming how to convert it."""
    if (path / DIFFUSERS_FOLDER_MARKER).is_file():
        raise UserError(
            "is a diffusers pipeline folder (model_index.json, unet/, text_encoder/, vae/), not a "
            "single-file checkpoint: convert it first with diffusers' scripts/"
            "convert_diffusers_to_original_stable_diffusion.py (SD1, SD2) or "
            "convert_diffusers_to_original_sdxl.py (SDXL), then give the .safetensors file",
            path,
        )
