"""Block weights (MBW): `--alpha` as one number, or one number per UNet block.

The blocks are supermerger's (hako-mikan/sd-webui-supermerger), as sd-mecha 1.1.8 defines them in
its `sd1-supermerger_blocks` and `sdxl-supermerger_blocks` model configs, in those configs' order:

- SD1 and SD2 (26): BASE, IN00..IN11, M00, OUT00..OUT11
- SDXL (20): BASE, IN00..IN08, M00, OUT00..OUT08 (sd-mecha's SDXL block config also has a VAE
  entry, not in supermerger's 20: it takes BASE's value unless named, `VAE=0.3`)

BASE is everything outside the UNet's input, middle and output blocks: the text encoder(s), the
time (and SDXL label) embedding, and for SD1/SD2 the VAE; keys after the output blocks (`out.`)
go with the last OUT block. sd-mecha's conversions `convert_sd1_blocks_to_ldm` and
`convert_sdxl_blocks_to_sgm` turn the block values into one alpha per key (`sd_mecha.convert` of a
`sd_mecha.literal` of the block dict); SD2 has no such conversion in sd-mecha, so this module
registers `convert_sd1_blocks_to_sd2_ldm` with the same rules for this package's `sd2-ldm` config.

Text forms (:func:`parse_alpha`):

- `0.5`: one alpha for every key;
- `0,0.5,...,1`: one number per block, in the order above (26 for SD1/SD2, 20 for SDXL);
- `IN00=0,OUT11=1,default=0.5`: named blocks (any case), the others from `default=` or from the
  caller's default (the CLI's `--alpha-default`); SDXL also takes `VAE=`.
"""

# No `from __future__ import annotations`: sd-mecha evaluates the Parameter annotations at runtime.
import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import sd_mecha
from sd_mecha import Parameter, Return, StateDict, merge_method
from sd_mecha.extensions import model_configs as mecha_configs

BLOCK_CONFIGS = {
    "sd1-ldm": "sd1-supermerger_blocks",
    "sd2-ldm": "sd1-supermerger_blocks",
    "sdxl-sgm": "sdxl-supermerger_blocks",
}
"""Model config -> sd-mecha's block config for it (SD2 uses SD1's blocks)."""

FAMILIES = {"sd1-ldm": "SD1", "sd2-ldm": "SD2", "sdxl-sgm": "SDXL"}

EXTRA_BLOCKS = frozenset({"VAE"})
"""Entries of sd-mecha's block configs that supermerger's positional form does not have; each
takes BASE's value unless named."""

DEFAULT = "DEFAULT"


def block_names(config: str) -> list[str]:
    """The block names of `config`'s family in positional order (sd-mecha's block config order,
    without the extra VAE entry). Raises ValueError for a config without block weights."""
    if config not in BLOCK_CONFIGS:
        raise ValueError(f"block weights exist for {', '.join(FAMILIES.values())} only, not {config}")
    keys = mecha_configs.resolve(BLOCK_CONFIGS[config]).keys()
    return [name for name in keys if name not in EXTRA_BLOCKS]


def block_order_text(config: str) -> str:
    """`BASE, IN00..IN11, M00, OUT00..OUT11` style summary of `config`'s block order."""
    names = block_names(config)
    groups: list[list[str]] = []
    for name in names:
        prefix = re.sub(r"\d+$", "", name)
        if groups and re.sub(r"\d+$", "", groups[-1][0]) == prefix and prefix != name:
            groups[-1].append(name)
        else:
            groups.append([name])
    return ", ".join(g[0] if len(g) == 1 else f"{g[0]}..{g[-1]}" for g in groups)


