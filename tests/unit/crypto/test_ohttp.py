"""Tests for OHTTP encapsulation: RFC 9458 Appendix A and the chunked draft's example, byte for
byte, then round trips and every refusal the gateway and client rely on.

Sources: RFC 9458 Appendix A ("Complete Example of a Request and Response");
draft-ietf-ohai-chunked-ohttp Appendix A ("Example"), from the working group's repository
(github.com/ietf-wg-ohai/draft-ohai-chunked-ohttp, draft-ietf-ohai-chunked-ohttp.md).
"""

from __future__ import annotations

import struct

import pytest

from bastion.crypto import hpke, ohttp

AES = hpke.AEAD_AES_128_GCM
CHACHA = hpke.AEAD_CHACHA20_POLY1305
SHA256 = hpke.KDF_HKDF_SHA256
X25519 = hpke.KEM_X25519_SHA256


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# --- RFC 9458 Appendix A ----------------------------------------------------------------------

RFC_SK_R = unhex("3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a")
RFC_KEY_CONFIG = unhex(
    "01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e79815500080001000100010003"
)
RFC_REQUEST = unhex("00034745540568747470730b6578616d706c652e636f6d012f")
RFC_SK_E = unhex("bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73")
RFC_PK_E = unhex("4b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472")
RFC_INFO = unhex("6d6573736167652f626874747020726571756573740001002000010001")
RFC_ENC_REQUEST = unhex(
    "010020000100014b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad1"
    "9dec96c208b4726374e469135906992e1268c594d2a10c695d858c40a026e796"
    "5e7d86b83dd440b2c0185204b4d63525"
)
RFC_RESPONSE = unhex("0140c8")
RFC_SECRET = unhex("62d87a6ba569ee81014c2641f52bea36")
RFC_RESPONSE_NONCE = unhex("c789e7151fcba46158ca84b04464910d")
RFC_PRK = unhex("979aaeae066cf211ab407b31ae49767f344e1501e475c84e8aff547cc5a683db")
RFC_AEAD_KEY = unhex("5d0172a080e428b16d298c4ea0db620d")
RFC_AEAD_NONCE = unhex("f6bf1aeb88d6df87007fa263")
RFC_ENC_RESPONSE = unhex("c789e7151fcba46158ca84b04464910d86f9013e404feea014e7be4a441f234f857fbd")


def rfc_gateway_key() -> ohttp.GatewayKey:
    private = hpke.PrivateKey.from_bytes(X25519, RFC_SK_R)
    return ohttp.GatewayKey(1, private, ((SHA256, AES), (SHA256, CHACHA)))


def test_rfc9458_key_configuration() -> None:
    config = rfc_gateway_key().config()
    assert config.encode() == RFC_KEY_CONFIG
    decoded = ohttp.KeyConfig.decode(RFC_KEY_CONFIG)
    assert decoded == config
    assert decoded.key_id == 1
    assert decoded.suites == ((SHA256, AES), (SHA256, CHACHA))
    assert config.fingerprint().startswith("sha256:")
    assert len(config.fingerprint()) == len("sha256:") + 64
    assert config.fingerprint() == decoded.fingerprint()


def test_rfc9458_encapsulated_request_byte_for_byte() -> None:
    config = ohttp.KeyConfig.decode(RFC_KEY_CONFIG)
    ephemeral = hpke.PrivateKey.from_bytes(X25519, RFC_SK_E)
    assert ephemeral.public_bytes() == RFC_PK_E
    assert ohttp.REQUEST_LABEL + b"\x00" + RFC_ENC_REQUEST[:7] == RFC_INFO
    request, _ = ohttp.encapsulate_request(config, RFC_REQUEST, ephemeral_key=ephemeral)
    assert request == RFC_ENC_REQUEST
    header = ohttp.parse_request_header(request)
    assert (header.key_id, header.kem_id, header.kdf_id, header.aead_id) == (1, X25519, 1, 1)
    assert header.enc == RFC_PK_E
    assert header.size == 7 + 32


