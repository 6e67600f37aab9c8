"""The block-tree groups: legality of random elements, exactness of nested assignment, partitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sd_mecha_rebasin.permutations import groups, lap
from sd_mecha_rebasin.permutations.groups import Atom, Block, Cut


def _all_elements(node):
    """Every automorphism of a small tree, by brute force over all permutations."""
    return [
        np.array(p) for p in itertools.permutations(range(node.size)) if groups.is_element(node, np.array(p))
    ]


SMALL_TREES = [
    Atom(5),
    groups.block_of_groups(3, 2),
    groups.attention_heads(2, 2),
    Block((Atom(2), groups.block_of_groups(2, 2)), ("pinned@0", "rest")),
    # exchangeable siblings made of fixed atoms (a head's query and key halves): the batched path
    Block((Block((Atom(2), Atom(2)), ("q", "k")),) * 2, ("head", "head")),
]


@pytest.mark.parametrize("tree", SMALL_TREES, ids=lambda t: t.describe())
def test_best_element_is_the_brute_force_optimum(tree):
    elements = _all_elements(tree)
    rng = np.random.default_rng(0)
    for _ in range(5):
        score = rng.standard_normal((tree.size, tree.size))
        best = max(score[np.arange(tree.size), e].sum() for e in elements)
        found = groups.best_element(tree, score)
        assert groups.is_element(tree, found)
        assert score[np.arange(tree.size), found].sum() == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("tree", SMALL_TREES, ids=lambda t: t.describe())
def test_random_elements_are_legal_and_cover_the_group(tree):
    rng = np.random.default_rng(1)
    expected = {tuple(e) for e in _all_elements(tree)}
    seen = {tuple(groups.random_element(tree, rng)) for _ in range(60 * len(expected))}
    assert seen == expected
    assert 10 ** groups.group_order_log10(tree) == pytest.approx(len(expected))


def test_head_group_keeps_heads_whole():
    tree = groups.attention_heads(heads=4, head_dim=3)
    perm = groups.random_element(tree, np.random.default_rng(3))
    units = perm.reshape(4, 2, 3)  # head, (qk | vo), within-head unit
    heads = units // 6
    assert (heads == heads[:, :1, :1]).all(), "a head's units must all come from one head"
    assert ((units % 6) < 3)[:, 0].all() and ((units % 6) >= 3)[:, 1].all(), "qk stays qk, vo stays vo"


def test_wrong_structure_is_not_an_element():
    tree = groups.block_of_groups(2, 3)
    assert groups.is_element(tree, np.array([3, 5, 4, 1, 0, 2]))
    assert not groups.is_element(tree, np.array([0, 1, 3, 2, 4, 5]))  # crosses a group


def test_groupnorm_cuts_mark_shared_groups_pinned():
    # 1280 + 640 = 1920 channels in 32 groups of 60: the group [1260, 1320) straddles the boundary.
    first = groups.groupnorm_cuts(1920, 32, 0, 1280)
    second = groups.groupnorm_cuts(1920, 32, 1280, 640)
    assert first[-1] == Cut(1260, 1280, pinned=True) and not any(c.pinned for c in first[:-1])
    assert second[0] == Cut(0, 40, pinned=True) and second[1] == Cut(40, 100)
    assert sum(c.stop - c.start for c in second) == 640


def test_partition_tree_nested_groups_are_exact():
    # Stream read by GroupNorm(32, 1280) (groups of 40) and at offset 0 of GroupNorm(32, 2560) (80).
    parts = [groups.groupnorm_cuts(1280, 32, 0, 1280), groups.groupnorm_cuts(2560, 32, 0, 1280)]
    tree, restricted = groups.partition_tree(1280, parts)
    assert not restricted
    assert tree.describe() == "16 x (2 x (free 40))"


def test_partition_tree_pins_the_straddling_group_part():
    tree, restricted = groups.partition_tree(1280, [groups.groupnorm_cuts(1920, 32, 0, 1280)])
    assert not restricted
    assert tree.describe() == "21 x (free 60) + (free 20) pinned"


def test_partition_tree_crossing_partitions_are_restricted_but_legal():
    # Blocks of 40 and blocks of 60 (offset 0): common boundaries every 120, crossing inside.
    parts = [groups.groupnorm_cuts(1280, 32, 0, 1280), groups.groupnorm_cuts(1920, 32, 0, 1280)]
    tree, restricted = groups.partition_tree(1280, parts)
    assert restricted
    rng = np.random.default_rng(0)
    for _ in range(20):
        perm = groups.random_element(tree, rng)
        for part in parts:  # every block maps onto a block of the same partition
            blocks = {(c.start, c.stop) for c in part}
            for c in part:
                image = np.sort(perm[c.start : c.stop])
                assert (image[0], image[-1] + 1) in blocks and len(image) == image[-1] + 1 - image[0]
                if c.pinned:
                    assert image[0] == c.start


def test_lapx_and_scipy_agree():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64, 300):
        score = rng.standard_normal((n, n))
        a, b = lap.solve_assignment(score, "lapx"), lap.solve_assignment(score, "scipy")
        rows = np.arange(n)
        assert score[rows, a].sum() == pytest.approx(score[rows, b].sum(), abs=1e-9)
        assert np.array_equal(np.sort(a), rows)
    batch = rng.standard_normal((6, 9, 9))
    got = lap.solve_assignment_batch(batch, "lapx")
    want = lap.solve_assignment_batch(batch, "scipy")
    assert np.array_equal(got, want)


def _recursive_best(node, score):
    """Nested assignment one sub-problem at a time (no batches): the reference for the batched
    paths, summing each value in the same order as they do."""
    if isinstance(node, Atom):
        cols = lap.solve_assignment(score)
        return cols, float(score[np.arange(node.size), cols].sum())
    offsets = np.cumsum([0] + [c.size for c in node.children])
    perm, total = np.empty(node.size, dtype=np.int64), 0.0
    kinds = {}
    for i, kind in enumerate(node.kinds):
        kinds.setdefault(kind, []).append(i)
    for members in kinds.values():
        m = len(members)
        found = {}
        values = np.empty((m, m))
        for a, i in enumerate(members):
            for b, j in enumerate(members):
                sub = score[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]]
                found[a, b], values[a, b] = _recursive_best(node.children[i], sub)
        match = lap.solve_assignment(values) if m > 1 else [0]
        for a, i in enumerate(members):
            b = int(match[a])
            perm[offsets[i] : offsets[i + 1]] = offsets[members[b]] + found[a, b]
            total += values[a, b]
    return perm, total


BATCHED_TREES = [
    groups.attention_heads(16, 8),  # the tiny SDXL's heads: exchangeable q/k and v/o halves
    Block((Block((Atom(9), Atom(9), Atom(9)), ("q", "k", "v")),) * 3, ("head",) * 3),
    Block((groups.block_of_groups(4, 3), Atom(5), groups.block_of_groups(4, 3)), ("g", "x", "g")),
    groups.block_of_groups(6, 20),  # atoms of 20: numpy's pairwise sums, not a plain loop
    groups.block_of_groups(3, 200),  # and past its 128-element blocks
]


@pytest.mark.parametrize("tree", BATCHED_TREES, ids=lambda t: t.describe()[:40])
def test_batched_sibling_pairs_equal_the_recursion_bit_for_bit(tree):
    """The batched solve of exchangeable atoms and of exchangeable fixed-atom children (a head's
    query and key halves) gives the plain recursion's permutation and value bit for bit, with ties
    and with scores of very different magnitudes."""
    n = tree.size
    rng = np.random.default_rng(3)
    scores = (
        rng.standard_normal((n, n)),
        np.round(rng.standard_normal((n, n)) * 2) / 2,
        rng.standard_normal((n, n)) * np.exp(rng.uniform(-20, 20, (n, n))),
    )
    for score in scores:
        fast = groups._best(tree, score, None)
        slow = _recursive_best(tree, score)
        assert np.array_equal(fast[0], slow[0]) and fast[1] == slow[1]
        assert groups.is_element(tree, fast[0])
        # and every (member a, member b) sub-problem's answer and value, not only the chosen ones
        kinds = {}
        offsets = np.cumsum([0] + [c.size for c in tree.children])
        for i, kind in enumerate(tree.kinds):
            kinds.setdefault(kind, []).append(i)
        for members in (m for m in kinds.values() if len(m) > 1):
            child = tree.children[members[0]]
            if not (isinstance(child, Atom) or groups._fixed_atoms(child)):
                continue  # (batched one level down)
            perms, values = groups._best_atom_pairs(child, score, offsets[members], None)
            for a, i in enumerate(members):
                for b, j in enumerate(members):
                    sub = score[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]]
                    want = _recursive_best(child, sub)
                    assert np.array_equal(perms[a, b], want[0]) and values[a, b] == want[1], (a, b)