@dataclasses.dataclass(frozen=True)
class Alpha:
    """A parsed `--alpha`: one number (`scalar`), numbers per block in order (`positional`), or
    named blocks (`named`, upper case) with a `default` for the rest (None: every block named)."""

    text: str
    scalar: float | None = None
    positional: tuple[float, ...] | None = None
    named: Mapping[str, float] | None = None
    default: float | None = None

    @property
    def per_block(self) -> bool:
        return self.scalar is None

    def numbers(self) -> list[float]:
        """Every number given (for range checks)."""
        if self.scalar is not None:
            return [self.scalar]
        values = list(self.positional or ()) + list((self.named or {}).values())
        return values + ([self.default] if self.default is not None else [])

    def blocks(self, config: str) -> dict[str, float]:
        """Block name -> alpha for every entry of `config`'s block config (VAE included for SDXL).

        Raises ValueError (one line, naming the family and the expected count or names) when the
        numbers do not fit the family's blocks.
        """
        names = block_names(config)
        family = FAMILIES[config]
        keys = list(mecha_configs.resolve(BLOCK_CONFIGS[config]).keys())
        extras = [k for k in keys if k in EXTRA_BLOCKS]
        if self.scalar is not None:
            return dict.fromkeys(keys, self.scalar)
        if self.positional is not None:
            if len(self.positional) != len(names):
                raise ValueError(
                    f"--alpha has {len(self.positional)} numbers; {family} block weights take "
                    f"{len(names)}, one per block in this order: {block_order_text(config)}"
                )
            out = dict(zip(names, self.positional))
        else:
            named = dict(self.named or {})
            unknown = [n for n in named if n not in keys]
            if unknown:
                raise ValueError(
                    f"--alpha: unknown {family} block(s) {', '.join(unknown)}; {family} blocks: "
                    f"{block_order_text(config)}" + (f", {', '.join(extras)}" if extras else "")
                )
            missing = [n for n in names if n not in named]
            if missing and self.default is None:
                raise ValueError(
                    f"--alpha: no value for {len(missing)} {family} block(s) ({', '.join(missing[:4])}"
                    f"{', ...' if len(missing) > 4 else ''}); add default=VALUE or --alpha-default"
                )
            out = {n: named.get(n, self.default) for n in names}
            out |= {n: named[n] for n in extras if n in named}
        for extra in extras:
            out.setdefault(extra, out["BASE"])
        return {k: out[k] for k in keys}

    def node(self, config: str) -> Any:
        """The `alpha` argument of `sd_mecha.weighted_sum` for a model of `config`: the number, or
        a recipe node giving each key of `config` its block's alpha (see :func:`block_alpha`)."""
        if self.scalar is not None:
            return self.scalar
        return block_alpha(self.blocks(config), config)

    def describe(self, config: str) -> float | dict[str, float]:
        """The number, or block name -> alpha (for metadata and summaries)."""
        return self.scalar if self.scalar is not None else self.blocks(config)


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity)"


def _number(text: str, what: str) -> float:
    text = text.strip()
    if not re.fullmatch(_NUMBER, text, flags=re.IGNORECASE):
        raise ValueError(f"--alpha: {what} {text!r} is not a number")
    return float(text)


def parse_alpha(text: str | float, default: float | None = None) -> Alpha:
    """Parse an `--alpha` value (the forms in the module docstring); the family is checked later,
    by `Alpha.blocks(config)`.

    :param text: `"0.5"`, `"0,0.5,...,1"` (one number per block) or `"IN00=0,OUT11=1,default=0.5"`.
    :param default: the value of unnamed blocks in the `BLOCK=value` form when `text` has no
        `default=` entry (the CLI's `--alpha-default`).
    :raises ValueError: a one-line message for malformed text (a non-number, a duplicate block,
        positional numbers mixed with `BLOCK=value` pairs).
    """
    if isinstance(text, (int, float)):
        return Alpha(str(text), scalar=float(text))
    raw = text.strip()
    items = [item.strip() for item in re.split(r"[,\s]+", raw) if item.strip()] if raw else []
    if not items:
        raise ValueError("--alpha is empty: give a number or per-block weights")
    pairs = [item for item in items if "=" in item]
    if not pairs:
        numbers = tuple(_number(item, "value") for item in items)
        if len(numbers) == 1:
            return Alpha(raw, scalar=numbers[0])
        return Alpha(raw, positional=numbers)
    if len(pairs) != len(items):
        bare = next(item for item in items if "=" not in item)
        raise ValueError(
            f"--alpha: {bare!r} has no block name; use either numbers only (one per block) or "
            "BLOCK=value pairs only"
        )
    named: dict[str, float] = {}
    for item in pairs:
        name, _, value = item.partition("=")
        name = name.strip().upper()
        if not name:
            raise ValueError(f"--alpha: {item!r} has no block name")
        if name in named:
            raise ValueError(f"--alpha: block {name} is given twice")
        named[name] = _number(value, f"{name}=")
    own_default = named.pop(DEFAULT, None)
    return Alpha(raw, named=named, default=own_default if own_default is not None else default)