def test_rfc9458_decapsulation_and_response_byte_for_byte() -> None:
    plaintext, server = ohttp.decapsulate_request({1: rfc_gateway_key()}, RFC_ENC_REQUEST)
    assert plaintext == RFC_REQUEST
    response = server.seal(RFC_RESPONSE, response_nonce=RFC_RESPONSE_NONCE)
    assert response == RFC_ENC_RESPONSE
    with pytest.raises(ohttp.OhttpError):
        server.seal(RFC_RESPONSE)  # A response is sealed once.


def test_rfc9458_client_opens_the_response() -> None:
    config = ohttp.KeyConfig.decode(RFC_KEY_CONFIG)
    ephemeral = hpke.PrivateKey.from_bytes(X25519, RFC_SK_E)
    _, client = ohttp.encapsulate_request(config, RFC_REQUEST, ephemeral_key=ephemeral)
    assert client.open(RFC_ENC_RESPONSE) == RFC_RESPONSE


def test_rfc9458_intermediate_response_values() -> None:
    suite = hpke.Suite(X25519, SHA256, AES)
    private = hpke.PrivateKey.from_bytes(X25519, RFC_SK_R)
    context = hpke.setup_recipient(suite, private, RFC_PK_E, RFC_INFO)
    secret = context.export(ohttp.RESPONSE_LABEL, 16)
    assert secret == RFC_SECRET
    prk = hpke.kdf_extract(SHA256, RFC_PK_E + RFC_RESPONSE_NONCE, secret)
    assert prk == RFC_PRK
    assert hpke.kdf_expand(SHA256, prk, b"key", 16) == RFC_AEAD_KEY
    assert hpke.kdf_expand(SHA256, prk, b"nonce", 12) == RFC_AEAD_NONCE
    sealed = hpke.aead_seal(AES, RFC_AEAD_KEY, RFC_AEAD_NONCE, RFC_RESPONSE)
    assert RFC_RESPONSE_NONCE + sealed == RFC_ENC_RESPONSE


def test_rfc9458_request_with_ikm_e_is_deterministic() -> None:
    config = ohttp.KeyConfig.decode(RFC_KEY_CONFIG)
    first, _ = ohttp.encapsulate_request(config, RFC_REQUEST, ikm_e=b"\x07" * 32)
    second, _ = ohttp.encapsulate_request(config, RFC_REQUEST, ikm_e=b"\x07" * 32)
    assert first == second
    plaintext, _ = ohttp.decapsulate_request({1: rfc_gateway_key()}, first)
    assert plaintext == RFC_REQUEST


# --- draft-ietf-ohai-chunked-ohttp Appendix A -------------------------------------------------

CHUNKED_SK_R = unhex("1c190d72acdbe4dbc69e680503bb781a932c70a12c8f3754434c67d8640d8698")
CHUNKED_KEY_CONFIG = unhex(
    "010020668eb21aace159803974a4c67f08b4152d29bed10735fd08f98ccdd6fe09570800080001000100010003"
)
CHUNKED_SK_E = unhex("b26d565f3f875ed480d1abced3d665159650c99174fd0b124ac4bda0c64ae324")
CHUNKED_ENC_REQUEST = unhex(
    """01002000010001
    8811eb457e100811c40a0aa71340a1b81d804bb986f736f2f566a7199761a032
    1c2ad24942d4d692563012f2980c8fef437a336b9b2fc938ef77a5834f
    1d2e33d8fd25577afe31bd1c79d094f76b6250ae6549b473ecd950501311
    001c6c1395d0ef7c1022297966307b8a7f"""
)
CHUNKED_RESPONSE_NONCE = unhex("bcce7f4cb921309ba5d62edf1769ef09")
CHUNKED_ENC_RESPONSE = unhex(
    """bcce7f4cb921309ba5d62edf1769ef09
    1179bf1cc87fa0e2c02de4546945aa3d1e48
    12b348b5bd4c594c16b6170b07b475845d1f32
    00ed9d8a796617a5b27265f4d73247f639"""
)


def chunked_gateway_key() -> ohttp.GatewayKey:
    return ohttp.GatewayKey(1, hpke.PrivateKey.from_bytes(X25519, CHUNKED_SK_R))


