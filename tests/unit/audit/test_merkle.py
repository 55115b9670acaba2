"""RFC 9162 Merkle tree hashing and proofs (bastion.audit.merkle).

Known answers come from implementations written elsewhere:

* transparency-dev/merkle, proof/verify_test.go: the classic eight CT leaves, the roots of
  every prefix, and inclusion and consistency proofs (with its list of corruptions, each of
  which must be refused);
* transparency-dev/merkle, rfc6962/rfc6962_test.go: the empty root and leaf hashes;
* golang/mod, sumdb/tlog/note_test.go: RecordHash("hello world").

Beside them, a verifier written here straight from RFC 9162's recursive definitions (MTH,
PATH, SUBPROOF; no bit tricks) is run against the module for every tree size up to 64 and
every leaf index and old size.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

import pytest

from bastion.audit import merkle

pytestmark = pytest.mark.unit


def dh(hex_digest: str) -> bytes:
    return bytes.fromhex(hex_digest)


# transparency-dev/merkle, proof/verify_test.go (`leaves`, `roots`; roots[i] is the root of
# the first i+1 leaves). The sixth leaf is 40414243 there, as in RFC 6962's original tests.
CT_LEAVES = [
    dh(""),
    dh("00"),
    dh("10"),
    dh("2021"),
    dh("3031"),
    dh("40414243"),
    dh("5051525354555657"),
    dh("606162636465666768696a6b6c6d6e6f"),
]
CT_ROOTS = {
    0: dh("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    1: dh("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    2: dh("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    3: dh("aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"),
    4: dh("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    5: dh("4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"),
    6: dh("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef"),
    7: dh("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c"),
    8: dh("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
}
CT_LEAF_HASHES = [merkle.leaf_hash(leaf) for leaf in CT_LEAVES]

# transparency-dev/merkle, proof/verify_test.go (`inclusionProofs`), as (leaf index, tree
# size, proof); the Go table counts leaves from 1, these indices from 0.
INCLUSION_VECTORS: list[tuple[int, int, list[bytes]]] = [
    (0, 1, []),
    (
        0,
        8,
        [
            dh("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            dh("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            dh("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        5,
        8,
        [
            dh("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            dh("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            dh("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (2, 3, [dh("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (
        1,
        5,
        [
            dh("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            dh("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            dh("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
]

# transparency-dev/merkle, proof/verify_test.go (`consistencyProofs`): (size1, size2, proof).
CONSISTENCY_VECTORS: list[tuple[int, int, list[bytes]]] = [
    (1, 1, []),
    (
        1,
        8,
        [
            dh("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            dh("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            dh("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        6,
        8,
        [
            dh("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            dh("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            dh("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (
        2,
        5,
        [
            dh("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            dh("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
    (
        6,
        7,
        [
            dh("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            dh("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            dh("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
]

# transparency-dev/merkle, proof/verify_test.go (`sha256SomeHash`).
SOME_HASH = dh("abacaba000000000000000000000000000000000000000000060061e00123456")


# The reference: RFC 9162 §2.1 read literally, with its own hashing.


def ref_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def ref_split(n: int) -> int:
    """The largest power of two smaller than n."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(leaf_hashes: Sequence[bytes]) -> bytes:
    n = len(leaf_hashes)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaf_hashes[0]
    k = ref_split(n)
    return ref_node(ref_mth(leaf_hashes[:k]), ref_mth(leaf_hashes[k:]))


def ref_root_from_path(m: int, n: int, leaf: bytes, proof: Sequence[bytes]) -> bytes | None:
    """MTH(D[n]) rebuilt from PATH(m, D[n]), whose last element is the top sibling."""
    if n == 1:
        return leaf if not proof else None
    if not proof:
        return None
    k = ref_split(n)
    *rest, sibling = proof
    if m < k:
        left = ref_root_from_path(m, k, leaf, rest)
        return None if left is None else ref_node(left, sibling)
    right = ref_root_from_path(m - k, n - k, leaf, rest)
    return None if right is None else ref_node(sibling, right)


