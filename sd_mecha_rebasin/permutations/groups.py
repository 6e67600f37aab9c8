"""Permutation groups of one space, as trees of blocks, and their exact nested assignment.

A space of `n` units is permuted by the automorphisms of a tree: the leaves of an `Atom` may be
permuted freely among themselves; the children of a `Block` may be exchanged with siblings that
carry the same `kind` (siblings of one kind always have the same shape), each child keeping its own
inner permutation. Attention heads, GroupNorm groups and skip-concatenation constraints are all
such trees. A permutation is an int array `perm` with `perm[u]` = the unit of the other model that
lands at unit `u`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from .lap import solve_assignment, solve_assignment_batch


@dataclasses.dataclass(frozen=True)
class Atom:
    """`size` units that any permutation may reorder."""

    size: int

    def describe(self) -> str:
        return f"free {self.size}"


@dataclasses.dataclass(frozen=True)
class Block:
    """Children laid out one after another; children of equal `kinds[i]` may be exchanged."""

    children: tuple[Atom | Block, ...]
    kinds: tuple[str, ...]
    size: int = dataclasses.field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", sum(c.size for c in self.children))

    def describe(self) -> str:
        runs: list[list] = []
        for child, kind in zip(self.children, self.kinds):
            if runs and runs[-1][1] == kind and runs[-1][0] == child:
                runs[-1][2] += 1
            else:
                runs.append([child, kind, 1])
        parts = []
        for child, kind, count in runs:
            mobile = sum(1 for k in self.kinds if k == kind) > 1
            inner = child.describe()
            label = f"{count} x ({inner})" if count > 1 else f"({inner})"
            parts.append(label if mobile else label + " pinned")
        return " + ".join(parts)


Node = Atom | Block


def block_of_groups(groups: int, group_size: int) -> Node:
    """`groups` exchangeable blocks, each freely permuted inside (GroupNorm groups)."""
    if groups == 1:
        return Atom(group_size)
    return Block(tuple(Atom(group_size) for _ in range(groups)), ("group",) * groups)


def attention_heads(heads: int, head_dim: int) -> Node:
    """Heads are exchangeable; inside a head, q/k units and v/out units permute independently.

    Units of head h: `[h*2d, h*2d + d)` are its q/k rows, `[h*2d + d, (h+1)*2d)` its v rows.
    """
    head = Block((Atom(head_dim), Atom(head_dim)), ("qk", "vo"))
    return Block(tuple(head for _ in range(heads)), ("head",) * heads)


def group_order_log10(node: Node) -> float:
    """log10 of the number of permutations the tree allows (for self-description)."""
    from math import lgamma, log

    if isinstance(node, Atom):
        return lgamma(node.size + 1) / log(10)
    total = sum(group_order_log10(c) for c in node.children)
    counts: dict[str, int] = defaultdict(int)
    for kind in node.kinds:
        counts[kind] += 1
    return total + sum(lgamma(c + 1) / log(10) for c in counts.values())


def identity(node: Node) -> np.ndarray:
    return np.arange(node.size, dtype=np.int64)


def random_element(node: Node, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random automorphism (independent uniform choices at every level)."""
    if isinstance(node, Atom):
        return rng.permutation(node.size).astype(np.int64)
    offsets = np.cumsum([0] + [c.size for c in node.children])
    target = list(range(len(node.children)))
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, kind in enumerate(node.kinds):
        by_kind[kind].append(i)
    for members in by_kind.values():
        shuffled = rng.permutation(len(members))
        for i, j in zip(members, shuffled):
            target[i] = members[j]
    perm = np.empty(node.size, dtype=np.int64)
    for i, child in enumerate(node.children):
        j = target[i]
        perm[offsets[i] : offsets[i + 1]] = offsets[j] + random_element(child, rng)
    return perm


def is_element(node: Node, perm: np.ndarray) -> bool:
    """Whether `perm` is an automorphism of the tree (used by tests and sanity checks)."""
    perm = np.asarray(perm)
    if sorted(perm.tolist()) != list(range(node.size)):
        return False
    if isinstance(node, Atom):
        return True
    offsets = np.cumsum([0] + [c.size for c in node.children])
    for i, child in enumerate(node.children):
        chunk = perm[offsets[i] : offsets[i + 1]]
        j = int(np.searchsorted(offsets, chunk[0], side="right") - 1)
        if node.kinds[j] != node.kinds[i] or node.children[j] != child:
            return False
        if not is_element(child, chunk - offsets[j]):
            return False
    return True


def best_element(node: Node, score: np.ndarray, solver: str | None = None) -> np.ndarray:
    """The automorphism maximising `sum(score[u, perm[u]])`, solved exactly by nested assignment.

    For exchangeable siblings, every (child of A, child of B) pair is solved first; an assignment
    over the matrix of those optima then picks the pairing. Atoms of one shape are solved as a batch.
    """
    perm, _ = _best(node, np.asarray(score, dtype=np.float64), solver)
    return perm