def test_chunked_draft_example_byte_for_byte() -> None:
    config = chunked_gateway_key().config()
    assert config.encode() == CHUNKED_KEY_CONFIG
    ephemeral = hpke.PrivateKey.from_bytes(X25519, CHUNKED_SK_E)
    chunks = [RFC_REQUEST[:12], RFC_REQUEST[12:], b""]
    request, client = ohttp.encapsulate_chunked_request(config, chunks, ephemeral_key=ephemeral)
    assert request == CHUNKED_ENC_REQUEST

    plaintext, server = ohttp.decapsulate_chunked_request({1: chunked_gateway_key()}, request)
    assert plaintext == RFC_REQUEST
    response = b"".join(
        (
            server.start(response_nonce=CHUNKED_RESPONSE_NONCE),
            server.seal_chunk(RFC_RESPONSE[:1]),
            server.seal_chunk(RFC_RESPONSE[1:]),
            server.seal_final(b""),
        )
    )
    assert response == CHUNKED_ENC_RESPONSE

    opener = client.opener()
    assert opener.feed(CHUNKED_ENC_RESPONSE) == [RFC_RESPONSE[:1], RFC_RESPONSE[1:]]
    assert not opener.done
    assert opener.finish() == b""
    assert opener.done


# --- round trips ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway() -> ohttp.GatewayKey:
    return ohttp.GatewayKey.generate(7)


@pytest.mark.parametrize("aead_id", [AES, CHACHA])
def test_round_trip_both_suites(gateway: ohttp.GatewayKey, aead_id: int) -> None:
    config = ohttp.decode_key_configs(ohttp.encode_key_configs([gateway.config()]))[0]
    suite = config.select_suite([aead_id])
    assert suite.aead_id == aead_id
    request, client = ohttp.encapsulate_request(config, b"hello gateway", suite=suite)
    assert ohttp.parse_request_header(request).aead_id == aead_id
    plaintext, server = ohttp.decapsulate_request({7: gateway}, request)
    assert plaintext == b"hello gateway"
    assert client.open(server.seal(b"hello client")) == b"hello client"


def other_exchange_response(
    gateway: ohttp.GatewayKey, config: ohttp.KeyConfig, suite: hpke.Suite
) -> bytes:
    # A second exchange's response must not open with the first exchange's client context.
    request, _ = ohttp.encapsulate_request(config, b"", suite=suite)
    _, server = ohttp.decapsulate_request({7: gateway}, request)
    return server.seal(b"")


def test_each_request_has_a_fresh_enc(gateway: ohttp.GatewayKey) -> None:
    config = gateway.config()
    first, _ = ohttp.encapsulate_request(config, b"same")
    second, _ = ohttp.encapsulate_request(config, b"same")
    # The gateway detects replays by enc, so it must differ between requests.
    assert ohttp.parse_request_header(first).enc != ohttp.parse_request_header(second).enc
    assert ohttp.parse_request_header(first).enc == ohttp.parse_request_header(first).enc


def test_response_from_another_exchange_fails(gateway: ohttp.GatewayKey) -> None:
    config = gateway.config()
    _, client = ohttp.encapsulate_request(config, b"one")
    other = other_exchange_response(gateway, config, config.select_suite())
    with pytest.raises(ohttp.DecryptionFailed):
        client.open(other)


def test_select_suite_preferences() -> None:
    config = ohttp.KeyConfig(3, X25519, bytes(32), ((0x0002, AES), (SHA256, CHACHA), (SHA256, AES)))
    assert config.select_suite() == hpke.Suite(X25519, SHA256, CHACHA)  # first supported
    assert config.select_suite([AES]) == hpke.Suite(X25519, SHA256, AES)
    assert config.select_suite([0x0002]) == hpke.Suite(X25519, SHA256, CHACHA)  # soft
    only_unsupported = ohttp.KeyConfig(3, X25519, bytes(32), ((SHA256, 0x0002),))
    with pytest.raises(ohttp.UnsupportedSuite):
        only_unsupported.select_suite()


