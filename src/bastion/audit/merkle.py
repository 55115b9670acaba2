"""RFC 9162 (Certificate Transparency v2) Merkle tree hashing with SHA-256.

The tamper-evident audit log commits to its entries with the same Merkle tree as CT and the
Go checksum database, so any existing verifier can check it. Leaves and interior nodes are
hashed with distinct prefixes (0x00 and 0x01, RFC 9162 §2.1.1) so that a leaf can never be
passed off as a node. A tree of n leaves splits at the largest power of two smaller than n.

Two proofs make the log auditable without trusting it:

* an *inclusion proof* shows that a leaf is at an index of a tree with a given root
  (§2.1.3);
* a *consistency proof* shows that a tree with a given root is a prefix of a larger one,
  i.e. that the log only ever appended (§2.1.4).

The verifiers follow the RFC's iterative algorithms and answer False, never raise, for any
proof, root or leaf hash that does not check out: their input comes from whoever keeps the
log. Only a negative size or index, a caller's own mistake, raises ValueError. The proof
builders work on the whole list of leaf hashes; :class:`TreeBuilder` computes the root of
a long log in one pass with O(log n) memory.

A log that drops its oldest leaves (retention) keeps the *frontier* of the dropped prefix:
the roots of the complete subtrees that cover it, one per set bit of its size. That is all
the later tree needs: :meth:`TreeBuilder.from_frontier` goes on from it, and
:class:`PrunedLeaves` lets the proof builders prove any leaf after the prefix, and
consistency from any tree at least as large as the prefix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """The hash of one leaf: SHA-256(0x00 || data)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The hash of an interior node: SHA-256(0x01 || left || right)."""
    _require_hash(left, "left")
    _require_hash(right, "right")
    return _hash_children(left, right)


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of the leaves, by RFC 9162 §2.1.1's recursive definition."""
    _require_hashes(leaf_hashes)
    return _mth(leaf_hashes, 0, len(leaf_hashes))


class TreeBuilder:
    """The root of a growing tree, from leaf hashes appended one at a time.

    Only the roots of the complete subtrees the leaves so far fill are kept (one per set bit
    of the size, largest first), so memory is O(log n) and each append hashes O(1) nodes on
    average. :meth:`root` folds them from the right, which is exactly MTH of the leaves.
    """

    __slots__ = ("_size", "_stack")

    def __init__(self) -> None:
        self._size = 0
        self._stack: list[bytes] = []

    @classmethod
    def from_frontier(cls, size: int, frontier: Sequence[bytes]) -> TreeBuilder:
        """A builder that goes on from a tree of `size` leaves known only by its frontier."""
        _require_non_negative(size=size)
        if len(frontier) != size.bit_count():
            raise ValueError(f"a tree of {size} leaves has {size.bit_count()} frontier hashes")
        _require_hashes(frontier)
        builder = cls()
        builder._size = size
        builder._stack = list(frontier)
        return builder

    @property
    def size(self) -> int:
        return self._size

    @property
    def frontier(self) -> list[bytes]:
        """The roots of the complete subtrees the leaves so far fill, largest first."""
        return list(self._stack)

    def append(self, leaf_hash: bytes) -> None:
        _require_hash(leaf_hash, "leaf hash")
        node = leaf_hash
        filled = self._size
        while filled & 1:
            node = _hash_children(self._stack.pop(), node)
            filled >>= 1
        self._stack.append(node)
        self._size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1]
        for left in reversed(self._stack[:-1]):
            node = _hash_children(left, node)
        return node


class PrunedLeaves(Sequence[bytes]):
    """The leaf hashes of a tree whose first `pruned_size` leaves are known only by their
    frontier; indexing a pruned leaf raises ValueError."""

    __slots__ = ("_nodes", "frontier", "pruned_size", "tail")

    def __init__(self, pruned_size: int, frontier: Sequence[bytes], tail: Sequence[bytes]) -> None:
        TreeBuilder.from_frontier(pruned_size, frontier)  # checks the frontier's shape
        _require_hashes(tail)
        self.pruned_size = pruned_size
        self.frontier = tuple(frontier)
        self.tail = tail
        # The frontier's subtrees by their leaf range: largest (leftmost) first.
        self._nodes: dict[tuple[int, int], bytes] = {}
        lo = 0
        for bit, node in zip(_set_bits_high_first(pruned_size), frontier, strict=True):
            self._nodes[(lo, lo + bit)] = node
            lo += bit

    def __len__(self) -> int:
        return self.pruned_size + len(self.tail)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if index < self.pruned_size:
            raise ValueError(f"leaf {index} was pruned")
        return self.tail[index - self.pruned_size]

    def known_node(self, lo: int, hi: int) -> bytes | None:
        """The hash of leaves [lo, hi) if it is one of the frontier's subtrees."""
        return self._nodes.get((lo, hi))