def _best(node: Node, score: np.ndarray, solver: str | None) -> tuple[np.ndarray, float]:
    if isinstance(node, Atom):
        cols = solve_assignment(score, solver)
        return cols, float(score[np.arange(node.size), cols].sum())
    offsets = np.cumsum([0] + [c.size for c in node.children])
    perm = np.empty(node.size, dtype=np.int64)
    total = 0.0
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, kind in enumerate(node.kinds):
        by_kind[kind].append(i)
    for members in by_kind.values():
        m = len(members)
        child = node.children[members[0]]
        starts = offsets[members]
        if m > 1 and (isinstance(child, Atom) or _fixed_atoms(child)):
            pair_perm, values = _best_atom_pairs(child, score, starts, solver)
        else:
            pair_perm = np.empty((m, m, child.size), dtype=np.int64)
            values = np.empty((m, m))
            for a, i in enumerate(starts):
                for b, j in enumerate(starts):
                    sub = score[i : i + child.size, j : j + child.size]
                    pair_perm[a, b], values[a, b] = _best(child, sub, solver)
        match = solve_assignment(values, solver) if m > 1 else np.zeros(1, dtype=np.int64)
        for a, i in enumerate(members):
            b = int(match[a])
            j = members[b]
            perm[offsets[i] : offsets[i + 1]] = offsets[j] + pair_perm[a, b]
            total += values[a, b]
    return perm, total


def _fixed_atoms(node: Node) -> bool:
    """A block of same-size atoms none of which may be exchanged (e.g. an attention head's query
    and key halves): its best element is each atom's own assignment on its diagonal block."""
    return (
        isinstance(node, Block)
        and len(set(node.kinds)) == len(node.kinds)
        and all(isinstance(c, Atom) and c.size == node.children[0].size for c in node.children)
    )


def _best_atom_pairs(
    child: Node, score: np.ndarray, starts: np.ndarray, solver: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """`_best(child, ...)` for every (member a, member b) pair of exchangeable children starting at
    `starts` that are an atom or `_fixed_atoms`: `(pair_perm, values)`, `(m, m, child.size)` and
    `(m, m)`. Every atom assignment of every pair is solved in one batch, and the blocks are cut
    and summed with array operations (one call instead of m^2 * atoms: the tiny models' many
    heads made these calls most of a sweep). Same answers and the same float sums as the
    recursion: each atom's value is a sum over its contiguous row of picked scores (numpy sums a
    C-contiguous last axis row by row, pairwise, as it sums one such row), and a pair's atoms are
    added in child order from 0.0, as `_best` adds them."""
    m = len(starts)
    atoms = child.children if isinstance(child, Block) else (child,)
    k, s = len(atoms), atoms[0].size
    inner = np.arange(k) * s
    units = starts[:, None, None] + inner[None, :, None] + np.arange(s)[None, None, :]  # (m, k, s)
    subs = score[units[:, None, :, :, None], units[None, :, :, None, :]]  # (m, m, k, s, s)
    subs = np.ascontiguousarray(subs.reshape(m * m * k, s, s))
    cols = solve_assignment_batch(subs, solver)  # (m*m*k, s)
    picked = np.take_along_axis(subs, cols[:, :, None], axis=2)[:, :, 0]  # (m*m*k, s), contiguous
    sums = picked.sum(axis=1).reshape(m * m, k)
    values = np.zeros(m * m)
    for t in range(k):
        values += sums[:, t]
    pair_perm = (cols.reshape(m * m, k, s) + inner[None, :, None]).reshape(m, m, k * s)
    return pair_perm, values.reshape(m, m)


@dataclasses.dataclass(frozen=True)
class Cut:
    """One block of a partition of a stream: `[start, stop)`; pinned blocks may not move."""

    start: int
    stop: int
    pinned: bool = False


def partition_tree(size: int, partitions: list[list[Cut]]) -> tuple[Node, bool]:
    """The tree of permutations that map every partition's blocks onto blocks of that partition.

    Each partition comes from one GroupNorm that reads the stream (at some offset of a
    concatenation); pinned blocks are the stream's part of a group shared with another stream. The
    result is exact where the partitions nest; where they cross without a common boundary the
    sub-interval falls back to fixed atoms, and the second return value says so (`restricted`).
    """
    parts = [[c for c in p] for p in partitions]
    return _partition_node(0, size, parts)


def _cuts_inside(part: list[Cut], lo: int, hi: int) -> set[int]:
    return {c.start for c in part if lo < c.start < hi}


def _partition_node(lo: int, hi: int, parts: list[list[Cut]]) -> tuple[Node, bool]:
    relevant = [p for p in parts if _cuts_inside(p, lo, hi)]
    if not relevant:
        return Atom(hi - lo), False
    common = set.intersection(*(_cuts_inside(p, lo, hi) for p in relevant))
    if not common:
        bounds = sorted(set.union(*(_cuts_inside(p, lo, hi) for p in relevant)) | {lo, hi})
        atoms = tuple(Atom(b - a) for a, b in zip(bounds, bounds[1:]))
        return Block(atoms, tuple(f"fixed@{a - lo}" for a in bounds[:-1])), True
    bounds = sorted(common | {lo, hi})
    children, kinds, restricted = [], [], False
    for a, b in zip(bounds, bounds[1:]):
        child, r = _partition_node(a, b, relevant)
        restricted |= r
        pattern = tuple(
            tuple((c.start - a, c.stop - a, c.pinned) for c in p if a <= c.start < b) for p in relevant
        )
        pinned = any(flag for blocks in pattern for (_, _, flag) in blocks)
        children.append(child)
        kinds.append(f"pinned@{a - lo}" if pinned else repr((b - a, pattern)))
    if len(children) == 1:
        return children[0], restricted
    return Block(tuple(children), tuple(kinds)), restricted


def groupnorm_cuts(total: int, groups: int, offset: int, width: int) -> list[Cut]:
    """The blocks that GroupNorm(groups, total) induces on a stream at `offset` of the input."""
    size = total // groups
    cuts = []
    start = offset
    while start < offset + width:
        group_start = (start // size) * size
        stop = min(group_start + size, offset + width)
        whole = group_start >= offset and group_start + size <= offset + width
        cuts.append(Cut(start - offset, stop - offset, pinned=not whole))
        start = stop
    return cuts