@pytest.mark.parametrize("aead_id", [AES, CHACHA])
def test_chunked_round_trip_many_chunks(gateway: ohttp.GatewayKey, aead_id: int) -> None:
    config = gateway.config()
    suite = config.select_suite([aead_id])
    # Sizes cross the 1-, 2- and 4-byte varint boundaries (63/64, 16383/16384 bytes sealed).
    sizes = [1, 47, 48, 100, 16367, 16368, 20000, 3] + [5] * 40
    chunks = [bytes([index % 251]) * size for index, size in enumerate(sizes)] + [b"tail"]
    request, client = ohttp.encapsulate_chunked_request(config, chunks, suite=suite)
    plaintext, server = ohttp.decapsulate_chunked_request({7: gateway}, request)
    assert plaintext == b"".join(chunks)

    response_chunks = [b"r%d" % index * (index + 1) for index in range(60)]
    stream = server.start() + b"".join(server.seal_chunk(c) for c in response_chunks)
    stream += server.seal_final(b"last")
    opener = client.opener()
    received = opener.feed(stream)
    assert received == response_chunks
    assert opener.finish() == b"last"


def test_chunked_request_edge_shapes(gateway: ohttp.GatewayKey) -> None:
    config = gateway.config()
    for chunks in ([], [b""], [b"only final"], [b"a", b""]):
        request, _ = ohttp.encapsulate_chunked_request(config, chunks)
        plaintext, _ = ohttp.decapsulate_chunked_request({7: gateway}, request)
        assert plaintext == b"".join(chunks)
    with pytest.raises(ValueError):
        ohttp.encapsulate_chunked_request(config, [b"a", b"", b"c"])


def chunked_exchange(gateway: ohttp.GatewayKey) -> tuple[bytes, ohttp.ChunkedClientResponseContext]:
    request, client = ohttp.encapsulate_chunked_request(gateway.config(), [b"q"])
    _, server = ohttp.decapsulate_chunked_request({7: gateway}, request)
    # A 70-byte chunk gets a 2-byte length, so some splits fall inside a varint.
    stream = b"".join(
        (
            server.start(),
            server.seal_chunk(b"a"),
            server.seal_chunk(bytes(range(70))),
            server.seal_chunk(b"bc"),
            server.seal_final(b"end"),
        )
    )
    return stream, client


EXPECTED_RESPONSE = [b"a", bytes(range(70)), b"bc"]


def test_chunked_response_split_at_every_offset(gateway: ohttp.GatewayKey) -> None:
    stream, client = chunked_exchange(gateway)
    for split in range(len(stream) + 1):
        opener = client.opener()
        received = opener.feed(stream[:split]) + opener.feed(stream[split:])
        assert received == EXPECTED_RESPONSE, f"split at {split}"
        assert opener.finish() == b"end"
        assert opener.done


def test_chunked_response_byte_by_byte(gateway: ohttp.GatewayKey) -> None:
    stream, client = chunked_exchange(gateway)
    opener = client.opener()
    received: list[bytes] = []
    for index in range(len(stream)):
        received += opener.feed(stream[index : index + 1])
    assert received == EXPECTED_RESPONSE
    assert opener.finish() == b"end"


def test_chunk_lengths_in_longer_varint_forms_are_accepted(gateway: ohttp.GatewayKey) -> None:
    # The draft leaves the choice of varint encoding unauthenticated, so 0x4011 means 17.
    request, client = ohttp.encapsulate_chunked_request(gateway.config(), [b"q"])
    _, server = ohttp.decapsulate_chunked_request({7: gateway}, request)
    nonce = server.start()
    chunk = server.seal_chunk(b"x")  # 1-byte length 17
    final = server.seal_final(b"y")
    stream = nonce + struct.pack(">H", 0x4000 | (len(chunk) - 1)) + chunk[1:] + b"\x40\x00"
    stream += final[1:]
    opener = client.opener()
    assert opener.feed(stream) == [b"x"]
    assert opener.finish() == b"y"


# --- refusals: requests ----------------------------------------------------------------------


def test_unknown_key_id(gateway: ohttp.GatewayKey) -> None:
    request, _ = ohttp.encapsulate_request(gateway.config(), b"x")
    with pytest.raises(ohttp.UnknownKey):
        ohttp.decapsulate_request({8: gateway}, request)
    with pytest.raises(ohttp.UnknownKey):
        ohttp.decapsulate_request({7: gateway}, b"\x08" + request[1:])
    with pytest.raises(ohttp.UnknownKey):
        ohttp.decapsulate_request({}, request)
    chunked, _ = ohttp.encapsulate_chunked_request(gateway.config(), [b"x"])
    with pytest.raises(ohttp.UnknownKey):
        ohttp.decapsulate_chunked_request({8: gateway}, chunked)


