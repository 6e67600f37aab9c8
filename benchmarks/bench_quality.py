"""Does re-basin make merges better? Loss barriers of trained SD1-layout models (issue 12).

    python benchmarks/bench_quality.py [--widths 16,32] [--steps 300] [--ft-steps 100] [--threads 1]

Trains (or loads from .bench_cache/quality/) small models in sd-mecha's `sd1-ldm` key layout on
scikit-learn's digits (see benchmarks/quality/), then measures on held-out digits with fixed
timesteps and noise, per width:

1. independent: two models from different seeds (init and data order); loss of
   (1 - lambda) A + lambda B at 25 lambdas, plain and with B aligned to A by weight matching;
2. fine-tunes: model 1 fine-tuned on digits 0-4 and, separately, on 5-9; same two curves;
3. many: four independent models, plain average vs MergeMany (Git Re-Basin, Alg. 3);
4. controls (issue 20.3, `--regimes controls`): model 1 against a random legal permutation of
   itself (re-basin must bring the barrier to 0 and move every permuted unit back), and model 1
   against a model of the same init trained on another data order (a small barrier);
5. drift (issue 20.1, `--regimes drift`): fine-tunes of model 1 pushed ever further from it (longer,
   with a larger learning rate: `--drift-levels STEPS:LR,...`), one on digits 0-4 and one on 5-9;
   per level, each fine-tune's drift ||ft - base|| / ||base|| per component, and the pair regime
   of the two fine-tunes against each other and of each against the base. The independent models'
   own drift from their init is reported beside them, as the far end of the scale;
6. relaxed (issue 20.3, `--regimes relaxed`): the independent pair aligned as if GroupNorm had one
   group (channels free across groups): B's endpoint then computes another function, whose own loss
   is reported (`loss_b_aligned`), so the cost of the group's exactness can be read off;
7. collapse corrections (issue 20.2, `--regimes repair`): for the independent pair, the re-based
   curve again with REPAIR (Jordan et al., ICLR 2023) and with a data-free row rescale applied at
   each lambda (benchmarks/quality/repair.py), a midpoint sweep over layer families, and timings.
Every pair regime also reports its curves and barriers per timestep range (`by_timestep`).

Each width can run in its own process (`--widths 16` and `--widths 32` side by side); each writes
benchmarks/results/quality_c<W>.json, then the table, quality.json and quality.png of every width
found there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import data, measure, models  # noqa: E402
from benchmarks.quality import repair as collapse  # noqa: E402
from benchmarks.quality.train import TrainConfig, train  # noqa: E402
from sd_mecha_rebasin import (  # noqa: E402
    PermutationSpec,
    apply_permutation,
    merge_many,
    permutation_spec,
    random_permutation,
    weight_matching,
)

LOW, HIGH = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cache_path(cache: Path, width: models.Width, tag: str, config: TrainConfig) -> Path:
    """Where `trained` keeps one model (safetensors) and its per-step training losses (.losses.json)."""
    name = f"{width.name}_{tag}_s{config.steps}_b{config.batch}_lr{config.lr:g}_seed{config.seed}"
    return cache / f"{name}.safetensors"


def trained(
    cache: Path,
    width: models.Width,
    tag: str,
    make: Callable[[], models.SDModel],
    train_data: data.Digits,
    config: TrainConfig,
) -> dict[str, torch.Tensor]:
    """A trained model's sd1-ldm state dict, from the cache or trained now (and cached, with its
    per-step losses beside it for `training_curve`)."""
    path = cache_path(cache, width, tag, config)
    if path.exists():
        log(f"{width.name} {tag}: cached {path.name}")
        return load_file(path)
    start = time.time()
    model = make()
    losses = train(model, train_data, config)
    sd = models.to_ldm(model)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, tmp)
    path.with_suffix(".losses.json").write_text(json.dumps(losses))
    tmp.rename(path)
    tail = sum(losses[-20:]) / len(losses[-20:])
    log(
        f"{width.name} {tag}: trained {config.steps} steps in {time.time() - start:.0f} s, last-20 loss {tail:.4f}"
    )
    return sd


def training_curve(
    cache: Path, width: models.Width, tag: str, config: TrainConfig, windows: int = 10
) -> dict | None:
    """The training loss of a cached model as `windows` means over equal runs of steps, and the
    last window's change from the one before (a plateau: close to 0); None for models cached before
    losses were kept."""
    losses_file = cache_path(cache, width, tag, config).with_suffix(".losses.json")
    if not losses_file.exists():
        return None
    losses = np.array(json.loads(losses_file.read_text()))
    means = [float(w.mean()) for w in np.array_split(losses, windows)]
    return {"steps": len(losses), "window_means": means, "last_window_change": means[-1] / means[-2] - 1.0}


def independent_config(args: argparse.Namespace, seed: int) -> TrainConfig:
    """Training settings of the independent model `seed` (its init, data order and noise)."""
    return TrainConfig(steps=args.steps, seed=seed, batch=args.batch, lr=args.lr)


def independent(
    args: argparse.Namespace, width: models.Width, seed: int, train_data: data.Digits
) -> dict[str, torch.Tensor]:
    """The independent model `seed` at this width, trained from its own init (or from the cache)."""
    config = independent_config(args, seed)
    return trained(Path(args.cache), width, "ind", lambda: models.build(width, seed), train_data, config)


def fine_tuned(
    cache: Path,
    width: models.Width,
    tag: str,
    base: dict[str, torch.Tensor],
    train_data: data.Digits,
    config: TrainConfig,
) -> dict[str, torch.Tensor]:
    """`trained` starting from a copy of `base` (a fine-tune of it)."""
    return trained(
        cache,
        width,
        tag,
        lambda: models.from_ldm(width, {k: v.clone() for k, v in base.items()}),
        train_data,
        config,
    )


def drift(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """||after - before|| / ||before|| over all weights, the text encoder and the UNet."""
    text = [k for k in before if k.startswith(models.CLIP_PREFIX)]
    unet = [k for k in before if not k.startswith(models.CLIP_PREFIX)]
    return {
        name: measure.relative_change(before, after, keys)
        for name, keys in (("all", list(before)), ("text", text), ("unet", unet))
    }


def drift_regime(
    args: argparse.Namespace,
    width: models.Width,
    spec: PermutationSpec,
    base: dict[str, torch.Tensor],
    train_data: data.Digits,
    evals: measure.EvalSet,
    save: Callable[[list[dict]], None],
) -> list[dict]:
    """Per drift level: two fine-tunes of `base` (digits 0-4 and 5-9), their drift, and the pair
    regime of A vs B, A vs base, B vs base. `save(levels)` after each level."""
    cache = Path(args.cache)
    levels = []
    for steps, lr in args.drift_levels:
        fts = []
        for classes, seed in zip((LOW, HIGH), args.ft_seeds):
            config = TrainConfig(steps=steps, seed=seed, batch=args.batch, lr=lr, warmup=min(20, steps // 10))
            tag = "drift" + "".join(map(str, classes)) + f"-w{config.warmup}-from-ind1"
            fts.append(fine_tuned(cache, width, tag, base, train_data.subset(classes), config))
        a, b = fts
        level = {
            "steps": steps,
            "lr": lr,
            "drift_a": drift(base, a),
            "drift_b": drift(base, b),
            "drift_a_b": drift(a, b),
        }
        log(
            f"{width.name} drift {steps} steps lr {lr:g}: UNet drift {level['drift_a']['unet']:.3f} / "
            f"{level['drift_b']['unet']:.3f}, text {level['drift_a']['text']:.3f} / {level['drift_b']['text']:.3f}"
        )
        for name, x, y in (("a_b", a, b), ("a_base", a, base), ("b_base", b, base)):
            level[name] = pair_regime(width, spec, x, y, evals, args.threads)
            r = level[name]
            log(
                f"  {name}: barrier {r['barrier_plain']:.4f} plain, {r['barrier_rebased']:.4f} re-based, "
                f"{r['units_moved']} of {r['units_total']} units moved, ||A - pi(B)|| / ||A - B|| {r['rel_distance']:.4f}"
            )
        levels.append(level)
        save(levels)
    return levels


def pair_regime(
    width: models.Width,
    spec: PermutationSpec,
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    evals: measure.EvalSet,
    threads: int,
    corrections: bool = False,
) -> dict:
    """Plain and re-based curves between a and b, barriers, midpoints, units moved; with
    `corrections`, also the REPAIR and rescale curves of the re-based merge (`correction_regime`)."""
    start = time.time()
    result = weight_matching(spec, a, b, seed=0, threads=threads)
    match_s = time.time() - start
    b_aligned = apply_permutation(spec, result.perms, b)
    moved, total = measure.units_moved(result.perms)
    plain, plain_t = measure.curve_parts(width, a, b, evals)
    rebased, rebased_t = measure.curve_parts(width, a, b_aligned, evals)
    mid = len(measure.LAMBDAS) // 2
    out = {
        "lambdas": list(measure.LAMBDAS),
        "plain": plain,
        "rebased": rebased,
        "barrier_plain": measure.barrier(plain),
        "barrier_rebased": measure.barrier(rebased),
        "midpoint_plain": plain[mid],
        "midpoint_rebased": rebased[mid],
        "loss_a": plain[0],
        "loss_b": plain[-1],
        "loss_b_aligned": rebased[-1],
        "by_timestep": {
            "buckets": [list(b) for b in measure.TIME_BUCKETS],
            "plain": plain_t,
            "rebased": rebased_t,
            "barrier_plain": [measure.barrier(c) for c in plain_t],
            "barrier_rebased": [measure.barrier(c) for c in rebased_t],
        },
        "units_moved": moved,
        "units_total": total,
        "rel_distance": result.rel_distance,
        "sweeps": len(result.history) - 1,
        "match_s": match_s,
    }
    if corrections:
        out["corrections"] = correction_regime(width, a, b_aligned, evals, plain, rebased)
    return out


def correction_regime(
    width: models.Width,
    a: dict[str, torch.Tensor],
    b_aligned: dict[str, torch.Tensor],
    evals: measure.EvalSet,
    plain: list[float],
    rebased: list[float],
    families: tuple[str, ...] = collapse.DEFAULT_FAMILIES,
) -> dict:
    """Re-based merge with a collapse correction recomputed at each lambda: REPAIR (statistics on
    self-generated inputs, `collapse.stat_inputs`) and the data-free rescale, on the layers of
    `families`, and REPAIR on every Linear/Conv2d layer (`repair_all`, the paper's choice); their
    curves, barriers and ratios to the plain barrier, seconds per correction, and the lambda = 0.5
    loss with each layer family corrected alone."""
    inputs = collapse.stat_inputs()
    every = collapse.layer_names(width, ["all"])
    start = time.time()
    forward_all = collapse.sd_forward(width, inputs, every)
    stats_all = (collapse.channel_stats(forward_all, a), collapse.channel_stats(forward_all, b_aligned))
    stats_s = time.time() - start

    def methods(layers: list[str]) -> dict[str, Callable[[float], dict[str, torch.Tensor]]]:
        forward = collapse.sd_forward(width, inputs, layers)
        stats = tuple({n: s[n] for n in layers} for s in stats_all)
        return {
            "repair": lambda lam: collapse.repair_with(forward, a, b_aligned, lam, stats),
            "rescale": lambda lam: collapse.rescale(a, b_aligned, lam, layers),
        }

    mid = len(measure.LAMBDAS) // 2
    sweep = {}
    for family in collapse.FAMILIES:
        layers = collapse.layer_names(width, [family])
        sweep[family] = {
            "layers": len(layers),
            **{k: measure.loss(width, f(0.5), evals) for k, f in methods(layers).items()},
        }
        log(f"{width.name}: lambda 0.5 with {family} corrected: {sweep[family]}")

    layers = collapse.layer_names(width, families)
    out = {
        "families": list(families),
        "layers": len(layers),
        "layers_all": len(every),
        "stat_samples": len(inputs.t),
        "stats_s": stats_s,
        "midpoint_by_family": sweep,
        "midpoint_uncorrected": rebased[mid],
    }
    barrier_plain = measure.barrier(plain)
    runs = [*methods(layers).items(), ("repair_all", methods(every)["repair"])]
    for name, correct in runs:
        losses, seconds = [], []
        for lam in measure.LAMBDAS:
            start = time.time()
            sd = correct(lam)
            seconds.append(time.time() - start)
            losses.append(measure.loss(width, sd, evals))
        # The correction is the identity at the endpoints: their losses are the models' own.
        assert losses[0] == rebased[0] and losses[-1] == rebased[-1], (name, losses[0], losses[-1])
        inner = seconds[1:-1]
        out[name] = losses
        out[f"barrier_{name}"] = measure.barrier(losses)
        out[f"ratio_{name}_to_plain"] = measure.barrier(losses) / barrier_plain
        out[f"midpoint_{name}"] = losses[mid]
        out[f"{name}_s_per_lambda"] = sum(inner) / len(inner)
        log(f"{width.name}: re-based + {name}: barrier {out[f'barrier_{name}']:.4f}")
    out["ratio_rebased_to_plain"] = measure.barrier(rebased) / barrier_plain
    return out


def many_regime(
    width: models.Width,
    spec: PermutationSpec,
    sds: list[dict[str, torch.Tensor]],
    evals: measure.EvalSet,
    threads: int,
) -> dict:
    """Plain mean of N models vs MergeMany (Git Re-Basin, Alg. 3), each with and without REPAIR
    (`repair_many_with` on the default layer families, equal weights), and each model's own loss."""
    start = time.time()
    result = merge_many(spec, sds, threads=threads, seed=0)
    match_s = time.time() - start
    aligned = [apply_permutation(spec, p, m) for p, m in zip(result.perms, sds)]
    moved = [measure.units_moved(p)[0] for p in result.perms]
    individual = [measure.loss(width, m, evals) for m in sds]
    forward = collapse.sd_forward(width, collapse.stat_inputs(), collapse.layer_names(width))
    weights = [1.0 / len(sds)] * len(sds)
    start = time.time()
    repaired = {
        name: measure.loss(width, collapse.repair_many_with(forward, group, weights), evals)
        for name, group in (("plain_average_repair", sds), ("merge_many_repair", aligned))
    }
    repair_s = (time.time() - start) / 2
    return {
        "individual": individual,
        "plain_average": measure.loss(width, measure.average(sds), evals),
        "merge_many": measure.loss(width, measure.average(aligned), evals),
        **repaired,
        "repair_families": list(collapse.DEFAULT_FAMILIES),
        "repair_s": repair_s,
        "units_moved": moved,
        "units_total": measure.units_moved(result.perms[0])[1],
        "passes": result.passes,
        "converged": result.converged,
        "match_s": match_s,
    }


SOUP_SIZES = (2, 4, 8)


def soups_regime(
    args: argparse.Namespace,
    width: models.Width,
    spec: PermutationSpec,
    base: dict[str, torch.Tensor],
    train_data: data.Digits,
    evals: measure.EvalSet,
    save: Callable[[list[dict]], None],
) -> list[dict]:
    """Soups of fine-tunes of one base on different data (issue 20.2, the everyday case): for
    N in SOUP_SIZES, N fine-tunes of `base` (--ft-steps at --ft-lr), fine-tune k on the k-th of N
    contiguous chunks of the 10 digit classes; `many_regime` of the N (plain soup, MergeMany, each
    with and without REPAIR) plus each fine-tune's drift from the base. `save(soups)` after each N."""
    cache = Path(args.cache)
    soups = []
    for n in SOUP_SIZES:
        fts = []
        for k, chunk in enumerate(np.array_split(np.arange(10), n)):
            classes = tuple(int(c) for c in chunk)
            config = TrainConfig(steps=args.ft_steps, seed=100 + k, batch=args.batch, lr=args.ft_lr, warmup=5)
            tag = "soup" + "".join(map(str, classes)) + "-from-ind1"
            fts.append(fine_tuned(cache, width, tag, base, train_data.subset(classes), config))
        soup = many_regime(width, spec, fts, evals, args.threads)
        soup["n"] = n
        soup["classes"] = [[int(c) for c in chunk] for chunk in np.array_split(np.arange(10), n)]
        soup["drift_unet"] = [drift(base, ft)["unet"] for ft in fts]
        soups.append(soup)
        mean_ind = sum(soup["individual"]) / n
        log(
            f"{width.name} soup of {n}: fine-tunes {mean_ind:.4f} (mean), soup {soup['plain_average']:.4f}, "
            f"+ REPAIR {soup['plain_average_repair']:.4f}; MergeMany {soup['merge_many']:.4f} "
            f"(units moved {soup['units_moved']}), + REPAIR {soup['merge_many_repair']:.4f}"
        )
        save(soups)
    return soups


def run_width(
    args: argparse.Namespace,
    width: models.Width,
    train_data: data.Digits,
    evals: measure.EvalSet,
    save: Callable[[dict], None],
) -> dict:
    """All regimes at one width; `save(out)` is called after each regime (partial results survive)."""
    cache = Path(args.cache)
    spec = permutation_spec("sd1-ldm", arch=models.arch(width), shapes=models.ldm_shapes(width))

    def scratch(seed):
        return independent(args, width, seed, train_data)

    ind = [scratch(1), scratch(2)]
    curves = [training_curve(cache, width, "ind", independent_config(args, seed)) for seed in (1, 2)]

    def many_of_four(out: dict) -> None:
        four = [*ind, scratch(3), scratch(4)]
        log(f"{width.name}: MergeMany of {len(four)}")
        out["many"] = many_regime(width, spec, four, evals, args.threads)
        save(out)

    inits = [models.to_ldm(models.build(width, seed)) for seed in (1, 2)]
    out = {
        "width": width.name,
        "unet_channels": width.unet,
        "clip_width": width.clip,
        "ft_seeds": list(args.ft_seeds),
    }
    log(f"{width.name}: independent pair")
    out["independent"] = pair_regime(
        width, spec, ind[0], ind[1], evals, args.threads, corrections="repair" in args.regimes
    )
    out["independent"]["drift_from_init"] = [drift(i, m) for i, m in zip(inits, ind)]
    if all(curves):
        out["independent"]["training"] = curves
    del inits
    save(out)

    if "relaxed" in args.regimes:
        log(f"{width.name}: independent pair aligned with GroupNorm groups relaxed (changes B's function)")
        relaxed_arch = models.arch(width)
        relaxed_arch["unet"] = {**relaxed_arch["unet"], "groupnorm_groups": 1}
        relaxed = permutation_spec("sd1-ldm", arch=relaxed_arch, shapes=models.ldm_shapes(width))
        out["relaxed_groups"] = pair_regime(width, relaxed, ind[0], ind[1], evals, args.threads)
        save(out)

    if "drift" in args.regimes:

        def save_levels(levels):
            out["drift"] = levels
            save(out)

        log(f"{width.name}: drifted fine-tunes of model 1")
        drift_regime(args, width, spec, ind[0], train_data, evals, save_levels)

    if "controls" in args.regimes:
        log(f"{width.name}: control, model 1 against a random legal permutation of itself")
        copy = apply_permutation(spec, random_permutation(spec, seed=5), ind[0])
        out["permuted_copy"] = pair_regime(width, spec, ind[0], copy, evals, args.threads)
        config = independent_config(args, 9)
        other_order = trained(
            cache, width, "init1-order9", lambda: models.build(width, 1), train_data, config
        )
        log(f"{width.name}: control, same init, another data order")
        out["data_order"] = pair_regime(width, spec, ind[0], other_order, evals, args.threads)
        save(out)

    if "soups" in args.regimes:

        def save_soups(soups):
            out["soups"] = soups
            out["soups_base_loss"] = out["independent"]["loss_a"]
            save(out)

        log(f"{width.name}: soups of fine-tunes")
        soups_regime(args, width, spec, ind[0], train_data, evals, save_soups)

    if "finetunes" not in args.regimes:
        if "many" in args.regimes:
            many_of_four(out)
        return out
    fts = []
    for classes, seed in zip((LOW, HIGH), args.ft_seeds):
        config = TrainConfig(steps=args.ft_steps, seed=seed, batch=args.batch, lr=args.ft_lr, warmup=5)
        tag = "ft" + "".join(map(str, classes)) + "-from-ind1"
        fts.append(fine_tuned(cache, width, tag, ind[0], train_data.subset(classes), config))
    log(f"{width.name}: fine-tune pair")
    out["finetunes"] = pair_regime(width, spec, fts[0], fts[1], evals, args.threads)
    out["finetunes"]["loss_base"] = out["independent"]["loss_a"]
    save(out)
    if "many" in args.regimes:
        many_of_four(out)
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| width | regime | endpoint losses | barrier plain | barrier re-based | midpoint plain | midpoint re-based | units moved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name in ("independent", "finetunes", "permuted_copy", "data_order", "relaxed_groups"):
            if name not in r:
                continue
            x = r[name]
            ratio = f"{x['barrier_rebased'] / x['barrier_plain']:.2f}x" if x["barrier_plain"] > 0 else "-"
            loss_b = f"{x['loss_b']:.4f}"
            if name == "relaxed_groups":  # B aligned this way is another function: its own loss too
                loss_b += f" (aligned: {x['loss_b_aligned']:.4f})"
            lines.append(
                f"| {r['width']} | {name} | {x['loss_a']:.4f} / {loss_b} | {x['barrier_plain']:.4f} | "
                f"{x['barrier_rebased']:.4f} ({ratio}) | "
                f"{x['midpoint_plain']:.4f} | {x['midpoint_rebased']:.4f} | {x['units_moved']} of {x['units_total']} |"
            )
            for method in ("repair", "rescale", "repair_all"):
                if "corrections" in x:
                    c = x["corrections"]
                    count = c["layers_all"] if method == "repair_all" else c["layers"]
                    lines.append(
                        f"| {r['width']} | {name} re-based + {method} | - | - | "
                        f"{c[f'barrier_{method}']:.4f} ({c[f'ratio_{method}_to_plain']:.2f}x) | - | "
                        f"{c[f'midpoint_{method}']:.4f} | {count} layers, {c[f'{method}_s_per_lambda']:.2f} s |"
                    )
        for level in r.get("drift", []):
            for name in ("a_b", "a_base", "b_base"):
                x = level[name]
                ratio = f"{x['barrier_rebased'] / x['barrier_plain']:.2f}x" if x["barrier_plain"] > 0 else "-"
                d = level["drift_a"]["unet"], level["drift_b"]["unet"]
                lines.append(
                    f"| {r['width']} | drift {level['steps']}@{level['lr']:g} {name} (UNet {d[0]:.3f} / {d[1]:.3f}) | "
                    f"{x['loss_a']:.4f} / {x['loss_b']:.4f} | {x['barrier_plain']:.4f} | "
                    f"{x['barrier_rebased']:.4f} ({ratio}) | {x['midpoint_plain']:.4f} | "
                    f"{x['midpoint_rebased']:.4f} | {x['units_moved']} of {x['units_total']} |"
                )
    return "\n".join(lines)


def many_table(results: list[dict]) -> str:
    """MergeMany of independent models and soups of fine-tunes: the held-out loss of each merge,
    with and without REPAIR, against the mean of the models' own losses (issue 20.2)."""
    lines = [
        "| width | models | own losses (mean) | plain average | + REPAIR | MergeMany | + REPAIR | units moved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = [("4 independent", r["many"])] if "many" in r else []
        rows += [
            (f"soup of {x['n']} fine-tunes (UNet drift {sum(x['drift_unet']) / x['n']:.3f})", x)
            for x in r.get("soups", [])
        ]
        for name, m in rows:
            mean = sum(m["individual"]) / len(m["individual"])

            def cell(key: str, m=m, mean=mean) -> str:
                return f"{m[key]:.4f} (x{m[key] / mean:.2f})" if key in m else "-"

            lines.append(
                f"| {r['width']} | {name} | {mean:.4f} | {cell('plain_average')} | "
                f"{cell('plain_average_repair')} | {cell('merge_many')} | {cell('merge_many_repair')} | "
                f"{', '.join(map(str, m['units_moved']))} of {m['units_total']} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def plot_soups(results: list[dict], path: Path) -> None:
    """One panel per width: loss of the soups of N fine-tunes (plain, + REPAIR) and of MergeMany of
    4 independent models (plain, MergeMany, each + REPAIR), against the models' own mean loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if r.get("soups") or "many" in r]
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        groups = [(f"soup of {x['n']}", x) for x in r.get("soups", [])]
        groups += [("4 independent", r["many"])] if "many" in r else []
        bars = (
            ("own (mean)", None, "0.6"),
            ("plain average", "plain_average", "C0"),
            ("plain average + REPAIR", "plain_average_repair", "C2"),
            ("MergeMany", "merge_many", "C1"),
            ("MergeMany + REPAIR", "merge_many_repair", "C3"),
        )
        step = 1.0 / (len(bars) + 1)
        for j, (label, key, color) in enumerate(bars):
            values = [
                sum(m["individual"]) / len(m["individual"]) if key is None else m.get(key, float("nan"))
                for _, m in groups
            ]
            ax.bar([i + j * step for i in range(len(groups))], values, step, label=label, color=color)
        ax.set_xticks([i + 2 * step for i in range(len(groups))], [g for g, _ in groups])
        ax.set_title(f"{r['width']}: merges of N models, with and without REPAIR")
        ax.set_ylabel("held-out denoising loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3 if any("many" in r for r in results) else 2
    fig, axes = plt.subplots(len(results), cols, figsize=(4.2 * cols, 3.3 * len(results)), squeeze=False)
    for row, r in zip(axes, results):
        for ax, name, title in zip(
            row, ("independent", "finetunes"), ("independent", "fine-tunes of one base")
        ):
            if name not in r:
                ax.axis("off")
                continue
            x = r[name]
            ax.plot(x["lambdas"], x["plain"], "o-", ms=3, label=f"plain (barrier {x['barrier_plain']:.4f})")
            ax.plot(
                x["lambdas"], x["rebased"], "s-", ms=3, label=f"re-basin (barrier {x['barrier_rebased']:.4f})"
            )
            for method, marker in (("repair", "^-"), ("rescale", "v-"), ("repair_all", "x-")):
                if "corrections" in x:
                    c = x["corrections"]
                    ax.plot(
                        x["lambdas"],
                        c[method],
                        marker,
                        ms=3,
                        label=f"re-basin + {method} (barrier {c[f'barrier_{method}']:.4f})",
                    )
            ax.set_title(f"{r['width']}: {title}")
            ax.set_xlabel("lambda  ((1 - lambda) A + lambda B)")
            ax.set_ylabel("held-out denoising loss")
            ax.legend(fontsize=8)
        if cols == 3:
            ax = row[2]
            if "many" in r:
                m = r["many"]
                labels = [f"model {i + 1}" for i in range(len(m["individual"]))] + ["n_average", "MergeMany"]
                values = [*m["individual"], m["plain_average"], m["merge_many"]]
                ax.bar(labels, values, color=["0.6"] * len(m["individual"]) + ["C0", "C1"])
                ax.set_title(f"{r['width']}: 4 independent models")
                ax.set_ylabel("held-out denoising loss")
                ax.tick_params(axis="x", labelrotation=30)
            else:
                ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_drift(results: list[dict], path: Path) -> None:
    """One panel per width: barriers (plain, re-based) of the two fine-tunes against each other and
    the share of units moved, against the fine-tunes' mean UNet drift from their base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    results = [r for r in results if r.get("drift")]
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        levels = r["drift"]
        x = [0.5 * (lv["drift_a"]["unet"] + lv["drift_b"]["unet"]) for lv in levels]
        for name, style, label in (("a_b", "-", "A vs B"), ("a_base", ":", "A vs base")):
            ax.plot(
                x,
                [lv[name]["barrier_plain"] for lv in levels],
                "o" + style,
                color="C0",
                label=f"{label}: plain",
            )
            ax.plot(
                x,
                [lv[name]["barrier_rebased"] for lv in levels],
                "s" + style,
                color="C1",
                label=f"{label}: re-basin",
            )
        ind = r["independent"]
        ind_drift = sum(d["unet"] for d in ind["drift_from_init"]) / len(ind["drift_from_init"])
        ax.axvline(ind_drift, color="0.6", ls="--", lw=1, label="independent models' drift from init")
        ax.set_xlabel("fine-tune UNet drift ||ft - base|| / ||base||")
        ax.set_ylabel("loss barrier (held-out)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{r['width']}: drifted fine-tunes of one base")
        moved = ax.twinx()
        moved.plot(
            x,
            [lv["a_b"]["units_moved"] / lv["a_b"]["units_total"] for lv in levels],
            "^-",
            color="C2",
            alpha=0.6,
        )
        moved.set_ylabel("units moved, A vs B (share)", color="C2")
        moved.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_plateau(results: list[dict], path: Path) -> None:
    """Issue 20.3 at the plateau: the training loss of each independent model (window means), the
    held-out loss along the line plain / re-based / re-based with GroupNorm groups relaxed, and
    the barrier per timestep range, one colour per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if "training" in r.get("independent", {})]
    fig, (train_ax, line_ax, time_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    bar = 0.8 / (2 * len(results))
    for i, r in enumerate(results):
        x, colour = r["independent"], f"C{i}"
        for j, curve in enumerate(x["training"]):
            w = curve["window_means"]
            steps = [(k + 0.5) * curve["steps"] / len(w) for k in range(len(w))]
            train_ax.plot(
                steps, w, "o-" if j == 0 else "s--", ms=3, color=colour, label=f"{r['width']} model {j + 1}"
            )
        lines = [
            (x["plain"], "o-", f"plain ({x['barrier_plain']:.3f})"),
            (x["rebased"], "s--", f"re-basin ({x['barrier_rebased']:.3f})"),
        ]
        if "relaxed_groups" in r:
            lines.append((r["relaxed_groups"]["rebased"], "x:", "groups relaxed (not exact)"))
        for values, style, label in lines:
            line_ax.plot(x["lambdas"], values, style, ms=3, color=colour, label=f"{r['width']} {label}")
        buckets = x["by_timestep"]
        pos = np.arange(len(buckets["buckets"]))
        time_ax.bar(
            pos + (2 * i) * bar,
            buckets["barrier_plain"],
            bar,
            color=colour,
            alpha=0.45,
            label=f"{r['width']} plain",
        )
        time_ax.bar(
            pos + (2 * i + 1) * bar,
            buckets["barrier_rebased"],
            bar,
            color=colour,
            label=f"{r['width']} re-basin",
        )
        time_ax.set_xticks(pos + 0.4 - bar / 2, [f"t {lo}-{hi}" for lo, hi in buckets["buckets"]])
    train_ax.set(
        xlabel="training step", ylabel="training loss (window mean)", title="independent models: training"
    )
    train_ax.set_yscale("log")
    line_ax.set(
        xlabel="lambda  ((1 - lambda) A + lambda B)",
        ylabel="held-out denoising loss",
        title="the line between A and B",
    )
    time_ax.set(ylabel="loss barrier", title="barrier per timestep range")
    for ax, where in ((train_ax, "upper right"), (line_ax, "upper left"), (time_ax, "upper right")):
        ax.legend(fontsize=7, loc=where)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="16,32", help="UNet base channels (SD1: 320), comma-separated")
    p.add_argument("--steps", type=int, default=300, help="training steps of each independent model")
    p.add_argument("--ft-steps", type=int, default=100, help="training steps of each fine-tune")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ft-lr", type=float, default=3e-4)
    p.add_argument(
        "--ft-seeds",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=(11, 12),
        help="seeds of the two fine-tunes (digits 0-4, digits 5-9)",
    )
    p.add_argument(
        "--drift-levels",
        type=lambda s: tuple((int(a), float(b)) for a, b in (x.split(":") for x in s.split(","))),
        default=((100, 3e-4), (300, 1e-3), (1000, 3e-3), (1000, 1e-2)),
        help="fine-tune STEPS:LR pairs of the drift regime, from the usual fine-tune to far past it",
    )
    p.add_argument("--draws", type=int, default=1, help="(timestep, noise) draws per held-out image")
    p.add_argument("--threads", type=int, default=1, help="torch and matching threads")
    p.add_argument(
        "--regimes",
        type=lambda s: tuple(s.split(",")),
        default=("independent", "finetunes", "many"),
        help="which regimes after `independent` (always run): controls, relaxed, drift, finetunes, many, soups, repair",
    )
    p.add_argument(
        "--head-width",
        type=int,
        default=None,
        help="channels per attention head in UNet and text encoder at every width (default: 8 UNet heads, 4 CLIP heads)",
    )
    p.add_argument(
        "--train-only",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=None,
        help="only train (and cache) the independent models of these seeds at each width, e.g. 1 in one process and 2 in another",
    )
    p.add_argument("--cache", default=str(ROOT / ".bench_cache" / "quality"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument(
        "--report-only", action="store_true", help="only redraw the table and plot from the JSON files"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.report_only:
        report(out)
        return

    train_data, held = data.load_digits_split(8)
    evals = measure.eval_set(held, draws=args.draws)
    out.mkdir(parents=True, exist_ok=True)
    for c in (int(x) for x in args.widths.split(",")):
        width = models.Width(
            unet=c, clip=2 * c, clip_heads=4, groups=8 if c >= 32 else 4, head_width=args.head_width
        )
        if args.train_only:
            for seed in args.train_only:
                independent(args, width, seed, train_data)
            continue

        def save(result, width=width):
            summary = {"config": vars(args), "held_out_samples": len(evals.t), "result": result}
            (out / f"quality_{width.name}.json").write_text(json.dumps(summary, indent=1))

        run_width(args, width, train_data, evals, save)
        log(f"{width.name} done")
    if not args.train_only:
        report(out)


def report(out: Path) -> None:
    """Table, quality.json and quality.png from every width's quality_c*.json in `out` (widths may
    run in separate processes; the last one to finish draws them all)."""
    runs = sorted(
        (json.loads(f.read_text()) for f in out.glob("quality_c*.json")),
        key=lambda s: s["result"]["unet_channels"],
    )
    results = [s["result"] for s in runs]
    (out / "quality.json").write_text(json.dumps({"runs": runs}, indent=1))
    print(table(results))
    many = many_table(results)
    if many:
        print("\n" + many)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"no plot drawn: matplotlib is missing (pip install -e '.[bench]'); the figures are in {out}")
        return
    plot(results, out / "quality.png")
    if any(r.get("drift") for r in results):
        plot_drift(results, out / "quality_drift.png")
    if any(r.get("soups") for r in results):
        plot_soups(results, out / "quality_soups.png")
    if any("training" in r.get("independent", {}) for r in results):
        plot_plateau(results, out / "quality_plateau.png")


if __name__ == "__main__":
    main()
