"""A Merkle tree whose oldest leaves were pruned (bastion.audit.merkle's frontier support).

For every split of trees up to 40 leaves, the frontier of the pruned prefix must carry a
builder to the same roots, and PrunedLeaves must give the same proofs as the full list of
leaves, for every leaf after the prefix and every old size at least the prefix's.
"""

from __future__ import annotations

import hashlib

import pytest

from bastion.audit import merkle

pytestmark = pytest.mark.unit

LEAVES = [merkle.leaf_hash(hashlib.sha256(str(i).encode()).digest()) for i in range(40)]


def frontier_of(size: int) -> list[bytes]:
    builder = merkle.TreeBuilder()
    for leaf in LEAVES[:size]:
        builder.append(leaf)
    return builder.frontier


@pytest.mark.parametrize("pruned", range(0, 33))
def test_a_builder_goes_on_from_a_frontier_to_the_same_roots(pruned: int) -> None:
    builder = merkle.TreeBuilder.from_frontier(pruned, frontier_of(pruned))
    assert builder.root() == merkle.root_hash(LEAVES[:pruned])
    for size in range(pruned + 1, len(LEAVES) + 1):
        builder.append(LEAVES[size - 1])
        assert builder.root() == merkle.root_hash(LEAVES[:size])


@pytest.mark.parametrize("pruned", [1, 2, 3, 5, 8, 13, 16, 21, 31])
def test_proofs_after_the_pruned_prefix_equal_the_full_trees(pruned: int) -> None:
    for size in range(pruned + 1, len(LEAVES) + 1):
        full = LEAVES[:size]
        cut = merkle.PrunedLeaves(pruned, frontier_of(pruned), LEAVES[pruned:size])
        assert len(cut) == size
        for index in range(pruned, size):
            assert merkle.inclusion_proof(index, cut) == merkle.inclusion_proof(index, full)
        for old in range(pruned, size + 1):
            assert merkle.consistency_proof(old, cut) == merkle.consistency_proof(old, full)


def test_a_proof_that_needs_a_pruned_leaf_is_refused() -> None:
    # 5 pruned leaves: frontier [0,4) and [4,5). Leaf 2's proof needs leaf 3 and [0,2).
    cut = merkle.PrunedLeaves(5, frontier_of(5), LEAVES[5:9])
    with pytest.raises(ValueError, match="pruned"):
        merkle.inclusion_proof(2, cut)
    with pytest.raises(ValueError, match="pruned"):
        merkle.consistency_proof(3, cut)
    with pytest.raises(ValueError, match="pruned"):
        cut[4]


def test_a_frontier_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="frontier"):
        merkle.TreeBuilder.from_frontier(5, frontier_of(4))
    with pytest.raises(ValueError, match="32 bytes"):
        merkle.TreeBuilder.from_frontier(1, [b"short"])