@pytest.mark.parametrize(
    ("kem_id", "kdf_id", "aead_id"),
    [(X25519, 0x0002, AES), (X25519, SHA256, 0x0002), (X25519, SHA256, 0xFFFF), (0x0010, 1, 1)],
)
def test_unsupported_kem_kdf_or_aead(
    gateway: ohttp.GatewayKey, kem_id: int, kdf_id: int, aead_id: int
) -> None:
    request, _ = ohttp.encapsulate_request(gateway.config(), b"x")
    forged = struct.pack(">BHHH", 7, kem_id, kdf_id, aead_id) + request[7:]
    with pytest.raises(ohttp.UnsupportedSuite):
        ohttp.decapsulate_request({7: gateway}, forged)


def test_suite_the_key_does_not_accept(gateway: ohttp.GatewayKey) -> None:
    aes_only = ohttp.GatewayKey(9, gateway.private_key, ((SHA256, AES),))
    chacha_config = ohttp.KeyConfig(9, X25519, gateway.private_key.public_bytes(), ((1, CHACHA),))
    request, _ = ohttp.encapsulate_request(chacha_config, b"x")
    with pytest.raises(ohttp.UnsupportedSuite):
        ohttp.decapsulate_request({9: aes_only}, request)
    with pytest.raises(ohttp.UnsupportedSuite):
        ohttp.encapsulate_request(aes_only.config(), b"x", suite=hpke.Suite(X25519, 1, CHACHA))
    with pytest.raises(ValueError):
        ohttp.GatewayKey(9, gateway.private_key, ((SHA256, 0x0002),))


def test_truncated_header(gateway: ohttp.GatewayKey) -> None:
    request, _ = ohttp.encapsulate_request(gateway.config(), b"x")
    for size in (0, 1, 6, 7, 7 + 31):
        with pytest.raises(ohttp.MalformedMessage):
            ohttp.parse_request_header(request[:size])
        with pytest.raises(ohttp.MalformedMessage):
            ohttp.decapsulate_request({7: gateway}, request[:size])
        with pytest.raises(ohttp.MalformedMessage):
            ohttp.decapsulate_chunked_request({7: gateway}, request[:size])


def test_truncated_ciphertext(gateway: ohttp.GatewayKey) -> None:
    request, _ = ohttp.encapsulate_request(gateway.config(), b"some request")
    with pytest.raises(ohttp.DecryptionFailed):
        ohttp.decapsulate_request({7: gateway}, request[:-1])
    with pytest.raises(ohttp.MalformedMessage):
        ohttp.decapsulate_request({7: gateway}, request[: 7 + 32 + 15])


def test_flipped_bit_in_request(gateway: ohttp.GatewayKey) -> None:
    request, _ = ohttp.encapsulate_request(gateway.config(), b"some request")
    for index in range(7, len(request)):  # enc and ciphertext; header flips are tested above
        forged = bytearray(request)
        forged[index] ^= 0x80
        with pytest.raises(ohttp.DecryptionFailed):
            ohttp.decapsulate_request({7: gateway}, bytes(forged))