def ref_verify_inclusion(m: int, n: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    return 0 <= m < n and ref_root_from_path(m, n, leaf, proof) == root


def ref_roots_from_subproof(
    m: int, n: int, complete: bool, old_root: bytes, proof: Sequence[bytes]
) -> tuple[bytes, bytes] | None:
    """(MTH(D[0:m]), MTH(D[n])) of a subtree, rebuilt from SUBPROOF(m, D[n], complete)."""
    if m == n:
        if complete:
            return (old_root, old_root) if not proof else None
        return (proof[0], proof[0]) if len(proof) == 1 else None
    if not proof:
        return None
    k = ref_split(n)
    *rest, sibling = proof
    if m <= k:
        sub = ref_roots_from_subproof(m, k, complete, old_root, rest)
        return None if sub is None else (sub[0], ref_node(sub[1], sibling))
    sub = ref_roots_from_subproof(m - k, n - k, False, old_root, rest)
    return None if sub is None else (ref_node(sibling, sub[0]), ref_node(sibling, sub[1]))


def ref_verify_consistency(
    m: int, n: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    if not 0 < m < n:
        return False
    return ref_roots_from_subproof(m, n, True, old_root, proof) == (old_root, new_root)


def flipped(proof: Sequence[bytes], i: int) -> list[bytes]:
    element = bytearray(proof[i])
    element[0] ^= 0x10
    return [*proof[:i], bytes(element), *proof[i + 1 :]]


LEAVES = [merkle.leaf_hash(b"entry %d" % i) for i in range(200)]
ROOTS = [merkle.root_hash(LEAVES[:n]) for n in range(65)]


class TestKnownAnswers:
    def test_hashes(self) -> None:
        # rfc6962/rfc6962_test.go
        assert CT_ROOTS[0] == merkle.EMPTY_ROOT
        assert merkle.leaf_hash(b"") == CT_ROOTS[1]
        assert merkle.leaf_hash(b"L123456") == dh(
            "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
        )
        # golang/mod sumdb/tlog/note_test.go: RecordHash([]byte("hello world"))
        assert merkle.leaf_hash(b"hello world") == base64.b64decode(
            "TszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0="
        )

    @pytest.mark.parametrize("size", range(9))
    def test_roots(self, size: int) -> None:
        assert merkle.root_hash(CT_LEAF_HASHES[:size]) == CT_ROOTS[size]
        builder = merkle.TreeBuilder()
        for leaf_hash in CT_LEAF_HASHES[:size]:
            builder.append(leaf_hash)
        assert builder.root() == CT_ROOTS[size]

    @pytest.mark.parametrize(("index", "size", "proof"), INCLUSION_VECTORS)
    def test_inclusion(self, index: int, size: int, proof: list[bytes]) -> None:
        leaf = CT_LEAF_HASHES[index]
        root = CT_ROOTS[size]
        assert merkle.inclusion_proof(index, CT_LEAF_HASHES[:size]) == proof
        assert merkle.verify_inclusion(index, size, leaf, proof, root)
        assert ref_verify_inclusion(index, size, leaf, proof, root)

    @pytest.mark.parametrize(("index", "size", "proof"), INCLUSION_VECTORS)
    def test_inclusion_corruptions(self, index: int, size: int, proof: list[bytes]) -> None:
        """corruptInclusionProof of proof/verify_test.go: every probe must fail."""
        leaf, root = CT_LEAF_HASHES[index], CT_ROOTS[size]
        probes: list[tuple[int, int, bytes, list[bytes], bytes]] = [
            (index + 1, size, leaf, proof, root),
            (index ^ 2, size, leaf, proof, root),
            (index, size * 2, leaf, proof, root),
            (index, size // 2, leaf, proof, root),
            (index, size, b"WrongLeaf", proof, root),
            (index, size, leaf, proof, merkle.EMPTY_ROOT),
            (index, size, leaf, proof, SOME_HASH),
            (index, size, leaf, [*proof, b""], root),
            (index, size, leaf, [*proof, root], root),
            (index, size, leaf, [b"", *proof], root),
            (index, size, leaf, [root, *proof], root),
        ]
        if index > 0:
            probes.append((index - 1, size, leaf, proof, root))
        probes += [(index, size, leaf, flipped(proof, i), root) for i in range(len(proof))]
        if proof:
            probes.append((index, size, leaf, proof[:-1], root))
        if len(proof) > 1:
            probes.append((index, size, leaf, [proof[0], SOME_HASH, *proof[1:]], root))
        for probe in probes:
            assert not merkle.verify_inclusion(*probe), probe

    @pytest.mark.parametrize(("old_size", "new_size", "proof"), CONSISTENCY_VECTORS)
    def test_consistency(self, old_size: int, new_size: int, proof: list[bytes]) -> None:
        old_root, new_root = CT_ROOTS[old_size], CT_ROOTS[new_size]
        assert merkle.consistency_proof(old_size, CT_LEAF_HASHES[:new_size]) == proof
        assert merkle.verify_consistency(old_size, new_size, old_root, new_root, proof)
        if old_size < new_size:
            assert ref_verify_consistency(old_size, new_size, old_root, new_root, proof)

    @pytest.mark.parametrize(("old_size", "new_size", "proof"), CONSISTENCY_VECTORS[1:])
    def test_consistency_corruptions(
        self, old_size: int, new_size: int, proof: list[bytes]
    ) -> None:
        """corruptConsistencyProof of proof/verify_test.go: every probe must fail."""
        r1, r2 = CT_ROOTS[old_size], CT_ROOTS[new_size]
        probes: list[tuple[int, int, bytes, bytes, list[bytes]]] = [
            (old_size - 1, new_size, r1, r2, proof),
            (old_size + 1, new_size, r1, r2, proof),
            (old_size ^ 2, new_size, r1, r2, proof),
            (old_size, new_size * 2, r1, r2, proof),
            (old_size, new_size // 2, r1, r2, proof),
            (old_size, new_size, b"WrongRoot", r2, proof),
            (old_size, new_size, r1, b"WrongRoot", proof),
            (old_size, new_size, r2, r1, proof),
            (old_size, new_size, r1, r2, []),
            (old_size, new_size, r1, r2, [*proof, b""]),
            (old_size, new_size, r1, r2, [*proof, r1]),
            (old_size, new_size, r1, r2, [*proof, r2]),
            (old_size, new_size, r1, r2, [b"", *proof]),
            (old_size, new_size, r1, r2, [r1, *proof]),
            (old_size, new_size, r1, r2, [r2, *proof]),
            (old_size, new_size, r1, r2, [proof[0], *proof]),
            (old_size, new_size, r1, r2, proof[:-1]),
        ]
        probes += [(old_size, new_size, r1, r2, flipped(proof, i)) for i in range(len(proof))]
        for probe in probes:
            assert not merkle.verify_consistency(*probe), probe


class TestAgainstReference:
    def test_reference_verifier_accepts_the_published_proofs(self) -> None:
        """The reference itself is checked against known answers before it judges."""
        for index, size, proof in INCLUSION_VECTORS:
            assert ref_verify_inclusion(index, size, CT_LEAF_HASHES[index], proof, CT_ROOTS[size])
            assert not ref_verify_inclusion(
                index, size, CT_LEAF_HASHES[index], proof, CT_ROOTS[size - 1]
            )
        for m, n, proof in CONSISTENCY_VECTORS[1:]:
            assert ref_verify_consistency(m, n, CT_ROOTS[m], CT_ROOTS[n], proof)
            assert not ref_verify_consistency(m, n, CT_ROOTS[m], CT_ROOTS[n - 1], proof)

    def test_root_hash(self) -> None:
        for n in range(len(ROOTS)):
            assert ROOTS[n] == ref_mth(LEAVES[:n])

    def test_tree_builder_every_prefix(self) -> None:
        builder = merkle.TreeBuilder()
        assert builder.size == 0
        assert builder.root() == merkle.EMPTY_ROOT
        for n, leaf_hash in enumerate(LEAVES, start=1):
            builder.append(leaf_hash)
            assert builder.size == n
            assert builder.root() == merkle.root_hash(LEAVES[:n]) == ref_mth(LEAVES[:n])

    @pytest.mark.parametrize("size", range(1, 65))
    def test_every_inclusion_proof(self, size: int) -> None:
        leaves, root = LEAVES[:size], ROOTS[size]
        for index in range(size):
            leaf = leaves[index]
            proof = merkle.inclusion_proof(index, leaves)
            assert ref_root_from_path(index, size, leaf, proof) == root
            assert merkle.verify_inclusion(index, size, leaf, proof, root)

            # Probes that must fail whatever the shape of the tree.
            must_fail = [
                (index, size, leaves[(index + 1) % size], proof, root),
                (index, size, leaf, proof, ROOTS[size - 1]),
                (index, size, leaf, [*proof, SOME_HASH], root),
                (index, size, leaf, [SOME_HASH, *proof], root),
                (index, size, leaf, proof[:-1], root),
                (index, size, leaf, proof[1:], root),
                (index ^ 1, size, leaf, proof, root),
                (size, size, leaf, proof, root),
            ]
            must_fail += [(index, size, leaf, flipped(proof, i), root) for i in range(len(proof))]
            for probe in must_fail:
                if probe == (index, size, leaf, proof, root):
                    continue  # a one-leaf tree: its empty proof has nothing to cut
                assert not merkle.verify_inclusion(*probe), probe
                assert not ref_verify_inclusion(*probe), probe

            # Neighbouring indices and sizes may share the proof's shape: the module and the
            # reference must agree on each.
            for other_index in (index - 1, index + 1, index + 2):
                for other_size in (size - 1, size, size + 1, size * 2, size // 2):
                    if other_index < 0 or other_size < 0:
                        continue
                    probe = (other_index, other_size, leaf, proof, root)
                    assert merkle.verify_inclusion(*probe) == ref_verify_inclusion(*probe), probe

    @pytest.mark.parametrize("new_size", range(1, 65))
    def test_every_consistency_proof(self, new_size: int) -> None:
        leaves, new_root = LEAVES[:new_size], ROOTS[new_size]
        for old_size in range(1, new_size + 1):
            old_root = ROOTS[old_size]
            proof = merkle.consistency_proof(old_size, leaves)
            assert merkle.verify_consistency(old_size, new_size, old_root, new_root, proof)
            if old_size == new_size:
                assert proof == []
                continue
            assert ref_roots_from_subproof(old_size, new_size, True, old_root, proof) == (
                old_root,
                new_root,
            )

            must_fail = [
                (old_size, new_size, ROOTS[old_size - 1], new_root, proof),
                (old_size, new_size, old_root, ROOTS[new_size - 1], proof),
                (old_size, new_size, new_root, old_root, proof),
                (old_size, new_size, old_root, new_root, [*proof, SOME_HASH]),
                (old_size, new_size, old_root, new_root, [SOME_HASH, *proof]),
                (old_size, new_size, old_root, new_root, proof[:-1]),
                (old_size, new_size, old_root, new_root, proof[1:]),
                (new_size, old_size, new_root, old_root, proof),
            ]
            must_fail += [
                (old_size, new_size, old_root, new_root, flipped(proof, i))
                for i in range(len(proof))
            ]
            for probe in must_fail:
                assert not merkle.verify_consistency(*probe), probe
                assert not ref_verify_consistency(*probe), probe

            for other_old in (old_size - 1, old_size + 1):
                for other_new in (new_size - 1, new_size + 1, new_size * 2):
                    if not 0 < other_old < other_new:
                        continue
                    probe = (other_old, other_new, old_root, new_root, proof)
                    assert merkle.verify_consistency(*probe) == ref_verify_consistency(*probe)


class TestEdgesAndMalformedInput:
    def test_empty_and_equal_trees(self) -> None:
        empty, root3 = merkle.EMPTY_ROOT, ROOTS[3]
        assert merkle.verify_consistency(0, 0, empty, empty, [])
        assert merkle.verify_consistency(0, 3, empty, root3, [])
        assert merkle.verify_consistency(3, 3, root3, root3, [])
        assert merkle.consistency_proof(0, LEAVES[:3]) == []
        assert merkle.consistency_proof(3, LEAVES[:3]) == []

        assert not merkle.verify_consistency(0, 0, empty, root3, [])
        assert not merkle.verify_consistency(0, 3, root3, root3, [])
        assert not merkle.verify_consistency(0, 3, empty, root3, [empty])
        assert not merkle.verify_consistency(3, 3, root3, ROOTS[2], [])
        assert not merkle.verify_consistency(3, 3, root3, root3, [root3])
        assert not merkle.verify_consistency(2, 3, ROOTS[2], root3, [])
        assert not merkle.verify_consistency(3, 2, root3, ROOTS[2], [])

    def test_inclusion_outside_the_tree(self) -> None:
        leaf = LEAVES[0]
        assert merkle.verify_inclusion(0, 1, leaf, [], leaf)
        assert not merkle.verify_inclusion(0, 0, leaf, [], leaf)
        assert not merkle.verify_inclusion(1, 1, leaf, [], leaf)
        assert not merkle.verify_inclusion(2, 1, leaf, [], leaf)
        assert not merkle.verify_inclusion(0, 0, leaf, [], merkle.EMPTY_ROOT)

    def test_wrong_hash_lengths_are_refused_not_raised(self) -> None:
        proof = merkle.inclusion_proof(1, LEAVES[:4])
        root = ROOTS[4]
        assert merkle.verify_inclusion(1, 4, LEAVES[1], proof, root)
        assert not merkle.verify_inclusion(1, 4, LEAVES[1][:31], proof, root)
        assert not merkle.verify_inclusion(1, 4, LEAVES[1], proof, root + b"\x00")
        assert not merkle.verify_inclusion(1, 4, LEAVES[1], [proof[0] + b"\x00", proof[1]], root)
        assert not merkle.verify_consistency(1, 4, LEAVES[0], root, [b"x" * 33, b"y" * 33])
        assert not merkle.verify_consistency(0, 0, b"", b"", [])

    def test_negative_sizes_raise(self) -> None:
        with pytest.raises(ValueError):
            merkle.verify_inclusion(-1, 4, LEAVES[0], [], ROOTS[4])
        with pytest.raises(ValueError):
            merkle.verify_inclusion(0, -4, LEAVES[0], [], ROOTS[4])
        with pytest.raises(ValueError):
            merkle.verify_consistency(-1, 4, ROOTS[1], ROOTS[4], [])
        with pytest.raises(ValueError):
            merkle.verify_consistency(1, -4, ROOTS[1], ROOTS[4], [])

    def test_builders_refuse_bad_arguments(self) -> None:
        with pytest.raises(ValueError):
            merkle.inclusion_proof(4, LEAVES[:4])
        with pytest.raises(ValueError):
            merkle.inclusion_proof(-1, LEAVES[:4])
        with pytest.raises(ValueError):
            merkle.inclusion_proof(0, [])
        with pytest.raises(ValueError):
            merkle.consistency_proof(5, LEAVES[:4])
        with pytest.raises(ValueError):
            merkle.consistency_proof(-1, LEAVES[:4])
        with pytest.raises(ValueError):
            merkle.root_hash([LEAVES[0], b"short"])
        with pytest.raises(ValueError):
            merkle.node_hash(LEAVES[0], b"short")
        with pytest.raises(ValueError):
            merkle.TreeBuilder().append(b"short")

    def test_node_hash_is_domain_separated(self) -> None:
        left, right = LEAVES[0], LEAVES[1]
        assert merkle.node_hash(left, right) == ref_node(left, right)
        assert merkle.node_hash(left, right) != merkle.node_hash(right, left)
        assert merkle.node_hash(left, right) != merkle.leaf_hash(left + right)
