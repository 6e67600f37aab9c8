"""sd-mecha's own `rebasin` interface, made exact: `sd_mecha.rebasin(a, ref)` for SD1, SD2 and SDXL.

sd-mecha 1.1.x declares `rebasin(a, ref, iters=10)` as a merge-method *interface*
(`@merge_method(is_interface=True)`); implementations register per model config with
`@merge_method(implements="rebasin")`. 1.1.8 ships one, `rebasin_sdxl_sgm`, which permutes only
inside modules with attention windows that cross head boundaries (not function-preserving).

This module registers one implementation per config this package's permutation spec covers
(`git_rebasin_sd1_ldm`, `git_rebasin_sd2_ldm`, `git_rebasin_sdxl_sgm`), each the `git_rebasin`
merge method (`merge_method.rebasin`: our spec, solver and pre-pass) with its inputs tied to that
config. The interface's parameters come first, in its order (`a, ref, iters`); ours follow with
their defaults (`seed=0, threads=0, device="cpu", precision="fp32"`).

Candidate order, the one place that reaches into sd-mecha's internals: `MergeMethodInterface.dispatch`
tries candidates in registration order and takes the first whose model config the inputs satisfy,
and an input whose config is inferred satisfies every config that holds at least 10% of its keys,
so an SD1 file satisfies `sdxl-sgm` (and the builtin, registered first, would take it) and an SDXL
file satisfies `sd1-ldm`. sd-mecha has no public way to order candidates, so
:func:`install_dispatch` gives the interface object a `dispatch` that tries, in this order: the
candidates for the config sd-mecha itself infers for `a` (the config the merge would use), ours
before others; then every other candidate, ours first, as sd-mecha would. sd-mecha's own dispatch
does the rest (its checks and errors are unchanged). It relies on `MergeMethodInterface.candidates`
and `.dispatch` (the same in 1.1.6-1.1.8 and the 1.2.0 development branch), so it is applied only
when the installed sd-mecha is within this package's pin (`SD_MECHA_RANGE`); otherwise a warning says so and sd-mecha's dispatch is left alone
(`git_rebasin` itself never depends on it).
"""

# No `from __future__ import annotations`: sd-mecha evaluates the Parameter annotations at runtime.
import copy
import importlib.metadata
import inspect
import logging
import re
import warnings
from typing import Any

import sd_mecha
from sd_mecha import Parameter, Return, StateDict, merge_method
from sd_mecha.extensions import merge_methods as mecha_methods
from sd_mecha.extensions import model_configs as mecha_configs
from torch import Tensor

from ..common.sd_mecha_compat import SD_MECHA_RANGE, version_range_text
from ..model_configs import sd1_or_sd2_from_shapes
from ..model_configs.unet_only import UNET_ONLY_LAYOUTS, full_config, ldm_names
from .merge_method import rebasin as git_rebasin

INTERFACE = "rebasin"
"""sd-mecha's interface identifier (`sd_mecha.rebasin`)."""

CONFIGS = ("sd1-ldm", "sd2-ldm", "sdxl-sgm", *UNET_ONLY_LAYOUTS)
"""Model configs our implementations cover (SD2 is this package's `sd2-ldm` config; the UNet-only
layouts of `model_configs/unet_only.py`, sd-mecha's `sdxl-diffusers_unet_only` among them)."""


logger = logging.getLogger(__name__)


def implementation_identifier(config: str) -> str:
    """`git_rebasin_<config>` with `-` as `_` (e.g. `git_rebasin_sdxl_sgm`)."""
    return f"git_rebasin_{config.replace('-', '_')}"


def _make_implementation(config: str) -> mecha_methods.MergeMethod:
    """Register `git_rebasin` for `config` as an implementation of sd-mecha's `rebasin` interface."""
    cfg = mecha_configs.resolve(config)
    contract = mecha_methods.resolve(INTERFACE).get_signature()
    default_iters = contract.parameters["iters"].default

    # Every parameter names the config, literals included: dispatch checks each argument's config
    # (a literal without one satisfies none), as the builtin candidate does.
    class implementation(git_rebasin.__wrapped__):  # map_keys and the pre-pass are git_rebasin's
        def __call__(
            self,
            a: Parameter(StateDict[Tensor], model_config=cfg),
            ref: Parameter(StateDict[Tensor], model_config=cfg),
            iters: Parameter(int, model_config=cfg) = default_iters,
            seed: Parameter(int, model_config=cfg) = 0,
            threads: Parameter(int, model_config=cfg) = 0,
            device: Parameter(str, model_config=cfg) = "cpu",
            precision: Parameter(str, model_config=cfg) = "fp32",
            **kwargs,
        ) -> Return(Tensor, model_config=cfg):
            return super().__call__(a, ref, iters, seed, threads, device, precision, **kwargs)

    implementation.__name__ = implementation.__qualname__ = implementation_identifier(config)
    implementation.__doc__ = f"`git_rebasin` for {config}, as sd-mecha's `rebasin` interface dispatches it."
    method = merge_method(
        implementation, identifier=implementation_identifier(config), implements=INTERFACE, cache_factory=dict
    )
    _bind_every_parameter(method)
    return method