def test_chunked_request_tampering(gateway: ohttp.GatewayKey) -> None:
    config = gateway.config()
    request, _ = ohttp.encapsulate_chunked_request(config, [b"first", b"second", b"last"])
    header = request[:39]
    first = request[39 : 39 + 1 + 21]
    second = request[39 + 22 : 39 + 22 + 1 + 22]
    final = request[39 + 22 + 23 :]
    assert final[0] == 0 and len(final) == 1 + 4 + 16
    keys = {7: gateway}
    with pytest.raises(ohttp.DecryptionFailed):  # reordered chunks
        ohttp.decapsulate_chunked_request(keys, header + second + first + final)
    with pytest.raises(ohttp.DecryptionFailed):  # dropped final chunk
        ohttp.decapsulate_chunked_request(keys, header + first + second)
    with pytest.raises(ohttp.DecryptionFailed):  # extra data after the final chunk
        ohttp.decapsulate_chunked_request(keys, request + b"\x00")
    with pytest.raises(ohttp.DecryptionFailed):  # final chunk without its "final" AAD
        relabelled = bytes([len(final) - 1]) + final[1:]
        ohttp.decapsulate_chunked_request(keys, header + first + second + relabelled + b"\x00")
    with pytest.raises(ohttp.MalformedMessage):  # chunk cut short
        ohttp.decapsulate_chunked_request(keys, header + first + second[:-3])
    forged = bytearray(request)
    forged[50] ^= 1
    with pytest.raises(ohttp.DecryptionFailed):
        ohttp.decapsulate_chunked_request(keys, bytes(forged))
    # A chunked request is not a plain request, and vice versa: the labels differ.
    with pytest.raises(ohttp.DecryptionFailed):
        ohttp.decapsulate_request(keys, request)
    plain, _ = ohttp.encapsulate_request(config, b"x")
    with pytest.raises((ohttp.DecryptionFailed, ohttp.MalformedMessage)):
        ohttp.decapsulate_chunked_request(keys, plain)


def test_empty_non_final_request_chunk_is_a_decryption_error(gateway: ohttp.GatewayKey) -> None:
    config = gateway.config()
    suite = config.select_suite()
    hdr = struct.pack(">BHHH", 7, suite.kem_id, suite.kdf_id, suite.aead_id)
    info = ohttp.CHUNKED_REQUEST_LABEL + b"\x00" + hdr
    enc, sender = hpke.setup_sender(suite, config.public_key, info)
    empty = sender.seal(b"")
    final = sender.seal(b"x", ohttp.FINAL_CHUNK_AAD)
    request = hdr + enc + bytes([len(empty)]) + empty + b"\x00" + final
    with pytest.raises(ohttp.DecryptionFailed):
        ohttp.decapsulate_chunked_request({7: gateway}, request)


# --- refusals: responses ----------------------------------------------------------------------


def test_flipped_bit_in_response(gateway: ohttp.GatewayKey) -> None:
    request, client = ohttp.encapsulate_request(gateway.config(), b"q")
    _, server = ohttp.decapsulate_request({7: gateway}, request)
    response = server.seal(b"an answer")
    assert client.open(response) == b"an answer"
    for index in range(len(response)):  # nonce, ciphertext and tag
        forged = bytearray(response)
        forged[index] ^= 0x01
        with pytest.raises(ohttp.DecryptionFailed):
            client.open(bytes(forged))
    with pytest.raises(ohttp.DecryptionFailed):
        client.open(response[:-1])
    with pytest.raises(ohttp.MalformedMessage):
        client.open(response[: 16 + 15])


def split_stream(stream: bytes) -> tuple[bytes, list[bytes], bytes]:
    """Nonce, non-final chunks (with their 1-byte lengths), and the final chunk."""
    pos = 16
    chunks = []
    while stream[pos] != 0:
        length = stream[pos]
        assert length < 64
        chunks.append(stream[pos : pos + 1 + length])
        pos += 1 + length
    return stream[:16], chunks, stream[pos:]


def short_exchange(gateway: ohttp.GatewayKey) -> tuple[bytes, ohttp.ChunkedClientResponseContext]:
    request, client = ohttp.encapsulate_chunked_request(gateway.config(), [b"q"])
    _, server = ohttp.decapsulate_chunked_request({7: gateway}, request)
    stream = server.start() + server.seal_chunk(b"one") + server.seal_chunk(b"two")
    return stream + server.seal_final(b"three"), client


def test_chunked_response_reordering_fails(gateway: ohttp.GatewayKey) -> None:
    stream, client = short_exchange(gateway)
    nonce, (one, two), final = split_stream(stream)
    opener = client.opener()
    with pytest.raises(ohttp.DecryptionFailed):
        opener.feed(nonce + two + one + final)
    with pytest.raises(ohttp.DecryptionFailed):  # a failed opener stays failed
        opener.feed(b"")