def check_range(alpha: Alpha, allow_extrapolation: bool = False) -> None:
    """Raise ValueError unless every number is finite and (without `allow_extrapolation`) in [0, 1]."""
    for value in alpha.numbers():
        if not math.isfinite(value) or (not allow_extrapolation and not 0.0 <= value <= 1.0):
            raise ValueError(
                f"--alpha {alpha.text if alpha.per_block else value}: "
                + ("every value " if alpha.per_block else "")
                + "must lie in [0, 1] (pass --allow-extrapolation to go beyond)"
            )


def block_alpha(blocks: Mapping[str, float], config: str) -> Any:
    """A recipe node giving each key of `config` its block's alpha (a 0-d float32 value).

    `blocks`: every entry of `config`'s sd-mecha block config (`Alpha.blocks`). Built the way
    sd-mecha users write MBW: `sd_mecha.convert(sd_mecha.literal(blocks, config=<block config>),
    config)`, through sd-mecha's block conversions (ours for sd2-ldm).
    """
    block_config = BLOCK_CONFIGS[config]
    literal = sd_mecha.literal({k: float(v) for k, v in blocks.items()}, config=block_config)
    return sd_mecha.convert(literal, config)


# --------------------------------------------------------------------------------------------
# SD2: sd-mecha converts SD1's blocks to sd1-ldm only; the same rules for this package's sd2-ldm.

_INPUT = re.compile(r"\.input_blocks\.(\d+)\.")
_MIDDLE = re.compile(r"\.middle_block\.\d+\.")
_OUTPUT = re.compile(r"\.output_blocks\.(\d+)\.")

T = TypeVar("T")


def sd2_block_of(key: str) -> str:
    """The SD1 block an sd2-ldm key belongs to, by sd-mecha's SD1 rules (convert_sd1_blocks_to_ldm)."""
    if not key.startswith("model.diffusion_model."):
        return "BASE"  # text encoder, VAE, scheduler buffers, EMA
    if ".time_embed" in key:
        return "BASE"
    if ".out." in key:
        return "OUT11"
    if m := _INPUT.search(key):
        return f"IN{int(m.group(1)):02}"
    if _MIDDLE.search(key):
        return "M00"
    if m := _OUTPUT.search(key):
        return f"OUT{int(m.group(1)):02}"
    return "OUT11"


def _register_sd2_conversion() -> None:
    from sd_mecha.extensions import merge_methods as mecha_methods

    from ..model_configs import register_model_configs

    identifier = "convert_sd1_blocks_to_sd2_ldm"
    try:
        mecha_methods.resolve(identifier)
        return
    except KeyError:
        pass
    register_model_configs()
    sd2 = mecha_configs.resolve("sd2-ldm")

    @merge_method(identifier=identifier, is_conversion=True, reuse_outputs=False)
    class convert_sd1_blocks_to_sd2_ldm:
        """SD1 block weights (sd1-supermerger_blocks) -> one value per sd2-ldm key."""

        @staticmethod
        def map_keys(b) -> None:
            for key in sd2.keys():
                b[key] = b.keys[sd2_block_of(key)]

        def __call__(
            self,
            blocks: Parameter(StateDict[T], model_config="sd1-supermerger_blocks"),
            **kwargs,
        ) -> Return(T, model_config="sd2-ldm"):
            return blocks[kwargs["key_relation"].inputs["blocks"][0]]


_register_sd2_conversion()

__all__ = [
    "BLOCK_CONFIGS",
    "Alpha",
    "block_alpha",
    "block_names",
    "block_order_text",
    "check_range",
    "parse_alpha",
    "sd2_block_of",
]
