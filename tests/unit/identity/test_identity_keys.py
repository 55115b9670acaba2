"""API key tokens: format, entropy, parsing, and the stored digest."""

from __future__ import annotations

import base64

import pytest

from bastion.errors import AuthenticationError
from bastion.identity.keys import (
    TOKEN_LENGTH,
    KeyHasher,
    generate_api_key,
    is_public_id,
    parse_api_key,
)

pytestmark = pytest.mark.unit


def test_generated_token_has_the_documented_format() -> None:
    issued = generate_api_key()
    assert issued.token == f"bsk_{issued.public_id}_{issued.secret}"
    assert len(issued.token) == TOKEN_LENGTH
    assert len(issued.public_id) == 16
    assert set(issued.public_id) <= set("0123456789abcdef")
    assert set(issued.secret) <= set("abcdefghijklmnopqrstuvwxyz234567")
    # The secret encodes 32 random bytes: 256 bits.
    raw = base64.b32decode(issued.secret.upper() + "====")
    assert len(raw) == 32
    assert parse_api_key(issued.token) == (issued.public_id, issued.secret)


def test_generated_keys_do_not_repeat() -> None:
    keys = [generate_api_key() for _ in range(500)]
    assert len({k.public_id for k in keys}) == 500
    assert len({k.secret for k in keys}) == 500
    # Every base32 symbol shows up across many secrets: the generator is not stuck.
    assert set("".join(k.secret for k in keys)) == set("abcdefghijklmnopqrstuvwxyz234567")


def test_repr_hides_the_secret() -> None:
    issued = generate_api_key()
    assert issued.secret not in repr(issued)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: "",
        lambda t: t[:-1],
        lambda t: t + "a",
        lambda t: "bsx_" + t[4:],
        lambda t: t.upper(),
        lambda t: t[:4] + "g" + t[5:],  # not hex in the public id
        lambda t: t[:20] + "-" + t[21:],  # wrong separator
        lambda t: t[:-1] + "1",  # '1' is not base32
        lambda t: t[:-1] + "é",
        lambda t: " " + t[:-1],
        lambda t: t * 100,
    ],
)
def test_malformed_tokens_are_refused(mutate: object) -> None:
    token = generate_api_key().token
    bad = mutate(token)  # type: ignore[operator]
    with pytest.raises(AuthenticationError) as info:
        parse_api_key(bad)
    assert token[21:] not in str(info.value)


def test_is_public_id() -> None:
    assert is_public_id("0123456789abcdef")
    assert not is_public_id("0123456789ABCDEF")
    assert not is_public_id("0123456789abcde")
    assert not is_public_id("../../etc/passwd")


def test_digest_verifies_only_the_right_secret_and_id() -> None:
    hasher = KeyHasher(b"h" * 32)
    issued = generate_api_key()
    digest = hasher.digest(issued.public_id, issued.secret)
    assert len(digest) == 32
    hasher.verify(issued.public_id, issued.secret, digest)  # does not raise
    other = generate_api_key()
    with pytest.raises(AuthenticationError):
        hasher.verify(issued.public_id, other.secret, digest)
    with pytest.raises(AuthenticationError):
        hasher.verify(other.public_id, issued.secret, digest)
    with pytest.raises(AuthenticationError):
        hasher.verify(issued.public_id, issued.secret, digest[:-1] + bytes([digest[-1] ^ 1]))


def test_digest_depends_on_the_hmac_key() -> None:
    issued = generate_api_key()
    first = KeyHasher(b"a" * 32).digest(issued.public_id, issued.secret)
    second = KeyHasher(b"b" * 32).digest(issued.public_id, issued.secret)
    assert first != second
    with pytest.raises(AuthenticationError):
        KeyHasher(b"b" * 32).verify(issued.public_id, issued.secret, first)


def test_short_hmac_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        KeyHasher(b"short")