def test_chunked_response_truncation_is_detected(gateway: ohttp.GatewayKey) -> None:
    stream, client = short_exchange(gateway)
    nonce, (one, two), final = split_stream(stream)
    for truncated in (nonce + one + two, nonce + one + two[:-1], nonce[:5], b""):
        opener = client.opener()
        opener.feed(truncated)
        with pytest.raises(ohttp.DecryptionFailed):
            opener.finish()
        assert not opener.done
    opener = client.opener()
    opener.feed(nonce + one + two + final[:-1])  # final chunk cut short
    with pytest.raises(ohttp.DecryptionFailed):
        opener.finish()


def test_chunked_response_extra_data_after_final(gateway: ohttp.GatewayKey) -> None:
    stream, client = short_exchange(gateway)
    opener = client.opener()
    assert opener.feed(stream + b"\x00") == [b"one", b"two"]
    with pytest.raises(ohttp.DecryptionFailed):
        opener.finish()


def test_chunked_response_final_without_final_aad_fails(gateway: ohttp.GatewayKey) -> None:
    stream, client = short_exchange(gateway)
    nonce, (one, two), _ = split_stream(stream)
    # Present the last non-final chunk as if it were the final one.
    opener = client.opener()
    opener.feed(nonce + one + b"\x00" + two[1:])
    with pytest.raises(ohttp.DecryptionFailed):
        opener.finish()


def test_chunked_response_flipped_bit(gateway: ohttp.GatewayKey) -> None:
    stream, client = short_exchange(gateway)
    for index in range(len(stream)):
        forged = bytearray(stream)
        forged[index] ^= 0x01
        opener = client.opener()
        with pytest.raises((ohttp.DecryptionFailed, ohttp.MalformedMessage)):
            opener.feed(bytes(forged))
            opener.finish()


def test_empty_non_final_response_chunk_is_a_decryption_error(gateway: ohttp.GatewayKey) -> None:
    # Build the response by hand from the draft's key schedule, since seal_chunk refuses b"".
    request, client = ohttp.encapsulate_chunked_request(gateway.config(), [b"q"])
    header = ohttp.parse_request_header(request)
    info = ohttp.CHUNKED_REQUEST_LABEL + b"\x00" + request[:7]
    context = hpke.setup_recipient(header.suite, gateway.private_key, header.enc, info)
    response_nonce = bytes(range(16))
    secret = context.export(ohttp.CHUNKED_RESPONSE_LABEL, 16)
    prk = hpke.kdf_extract(SHA256, header.enc + response_nonce, secret)
    key = hpke.kdf_expand(SHA256, prk, b"key", 16)
    nonce = hpke.kdf_expand(SHA256, prk, b"nonce", 12)
    good = hpke.aead_seal(header.aead_id, key, nonce, b"hi")
    opener = client.opener()
    assert opener.feed(response_nonce + bytes([len(good)]) + good) == [b"hi"]
    second_nonce = (int.from_bytes(nonce, "big") ^ 1).to_bytes(12, "big")
    empty = hpke.aead_seal(header.aead_id, key, second_nonce, b"")
    with pytest.raises(ohttp.DecryptionFailed):
        opener.feed(bytes([len(empty)]) + empty)


def test_chunked_response_oversized_chunk_length_is_refused(gateway: ohttp.GatewayKey) -> None:
    stream, client = short_exchange(gateway)
    opener = client.opener(max_chunk_size=1024)
    with pytest.raises(ohttp.MalformedMessage):
        opener.feed(stream[:16] + b"\xbf\xff\xff\xff")  # a 4-byte varint near 2**30


def test_chunked_server_refuses_misuse(gateway: ohttp.GatewayKey) -> None:
    request, _ = ohttp.encapsulate_chunked_request(gateway.config(), [b"q"])
    _, server = ohttp.decapsulate_chunked_request({7: gateway}, request)
    with pytest.raises(ohttp.OhttpError):
        server.seal_chunk(b"before start")
    server.start()
    with pytest.raises(ohttp.OhttpError):
        server.start()
    with pytest.raises(ValueError):
        server.seal_chunk(b"")
    server.seal_final(b"done")
    with pytest.raises(ohttp.OhttpError):
        server.seal_chunk(b"after final")
    with pytest.raises(ohttp.OhttpError):
        server.seal_final(b"again")


# --- key configuration lists -----------------------------------------------------------------