def inclusion_proof(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]) of RFC 9162 §2.1.3.1, nearest sibling first."""
    _require_hashes(leaf_hashes)
    if not 0 <= index < len(leaf_hashes):
        raise ValueError(f"index {index} is outside a tree of {len(leaf_hashes)} leaves")
    return _path(index, leaf_hashes, 0, len(leaf_hashes))


def consistency_proof(old_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(old_size, D[n]) of RFC 9162 §2.1.4.1.

    Empty when old_size is 0 or n: the empty tree is a prefix of every tree, and a tree of
    itself.
    """
    _require_hashes(leaf_hashes)
    if not 0 <= old_size <= len(leaf_hashes):
        raise ValueError(f"old size {old_size} is outside 0..{len(leaf_hashes)}")
    if old_size in (0, len(leaf_hashes)):
        return []
    return _subproof(old_size, leaf_hashes, 0, len(leaf_hashes), complete=True)


def verify_inclusion(
    index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> bool:
    """Whether `proof` shows `leaf_hash` at `index` of the tree of `size` leaves with `root`
    (RFC 9162 §2.1.3.2)."""
    _require_non_negative(index=index, size=size)
    if index >= size or not _all_hashes(leaf_hash, root, *proof):
        return False
    fn, sn = index, size - 1
    node = leaf_hash
    for sibling in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            node = _hash_children(sibling, node)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            node = _hash_children(node, sibling)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and node == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether `proof` shows the tree of `old_size` leaves with `old_root` to be a prefix of
    the tree of `new_size` leaves with `new_root` (RFC 9162 §2.1.4.2).

    The RFC defines proofs for 0 < old_size < new_size only; at the edges the proof must be
    empty: from the empty tree (whose root must be EMPTY_ROOT) to any tree, and from a tree
    to itself (same root).
    """
    _require_non_negative(old_size=old_size, new_size=new_size)
    if old_size > new_size or not _all_hashes(old_root, new_root, *proof):
        return False
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT and (new_size > 0 or new_root == EMPTY_ROOT)
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof:
        return False
    path = [old_root, *proof] if old_size & (old_size - 1) == 0 else list(proof)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    old_node = new_node = path[0]
    for sibling in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            old_node = _hash_children(sibling, old_node)
            new_node = _hash_children(sibling, new_node)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            new_node = _hash_children(new_node, sibling)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and old_node == old_root and new_node == new_root


def _hash_children(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _set_bits_high_first(n: int) -> list[int]:
    return [1 << i for i in reversed(range(n.bit_length())) if n >> i & 1]


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    n = hi - lo
    if n == 0:
        return EMPTY_ROOT
    if isinstance(hashes, PrunedLeaves) and lo < hashes.pruned_size:
        known = hashes.known_node(lo, hi)
        if known is not None:
            return known
        if hi <= hashes.pruned_size and n > 1:
            # Inside one of the frontier's subtrees: its parts are gone.
            raise ValueError(f"leaves {lo}..{hi - 1} were pruned")
    if n == 1:
        return hashes[lo]
    k = _split(n)
    return _hash_children(_mth(hashes, lo, lo + k), _mth(hashes, lo + k, hi))


def _path(m: int, hashes: Sequence[bytes], lo: int, hi: int) -> list[bytes]:
    n = hi - lo
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*_path(m, hashes, lo, lo + k), _mth(hashes, lo + k, hi)]
    return [*_path(m - k, hashes, lo + k, hi), _mth(hashes, lo, lo + k)]


def _subproof(m: int, hashes: Sequence[bytes], lo: int, hi: int, *, complete: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if complete else [_mth(hashes, lo, hi)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, hashes, lo, lo + k, complete=complete), _mth(hashes, lo + k, hi)]
    return [*_subproof(m - k, hashes, lo + k, hi, complete=False), _mth(hashes, lo, lo + k)]


def _all_hashes(*values: bytes) -> bool:
    return all(isinstance(value, bytes) and len(value) == HASH_SIZE for value in values)


def _require_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ValueError(f"{what} must be {HASH_SIZE} bytes, not {len(value)}")


def _require_hashes(hashes: Sequence[bytes]) -> None:
    if isinstance(hashes, PrunedLeaves):
        return  # checked when it was made
    for i, value in enumerate(hashes):
        _require_hash(value, f"leaf hash {i}")


def _require_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must not be negative, not {value}")
