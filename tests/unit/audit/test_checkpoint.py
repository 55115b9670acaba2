"""Checkpoint texts (bastion.audit.checkpoint).

Published examples: C2SP/C2SP tlog-checkpoint.md (the behind-the-sofa checkpoint) and
golang/mod sumdb/tlog/note_test.go (TestFormatTree / TestParseTree: the tree of size
123456789012 whose hash is RecordHash("hello world")).
"""

from __future__ import annotations

import base64

import pytest

from bastion.audit import merkle, note
from bastion.audit.checkpoint import Checkpoint, MalformedCheckpointError

pytestmark = pytest.mark.unit

# C2SP/C2SP tlog-checkpoint.md
SOFA = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
# golang/mod sumdb/tlog/note_test.go
GO_TREE = "go.sum database tree\n123456789012\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n"

ROOT = merkle.leaf_hash(b"hello world")
ROOT64 = "TszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0="


def test_published_sofa_checkpoint() -> None:
    checkpoint = Checkpoint.parse(SOFA)
    assert checkpoint.origin == "example.com/behind-the-sofa"
    assert checkpoint.size == 20852163
    assert checkpoint.root == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert checkpoint.extensions == ()
    assert checkpoint.encode() == SOFA


def test_go_tree_text() -> None:
    checkpoint = Checkpoint("go.sum database tree", 123456789012, ROOT)
    assert checkpoint.encode() == GO_TREE
    assert Checkpoint.parse(GO_TREE) == checkpoint


@pytest.mark.parametrize(
    "checkpoint",
    [
        Checkpoint("bastion.example/audit", 0, merkle.EMPTY_ROOT),
        Checkpoint("bastion.example/audit", 1, ROOT),
        Checkpoint("bastion.example/audit", 2**64 - 1, ROOT, ("ext one", "\u00e8xt+two")),
        Checkpoint("origin with spaces + plus \u00e8", 42, bytes(32)),
    ],
)
def test_round_trip(checkpoint: Checkpoint) -> None:
    text = checkpoint.encode()
    assert text.endswith("\n")
    assert Checkpoint.parse(text) == checkpoint
    assert Checkpoint.parse(text).encode() == text


def test_encoding_layout() -> None:
    text = Checkpoint("o", 10, ROOT, ("a", "b")).encode()
    assert text == f"o\n10\n{ROOT64}\na\nb\n"


@pytest.mark.parametrize(
    "text",
    [
        SOFA[:-1],
        "example.com/log\n5\n",
        "example.com/log\n5",
        "",
        "\n",
        f"\n5\n{ROOT64}\n",
        f"example.com/log\n\n{ROOT64}\n",
        "example.com/log\n5\n\n",
        f"example.com/log\n5\n{ROOT64}\n\n",
        f"example.com/log\n5\n{ROOT64}\n\next\n",
        f"example.com/log\n5\n{ROOT64}\next\n\n",
        f"example.com/log\r\n5\r\n{ROOT64}\r\n",
        f"example.com\tlog\n5\n{ROOT64}\n",
        f"example.com/log\n5\n{ROOT64}\next\x01\n",
        f"\ud800\n5\n{ROOT64}\n",
        # golang/mod sumdb/tlog/note_test.go TestParseTree's bad trees.
        "go.sum database tree\n0xabcdef\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n",
        "go.sum database tree\n123456789012\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBTOOBIG=\n",
        GO_TREE + "JOE",
    ],
)
def test_malformed_text(text: str) -> None:
    with pytest.raises(MalformedCheckpointError):
        Checkpoint.parse(text)


@pytest.mark.parametrize(
    "size",
    [
        "01",
        "00",
        "+1",
        "-1",
        " 1",
        "1 ",
        "1_000",
        "1e3",
        "0x10",
        "\u0661\u0662",
        "\uff11",
        "18446744073709551616",
        "9" * 5000,
    ],
)
def test_non_canonical_size(size: str) -> None:
    with pytest.raises(MalformedCheckpointError):
        Checkpoint.parse(f"example.com/log\n{size}\n{ROOT64}\n")


@pytest.mark.parametrize(
    "root64",
    [
        ROOT64[:-1],
        ROOT64.rstrip("="),
        ROOT64[:-2] + "1=",
        " " + ROOT64,
        ROOT64.replace("+", "-"),
        base64.b64encode(bytes(31)).decode(),
        base64.b64encode(bytes(33)).decode(),
        base64.b64encode(bytes(64)).decode(),
        "",
    ],
)
def test_bad_root(root64: str) -> None:
    with pytest.raises(MalformedCheckpointError):
        Checkpoint.parse(f"example.com/log\n5\n{root64}\n")


def test_the_largest_size() -> None:
    assert Checkpoint.parse(f"o\n18446744073709551615\n{ROOT64}\n").size == 2**64 - 1
    assert Checkpoint.parse(f"o\n0\n{ROOT64}\n").size == 0


@pytest.mark.parametrize(
    ("origin", "size", "root", "extensions"),
    [
        ("", 1, ROOT, ()),
        ("a\nb", 1, ROOT, ()),
        ("a\x00b", 1, ROOT, ()),
        ("\ud800", 1, ROOT, ()),
        ("o", -1, ROOT, ()),
        ("o", 2**64, ROOT, ()),
        ("o", True, ROOT, ()),
        ("o", 1, ROOT[:31], ()),
        ("o", 1, ROOT + b"\x00", ()),
        ("o", 1, ROOT, ("",)),
        ("o", 1, ROOT, ("two\nlines",)),
        ("o", 1, ROOT, ("tab\t",)),
    ],
)
def test_constructor_validates(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    with pytest.raises(MalformedCheckpointError):
        Checkpoint(origin, size, root, extensions)


def test_errors_are_value_errors() -> None:
    assert issubclass(MalformedCheckpointError, ValueError)


def test_signed_checkpoint_end_to_end() -> None:
    """A log's round: build the tree, sign its checkpoint, and let a client check it."""
    leaves = [merkle.leaf_hash(b"event %d" % i) for i in range(13)]
    builder = merkle.TreeBuilder()
    for leaf in leaves[:7]:
        builder.append(leaf)
    old = Checkpoint("bastion.example/audit", builder.size, builder.root())
    for leaf in leaves[7:]:
        builder.append(leaf)
    new = Checkpoint("bastion.example/audit", builder.size, builder.root())

    signer = note.Signer.generate("bastion.example/audit")
    signed = note.sign(new.encode(), signer)
    text, names = note.open_note(signed, [signer.verifier()])
    assert names == ["bastion.example/audit"]
    seen = Checkpoint.parse(text)
    assert seen == new

    proof = merkle.consistency_proof(old.size, leaves)
    assert merkle.verify_consistency(old.size, seen.size, old.root, seen.root, proof)
    inclusion = merkle.inclusion_proof(9, leaves)
    assert merkle.verify_inclusion(9, seen.size, leaves[9], inclusion, seen.root)
    assert not merkle.verify_inclusion(9, seen.size, leaves[8], inclusion, seen.root)