def _bind_every_parameter(method: mecha_methods.MergeMethod) -> None:
    """Dispatch binds only the interface's parameters (`a, ref, iters`); a recipe node that lacks
    ours (`seed`, ...) produces no keys at merge time. So this method's recipe nodes bind every
    parameter, the missing ones at their defaults (as a direct call of the method does)."""

    def create_recipe(bound_args: inspect.BoundArguments) -> Any:
        full = method.get_signature().bind(*bound_args.args, **bound_args.kwargs)
        full.apply_defaults()
        return mecha_methods.MergeMethod.create_recipe(method, full)

    method.create_recipe = create_recipe


def register_implementations() -> dict[str, mecha_methods.MergeMethod]:
    """Our implementations of sd-mecha's `rebasin`, per config; registered on the first call only."""
    out = {}
    for config in CONFIGS:
        identifier = implementation_identifier(config)
        try:
            out[config] = mecha_methods.resolve(identifier)
        except KeyError:
            out[config] = _make_implementation(config)
    return out


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _candidate_config(signature: inspect.Signature) -> str | None:
    """The model config a candidate requires of its first input (`a`), or None."""
    first = next(iter(signature.parameters.values()))
    config = first.annotation.data.model_config
    return getattr(config, "identifier", None)


def inferred_config(node: Any) -> str | None:
    """The model config sd-mecha infers for a recipe node (a model file, a merge node), or None
    when it cannot tell (then dispatch keeps sd-mecha's order).

    sd-mecha detects by key names only, so a file with only the keys sd1-ldm and sd2-ldm share (a
    UNet-only SD1 file) is taken for sd2-ldm; the cross-attention width in the file's shapes
    settles it (`sd1_or_sd2_from_shapes`), as the `sd-rebasin` command does.
    """
    try:
        with sd_mecha.open_graph(node, root_only=True) as graph:
            candidates = graph.root_candidates().model_config
            config = candidates.finalize().identifier
            if full_config(config) in ("sd1-ldm", "sd2-ldm"):
                names = ldm_names(config)
                shapes = {
                    names.get(k, k): m.shape
                    for k, m in candidates.possible_keys.items()
                    if m.shape is not None
                }
                config = same_layout(config, sd1_or_sd2_from_shapes(shapes) or full_config(config))
            return config
    except Exception as e:  # noqa: BLE001  (any failure: fall back to sd-mecha's own order)
        logger.debug("rebasin dispatch: no model config inferred for %r: %s", node, e)
        return None


def same_layout(config: str, full: str) -> str:
    """The config of `full`'s family with `config`'s key layout (an SD1/SD2 tie settled by shapes)."""
    layout = UNET_ONLY_LAYOUTS.get(config)
    if layout is None:
        return full
    return next(
        (
            ident
            for ident, other in UNET_ONLY_LAYOUTS.items()
            if other.full == full and other.names == layout.names
        ),
        config,
    )


def dispatch_order(candidates: list, preferred: str | None, ours: set[str]) -> list:
    """`candidates` ((method, signature) pairs, registration order) in the order to try them:
    those for the `preferred` config first, then the rest; within each, ours first. Stable."""

    def rank(candidate: tuple) -> tuple[bool, bool]:
        method, signature = candidate
        return (
            preferred is not None and _candidate_config(signature) != preferred,
            method.identifier not in ours,
        )

    return sorted(candidates, key=rank)


def install_dispatch(interface: Any = None, version: str | None = None) -> bool:
    """Make sd-mecha's `rebasin` interface dispatch to our implementations (see the module docstring).

    :param interface: the `MergeMethodInterface` (default: sd-mecha's `rebasin`).
    :param version: the sd-mecha version to check against `SD_MECHA_RANGE` (default: the installed one).
    :return: True if our dispatch is in place (also when it already was); False, with a warning, on
        an sd-mecha version outside the range or an interface without the expected internals.
    """
    if interface is None:
        interface = mecha_methods.resolve(INTERFACE).interface
    if version is None:
        version = importlib.metadata.version("sd-mecha")
    low, high = SD_MECHA_RANGE
    expected = isinstance(getattr(interface, "candidates", None), list) and callable(
        getattr(type(interface), "dispatch", None)
    )
    if not low <= _version_tuple(version) < high or not expected:
        warnings.warn(
            f"sd_mecha_rebasin: sd-mecha {version} is outside the tested range {version_range_text()}; "
            "sd_mecha.rebasin keeps sd-mecha's own candidate order (use sd_mecha_rebasin.rebasin, "
            "merge method 'git_rebasin', for exact re-basin)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    if getattr(interface.dispatch, "_sd_mecha_rebasin", False):
        return True
    ours = {implementation_identifier(config) for config in CONFIGS}
    original = type(interface).dispatch

    def dispatch(*args: Any, **kwargs: Any) -> Any:
        bound = interface.signature.bind_partial(*args, **kwargs)
        preferred = inferred_config(bound.arguments["a"]) if "a" in bound.arguments else None
        view = copy.copy(interface)  # the registered list itself stays in registration order
        view.candidates = dispatch_order(interface.candidates, preferred, ours)
        return original(view, *args, **kwargs)

    dispatch._sd_mecha_rebasin = True
    interface.dispatch = dispatch
    return True


IMPLEMENTATIONS = register_implementations()
install_dispatch()

__all__ = [
    "CONFIGS",
    "IMPLEMENTATIONS",
    "INTERFACE",
    "SD_MECHA_RANGE",
    "dispatch_order",
    "implementation_identifier",
    "inferred_config",
    "install_dispatch",
    "register_implementations",
]