def test_key_config_list_round_trip(gateway: ohttp.GatewayKey) -> None:
    configs = [gateway.config(), ohttp.KeyConfig.decode(RFC_KEY_CONFIG)]
    body = ohttp.encode_key_configs(configs)
    assert body[:2] == len(configs[0].encode()).to_bytes(2, "big")
    assert ohttp.decode_key_configs(body) == configs


def unknown_kem_config() -> bytes:
    # A well-formed configuration for P-256 (Npk = 65), which this code does not support.
    return struct.pack(">BH", 4, 0x0010) + b"\x04" * 65 + struct.pack(">HHH", 4, 1, 1)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00",
        b"\x00\x00",
        len(RFC_KEY_CONFIG).to_bytes(2, "big") + RFC_KEY_CONFIG[:-1],
        (len(RFC_KEY_CONFIG) + 1).to_bytes(2, "big") + RFC_KEY_CONFIG,
        len(RFC_KEY_CONFIG).to_bytes(2, "big") + RFC_KEY_CONFIG + b"\x00",
        (len(RFC_KEY_CONFIG) - 1).to_bytes(2, "big") + RFC_KEY_CONFIG[:-1],
    ],
    ids=["empty", "short-prefix", "zero-length", "short", "long-prefix", "trailing", "inner"],
)
def test_malformed_key_config_lists(body: bytes) -> None:
    with pytest.raises(ohttp.MalformedKeyConfig):
        ohttp.decode_key_configs(body)


@pytest.mark.parametrize(
    "config",
    [
        RFC_KEY_CONFIG[:2],
        RFC_KEY_CONFIG[:36],
        RFC_KEY_CONFIG[:35] + b"\x00\x00",  # no algorithms
        RFC_KEY_CONFIG[:35] + b"\x00\x06" + RFC_KEY_CONFIG[37:43],  # not a multiple of 4
        RFC_KEY_CONFIG[:35] + b"\x00\x0c" + RFC_KEY_CONFIG[37:],  # claims more than present
        RFC_KEY_CONFIG + b"\x00\x01\x00\x01",  # trailing bytes
    ],
)
def test_malformed_single_key_config(config: bytes) -> None:
    with pytest.raises(ohttp.MalformedKeyConfig):
        ohttp.KeyConfig.decode(config)


def test_unknown_kem_configs_are_skipped_not_fatal() -> None:
    with pytest.raises(ohttp.UnsupportedSuite):
        ohttp.KeyConfig.decode(unknown_kem_config())
    unknown = unknown_kem_config()
    body = len(unknown).to_bytes(2, "big") + unknown
    assert ohttp.decode_key_configs(body) == []
    body += len(RFC_KEY_CONFIG).to_bytes(2, "big") + RFC_KEY_CONFIG
    assert ohttp.decode_key_configs(body) == [ohttp.KeyConfig.decode(RFC_KEY_CONFIG)]


def test_key_config_validation() -> None:
    with pytest.raises(ohttp.MalformedKeyConfig):
        ohttp.KeyConfig(256, X25519, bytes(32), ((1, 1),))
    with pytest.raises(ohttp.MalformedKeyConfig):
        ohttp.KeyConfig(1, X25519, bytes(31), ((1, 1),))
    with pytest.raises(ohttp.MalformedKeyConfig):
        ohttp.KeyConfig(1, X25519, bytes(32), ())
    with pytest.raises(ohttp.MalformedKeyConfig):
        ohttp.encode_key_configs([])


def test_gateway_key_repr_hides_the_secret(gateway: ohttp.GatewayKey) -> None:
    assert gateway.private_key.to_bytes().hex() not in repr(gateway)
    assert gateway.config().public_key == gateway.private_key.public_bytes()


def test_a_chunked_request_of_too_many_chunks_is_refused() -> None:
    key = ohttp.GatewayKey.generate(5)
    data, _ = ohttp.encapsulate_chunked_request(key.config(), [b"x"] * 40)
    assert ohttp.decapsulate_chunked_request({5: key}, data, max_chunks=40)[0] == b"x" * 40
    with pytest.raises(ohttp.MalformedMessage, match="too many"):
        ohttp.decapsulate_chunked_request({5: key}, data, max_chunks=39)
