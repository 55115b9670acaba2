"""Signed notes (bastion.audit.note) against Go's golang.org/x/mod/sumdb/note.

Keys, texts and signatures are copied from golang/mod sumdb/note/note_test.go (TestSign,
TestOpen, TestNewVerifier, TestNewSigner) and the examples of C2SP/C2SP signed-note.md and
tlog-checkpoint.md: Ed25519 signatures are deterministic, so signing Go's text with Go's
key must give Go's note byte for byte.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from bastion.audit import note

pytestmark = pytest.mark.unit

# golang/mod sumdb/note/note_test.go
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKv"
    "qfqdngotpRZb6KE6RyyBwJnAM=\n"
).encode()
ENOCH_SIG = (
    "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oO"
    "TGwnWLox33WWd1RvMc+QQ=\n"
).encode()
PETER_NOTE = TEXT.encode() + b"\n" + PETER_SIG

# C2SP/C2SP signed-note.md: its key is not published, so the note can only be parsed.
QUASIMODO_NOTE = (
    "Ognuno sta solo sul cuor della terra\n"
    "trafitto da un raggio di sole:\n"
    "\n"
    "ed \u00e8 subito sera.\n"
    "\n"
    "\u2014 quasimodo.example/salvatore NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+EhfLW9o"
    "JKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n"
).encode()

# C2SP/C2SP tlog-checkpoint.md, likewise.
SOFA_NOTE = (
    "example.com/behind-the-sofa\n"
    "20852163\n"
    "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    "\n"
    "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URY"
    "N7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
).encode()


@pytest.fixture
def peter() -> note.Verifier:
    return note.Verifier.parse(PETER_VKEY)


@pytest.fixture
def enoch() -> note.Verifier:
    return note.Verifier.parse(ENOCH_VKEY)


def signature_line(name: str, key_id: int, signature: bytes) -> bytes:
    encoded = base64.b64encode(key_id.to_bytes(4, "big") + signature).decode()
    return f"\u2014 {name} {encoded}\n".encode()


class TestGoKeys:
    def test_verifier_key(self, peter: note.Verifier) -> None:
        assert peter.name == "PeterNeumann"
        assert peter.key_id == 0xC74F20A3
        assert note.key_id("PeterNeumann", peter.public_key) == 0xC74F20A3
        assert peter.encode() == PETER_VKEY

    def test_signer_key(self, peter: note.Verifier) -> None:
        signer = note.Signer.parse(PETER_SKEY)
        assert (signer.name, signer.key_id) == ("PeterNeumann", 0xC74F20A3)
        assert signer.encode() == PETER_SKEY
        assert signer.verifier() == peter

    def test_signer_repr_hides_the_key(self) -> None:
        text = repr(note.Signer.parse(PETER_SKEY))
        assert "c74f20a3" in text
        assert "AYEKFALV" not in text and "PRIVATE" not in text

    @pytest.mark.parametrize(
        ("key", "parse"),
        [(PETER_VKEY, note.Verifier.parse), (PETER_SKEY, note.Signer.parse)],
        ids=["verifier", "signer"],
    )
    def test_every_mangling_is_refused(self, key: str, parse: Callable[[str], object]) -> None:
        """TestNewVerifier and TestNewSigner: every proper substring, and every one-character
        change, of a good key string must be refused."""
        for i in range(len(key) + 1):
            for j in range(i + 1, len(key) + 1):
                if (i, j) != (0, len(key)):
                    with pytest.raises(note.MalformedKeyError):
                        parse(key[i:j])
        for i in range(len(key)):
            with pytest.raises(note.MalformedKeyError):
                parse(key[:i] + chr(ord(key[i]) + 1) + key[i + 1 :])

    @pytest.mark.parametrize(
        "vkey",
        [
            # TestNewVerifier: wrong key length, and unknown algorithm, each with its key ID
            # adjusted to match.
            "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
            "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+0xc74f20+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW\n",
            "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        ],
    )
    def test_bad_verifier_keys(self, vkey: str) -> None:
        with pytest.raises(note.MalformedKeyError):
            note.Verifier.parse(vkey)

    def test_generated_keys(self) -> None:
        skey, vkey = note.generate_key("bastion.example/audit")
        signer, verifier = note.Signer.parse(skey), note.Verifier.parse(vkey)
        assert signer.verifier() == verifier
        assert skey.startswith("PRIVATE+KEY+bastion.example/audit+")
        assert vkey.startswith(f"bastion.example/audit+{verifier.key_id:08x}+")
        assert note.generate_key("bastion.example/audit") != (skey, vkey)

    @pytest.mark.parametrize(
        "name",
        ["", "a b", "a+b", "a\tb", "a\u00a0b", "a\u2003b", "a\u3000b", "a\nb", "a\x01b", "\ud800"],
    )
    def test_invalid_names(self, name: str) -> None:
        assert not note.is_valid_key_name(name)
        with pytest.raises(note.MalformedKeyError):
            note.Signer.generate(name)

    @pytest.mark.parametrize("name", ["PeterNeumann", "example.com/log42", "quasimodo.\u00e8/x"])
    def test_valid_names(self, name: str) -> None:
        assert note.is_valid_key_name(name)


class TestGoNotes:
    def test_sign_matches_go_byte_for_byte(self) -> None:
        assert note.sign(TEXT, note.Signer.parse(PETER_SKEY)) == PETER_NOTE

    def test_open(self, peter: note.Verifier) -> None:
        assert note.open_note(PETER_NOTE, [peter]) == (TEXT, ["PeterNeumann"])

    def test_unknown_signature_beside_a_known_one(
        self, peter: note.Verifier, enoch: note.Verifier
    ) -> None:
        both = TEXT.encode() + b"\n" + PETER_SIG + ENOCH_SIG
        assert note.open_note(both, [peter]) == (TEXT, ["PeterNeumann"])
        assert note.open_note(both, [enoch]) == (TEXT, ["EnochRoot"])
        assert note.open_note(both, [peter, enoch]) == (TEXT, ["PeterNeumann", "EnochRoot"])

    def test_no_known_signature(self, peter: note.Verifier) -> None:
        both = TEXT.encode() + b"\n" + PETER_SIG + ENOCH_SIG
        with pytest.raises(note.UnverifiedNoteError):
            note.open_note(both, [])
        with pytest.raises(note.UnverifiedNoteError):
            note.open_note(TEXT.encode() + b"\n" + ENOCH_SIG, [peter])

    def test_invalid_signature(self, peter: note.Verifier) -> None:
        # TestOpen: four characters inserted into the base64 of Peter's signature.
        corrupted = TEXT.encode() + b"\n" + PETER_SIG[:60] + b"ABCD" + PETER_SIG[60:]
        with pytest.raises(note.InvalidSignatureError) as caught:
            note.open_note(corrupted, [peter])
        assert str(caught.value) == "invalid signature for key PeterNeumann+c74f20a3"

    def test_duplicated_signatures(self, peter: note.Verifier) -> None:
        doubled = TEXT.encode() + b"\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG
        assert note.open_note(doubled, [peter]) == (TEXT, ["PeterNeumann"])

    @pytest.mark.parametrize(
        "message",
        [
            # TestOpen's badMsgs.
            TEXT.encode(),
            TEXT.encode() + b"\n",
            TEXT.encode() + b"\n" + PETER_SIG[:-1],
            b"\x01" + TEXT.encode() + b"\n" + PETER_SIG,
            b"\xff" + TEXT.encode() + b"\n" + PETER_SIG,
            TEXT.encode() + b"\n" + "\u2014 Bad Name ".encode() + PETER_SIG.split(b" ")[2][:-1],
            TEXT.encode() + b"\n" + PETER_SIG + b"Unexpected line.\n",
            # TestOpen: too many signatures.
            TEXT.encode() + b"\n" + PETER_SIG * 101,
        ],
    )
    def test_malformed(self, peter: note.Verifier, message: bytes) -> None:
        with pytest.raises(note.MalformedNoteError):
            note.open_note(message, [peter])


class TestTampering:
    def test_modified_text(self, peter: note.Verifier) -> None:
        tampered = PETER_NOTE.replace(b"don't know", b"do know")
        with pytest.raises(note.InvalidSignatureError):
            note.open_note(tampered, [peter])

    @pytest.mark.parametrize("byte", [0, 31, 63])
    def test_modified_signature(self, peter: note.Verifier, byte: int) -> None:
        raw = bytearray(base64.b64decode(PETER_SIG.split(b" ")[2]))
        raw[4 + byte] ^= 0x01
        tampered = (
            TEXT.encode() + b"\n" + signature_line("PeterNeumann", 0xC74F20A3, bytes(raw[4:]))
        )
        with pytest.raises(note.InvalidSignatureError):
            note.open_note(tampered, [peter])

    def test_truncated_signature(self, peter: note.Verifier) -> None:
        raw = base64.b64decode(PETER_SIG.split(b" ")[2])
        tampered = TEXT.encode() + b"\n" + signature_line("PeterNeumann", 0xC74F20A3, raw[4:-1])
        with pytest.raises(note.InvalidSignatureError):
            note.open_note(tampered, [peter])

    def test_wrong_key_claiming_a_known_name_and_id(self, peter: note.Verifier) -> None:
        forger = note.Signer.generate("PeterNeumann")
        forged = signature_line("PeterNeumann", peter.key_id, forger.sign_message(TEXT.encode()))
        with pytest.raises(note.InvalidSignatureError):
            note.open_note(TEXT.encode() + b"\n" + forged, [peter])

    def test_wrong_key_under_its_own_id_is_unknown(self, peter: note.Verifier) -> None:
        forger = note.Signer.generate("PeterNeumann")
        with pytest.raises(note.UnverifiedNoteError):
            note.open_note(note.sign(TEXT, forger), [peter])

    def test_same_id_other_name_is_unknown(self, peter: note.Verifier) -> None:
        renamed = PETER_NOTE.replace(b"\xe2\x80\x94 PeterNeumann", b"\xe2\x80\x94 PeterNeuman")
        with pytest.raises(note.UnverifiedNoteError):
            note.open_note(renamed, [peter])

    def test_no_blank_line(self, peter: note.Verifier) -> None:
        with pytest.raises(note.MalformedNoteError):
            note.open_note(TEXT.encode() + PETER_SIG, [peter])

    @pytest.mark.parametrize("char", [b"\x00", b"\t", b"\r", b"\x1b", b"\x1f"])
    def test_control_character(self, peter: note.Verifier, char: bytes) -> None:
        with pytest.raises(note.MalformedNoteError):
            note.open_note(PETER_NOTE.replace(b"problem,", b"problem," + char), [peter])

    @pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80"])
    def test_not_utf8(self, peter: note.Verifier, bad: bytes) -> None:
        with pytest.raises(note.MalformedNoteError):
            note.open_note(PETER_NOTE.replace(b"problem,", b"problem," + bad), [peter])

    def test_signature_line_without_space_after_dash(self, peter: note.Verifier) -> None:
        with pytest.raises(note.MalformedNoteError):
            note.open_note(PETER_NOTE.replace(b"\xe2\x80\x94 ", b"\xe2\x80\x94"), [peter])

    def test_signature_with_a_hyphen_instead_of_em_dash(self, peter: note.Verifier) -> None:
        with pytest.raises(note.MalformedNoteError):
            note.open_note(PETER_NOTE.replace(b"\xe2\x80\x94 ", b"- "), [peter])

    def test_non_canonical_base64(self, peter: note.Verifier) -> None:
        # 68 bytes leave two spare bits in the last base64 character: "M=" and "N=" decode
        # alike, but only the first is canonical.
        assert PETER_SIG.endswith(b"AM=\n")
        with pytest.raises(note.MalformedNoteError):
            note.open_note(PETER_NOTE.replace(b"AM=\n", b"AN=\n"), [peter])


class TestRoundTrip:
    def test_sign_and_open(self) -> None:
        signer = note.Signer.generate("bastion.example/audit")
        text = "bastion.example/audit\n3\nroot\n"
        assert note.open_note(note.sign(text, signer), [signer.verifier()]) == (
            text,
            ["bastion.example/audit"],
        )

    def test_several_signers_and_blank_lines_in_the_text(self) -> None:
        log, witness = note.Signer.generate("log"), note.Signer.generate("witness")
        text = "first paragraph\n\nsecond, \u00e8 non-ASCII\n\n"
        signed = note.sign(text, log, witness)
        assert note.open_note(signed, [log.verifier()]) == (text, ["log"])
        assert note.open_note(signed, [witness.verifier(), log.verifier()]) == (
            text,
            ["log", "witness"],
        )

    def test_one_bad_known_signature_spoils_the_note(self) -> None:
        log, witness = note.Signer.generate("log"), note.Signer.generate("witness")
        good = note.sign("text\n", log)
        bad = signature_line("witness", witness.key_id, witness.sign_message(b"other\n"))
        with pytest.raises(note.InvalidSignatureError):
            note.open_note(good + bad, [log.verifier(), witness.verifier()])
        assert note.open_note(good + bad, [log.verifier()]) == ("text\n", ["log"])

    @pytest.mark.parametrize("text", ["no newline", "", "tab\there\n", "cr\r\n", "\ud800\n"])
    def test_sign_refuses_bad_text(self, text: str) -> None:
        with pytest.raises(note.MalformedNoteError):
            note.sign(text, note.Signer.generate("log"))

    def test_sign_needs_a_signer(self) -> None:
        with pytest.raises(ValueError):
            note.sign("text\n")

    def test_ambiguous_verifiers(self, peter: note.Verifier) -> None:
        impostor = object.__new__(note.Verifier)
        object.__setattr__(impostor, "name", peter.name)
        object.__setattr__(impostor, "key_id", peter.key_id)
        object.__setattr__(impostor, "public_key", bytes(32))
        with pytest.raises(ValueError, match="share"):
            note.open_note(PETER_NOTE, [peter, impostor])
        assert note.open_note(PETER_NOTE, [peter, peter]) == (TEXT, ["PeterNeumann"])

    def test_errors_are_value_errors(self) -> None:
        for error in (
            note.MalformedNoteError,
            note.UnverifiedNoteError,
            note.InvalidSignatureError,
            note.MalformedKeyError,
        ):
            assert issubclass(error, ValueError)


class TestPublishedExamples:
    """The C2SP examples are well-formed notes; with no key for them, none verifies."""

    @pytest.mark.parametrize("message", [QUASIMODO_NOTE, SOFA_NOTE], ids=["quasimodo", "sofa"])
    def test_parse_but_do_not_verify(self, peter: note.Verifier, message: bytes) -> None:
        with pytest.raises(note.UnverifiedNoteError):
            note.open_note(message, [peter])
