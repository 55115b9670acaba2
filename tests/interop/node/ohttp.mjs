// Oblivious HTTP (RFC 9458) and chunked OHTTP (draft-ietf-ohai-chunked-ohttp), written
// independently of Bastion's Python code: HPKE comes from @hpke/core, ChaCha20-Poly1305 from
// @hpke/chacha20poly1305, and HKDF-Extract from WebCrypto. Only the framing is ours.

import { Aes128Gcm, CipherSuite, DhkemX25519HkdfSha256, HkdfSha256 } from "@hpke/core";
import { Chacha20Poly1305 } from "@hpke/chacha20poly1305";

export const KEM_X25519_HKDF_SHA256 = 0x0020;
export const KDF_HKDF_SHA256 = 0x0001;
export const AEAD_AES_128_GCM = 0x0001;
export const AEAD_CHACHA20_POLY1305 = 0x0003;

/** The AEADs this client can use, by their CLI names. */
export const AEADS = {
  aes128gcm: { id: AEAD_AES_128_GCM, create: () => new Aes128Gcm() },
  chacha20poly1305: { id: AEAD_CHACHA20_POLY1305, create: () => new Chacha20Poly1305() },
};

const X25519_PUBLIC_KEY_SIZE = 32;
const REQUEST_LABEL = "message/bhttp request";
const RESPONSE_LABEL = "message/bhttp response";
export const CHUNKED_REQUEST_LABEL = "message/bhttp chunked request";
export const CHUNKED_RESPONSE_LABEL = "message/bhttp chunked response";
const FINAL_AAD = utf8("final");
const EMPTY = new Uint8Array(0);

export function utf8(text) {
  return new TextEncoder().encode(text);
}

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let at = 0;
  for (const part of parts) {
    out.set(new Uint8Array(part), at);
    at += part.byteLength;
  }
  return out;
}

export function hex(bytes) {
  return Buffer.from(bytes).toString("hex");
}

export function fromHex(text) {
  return new Uint8Array(Buffer.from(text, "hex"));
}

function u16(bytes, at) {
  if (at + 2 > bytes.length) throw new Error("truncated key configuration");
  return (bytes[at] << 8) | bytes[at + 1];
}

/** Parse an `application/ohttp-keys` body (RFC 9458 §3.2): length-prefixed key configs. */
export function parseKeyConfigs(body) {
  const configs = [];
  let at = 0;
  while (at < body.length) {
    const length = u16(body, at);
    at += 2;
    if (at + length > body.length) throw new Error("key configuration overruns the list");
    const config = parseKeyConfig(body.subarray(at, at + length));
    if (config !== null) configs.push(config);
    at += length;
  }
  return configs;
}

/** Parse one key configuration (RFC 9458 §3.1); null for a KEM this client does not know. */
export function parseKeyConfig(bytes) {
  const keyId = bytes[0];
  const kemId = u16(bytes, 1);
  // Without knowing the KEM we cannot know the public key's length, so skip the config.
  if (kemId !== KEM_X25519_HKDF_SHA256) return null;
  let at = 3;
  const publicKey = bytes.slice(at, at + X25519_PUBLIC_KEY_SIZE);
  if (publicKey.length !== X25519_PUBLIC_KEY_SIZE) throw new Error("truncated public key");
  at += X25519_PUBLIC_KEY_SIZE;
  const suitesLength = u16(bytes, at);
  at += 2;
  if (suitesLength % 4 !== 0 || suitesLength === 0 || at + suitesLength !== bytes.length) {
    throw new Error("malformed symmetric algorithm list");
  }
  const suites = [];
  for (let end = at + suitesLength; at < end; at += 4) {
    suites.push({ kdfId: u16(bytes, at), aeadId: u16(bytes, at + 2) });
  }
  return { keyId, kemId, publicKey, suites };
}

/** Pick the first config offering X25519 + HKDF-SHA256 + the wanted AEAD. */
export function chooseConfig(configs, aeadName) {
  const aead = AEADS[aeadName];
  if (aead === undefined) throw new Error(`unknown AEAD ${aeadName}`);
  for (const config of configs) {
    const offered = config.suites.some(
      (s) => s.kdfId === KDF_HKDF_SHA256 && s.aeadId === aead.id,
    );
    if (offered) return { config, aeadId: aead.id };
  }
  throw new Error(`the gateway offers no X25519/HKDF-SHA256/${aeadName} configuration`);
}

function suiteFor(aeadId) {
  const entry = Object.values(AEADS).find((a) => a.id === aeadId);
  if (entry === undefined) throw new Error(`unsupported AEAD id ${aeadId}`);
  return new CipherSuite({
    kem: new DhkemX25519HkdfSha256(),
    kdf: new HkdfSha256(),
    aead: entry.create(),
  });
}

/** The 7-byte header of RFC 9458 §4.3: key_id, kem_id, kdf_id, aead_id. */
export function requestHeader(keyId, aeadId) {
  return new Uint8Array([
    keyId,
    KEM_X25519_HKDF_SHA256 >> 8,
    KEM_X25519_HKDF_SHA256 & 0xff,
    KDF_HKDF_SHA256 >> 8,
    KDF_HKDF_SHA256 & 0xff,
    aeadId >> 8,
    aeadId & 0xff,
  ]);
}

function requestInfo(label, header) {
  return concat(utf8(label), new Uint8Array([0]), header);
}

async function senderFor(config, aeadId, label, ekm) {
  const suite = suiteFor(aeadId);
  const header = requestHeader(config.keyId, aeadId);
  const recipientPublicKey = await suite.kem.deserializePublicKey(config.publicKey);
  const params = { recipientPublicKey, info: requestInfo(label, header) };
  // `ekm` pins the ephemeral key; only the self-test passes it, to reproduce RFC 9458 A.
  if (ekm !== undefined) params.ekm = ekm;
  const sender = await suite.createSenderContext(params);
  return { suite, header, sender, enc: new Uint8Array(sender.enc) };
}

/**
 * Encapsulate a Binary HTTP request (RFC 9458 §4.3).
 * Returns the bytes to send and the state needed to open the response.
 */
export async function encapsulateRequest(config, aeadId, request, ekm) {
  const { suite, header, sender, enc } = await senderFor(config, aeadId, REQUEST_LABEL, ekm);
  const ciphertext = new Uint8Array(await sender.seal(request));
  return {
    encapsulated: concat(header, enc, ciphertext),
    state: { context: sender, enc, aead: suite.aead, label: RESPONSE_LABEL },
  };
}

/**
 * Encapsulate a request as chunked OHTTP: each of `chunks` but the last is a non-final chunk
 * (AAD ""), the last is the final chunk (length 0, AAD "final").
 */
export async function encapsulateChunkedRequest(config, aeadId, chunks, ekm) {
  const { suite, header, sender, enc } = await senderFor(
    config,
    aeadId,
    CHUNKED_REQUEST_LABEL,
    ekm,
  );
  const parts = [header, enc];
  for (const [index, chunk] of chunks.entries()) {
    const final = index === chunks.length - 1;
    const sealed = new Uint8Array(await sender.seal(chunk, final ? FINAL_AAD : EMPTY));
    parts.push(encodeVarint(final ? 0 : sealed.length), sealed);
  }
  return {
    encapsulated: concat(...parts),
    state: { context: sender, enc, aead: suite.aead, label: CHUNKED_RESPONSE_LABEL },
  };
}

/** The response nonce length: max(Nn, Nk). */
export function responseNonceLength(aead) {
  return Math.max(aead.nonceSize, aead.keySize);
}

/** HKDF-Extract (RFC 5869) = HMAC-SHA256(key = salt, data = ikm), done with WebCrypto. */
async function hkdfExtract(salt, ikm) {
  const key = await crypto.subtle.importKey("raw", salt, { name: "HMAC", hash: "SHA-256" }, false, [
    "sign",
  ]);
  return new Uint8Array(await crypto.subtle.sign("HMAC", key, ikm));
}

/**
 * The response key schedule of RFC 9458 §4.4 (and of the chunked draft with its own label):
 * secret = Export(label, max(Nn, Nk)); prk = Extract(enc || response_nonce, secret);
 * key = Expand(prk, "key", Nk); nonce = Expand(prk, "nonce", Nn).
 */
export async function deriveResponseKeys(context, enc, responseNonce, aead, label) {
  const secret = new Uint8Array(
    await context.export(utf8(label), responseNonceLength(aead)),
  );
  const prk = await hkdfExtract(concat(enc, responseNonce), secret);
  const kdf = new HkdfSha256();
  const key = new Uint8Array(await kdf.expand(prk, utf8("key"), aead.keySize));
  const nonce = new Uint8Array(await kdf.expand(prk, utf8("nonce"), aead.nonceSize));
  return { secret, key, nonce };
}

/** Open an Encapsulated Response (RFC 9458 §4.4): response_nonce || ct. */
export async function decapsulateResponse(state, encapsulated) {
  const { context, enc, aead, label } = state;
  const nonceLength = responseNonceLength(aead);
  if (encapsulated.length < nonceLength + aead.tagSize) {
    throw new Error("encapsulated response too short");
  }
  const responseNonce = encapsulated.subarray(0, nonceLength);
  const { key, nonce } = await deriveResponseKeys(context, enc, responseNonce, aead, label);
  const opener = aead.createEncryptionContext(key);
  return new Uint8Array(await opener.open(nonce, encapsulated.subarray(nonceLength), EMPTY));
}

// QUIC variable-length integers (RFC 9000 §16), as chunk length prefixes.
export function encodeVarint(value) {
  if (value < 0x40) return new Uint8Array([value]);
  if (value < 0x4000) return new Uint8Array([0x40 | (value >> 8), value & 0xff]);
  if (value < 0x40000000) {
    return new Uint8Array([
      0x80 | (value >>> 24),
      (value >> 16) & 0xff,
      (value >> 8) & 0xff,
      value & 0xff,
    ]);
  }
  throw new Error("chunk too large");
}

/** Decode a varint at `at`; null when `bytes` does not hold all of it yet. */
export function decodeVarint(bytes, at) {
  if (at >= bytes.length) return null;
  const size = 1 << (bytes[at] >> 6);
  if (at + size > bytes.length) return null;
  let value = bytes[at] & 0x3f;
  for (let i = 1; i < size; i++) value = value * 256 + bytes[at + i];
  if (!Number.isSafeInteger(value)) throw new Error("varint too large");
  return { value, size };
}

function chunkNonce(nonce, counter) {
  // aead_nonce XOR encode(Nn, counter), the counter big-endian and left-padded with zeros.
  const out = nonce.slice();
  let rest = counter;
  for (let i = out.length - 1; i >= 0 && rest > 0; i--) {
    out[i] ^= rest % 256;
    rest = Math.floor(rest / 256);
  }
  return out;
}

/**
 * Open a chunked encapsulated response as its bytes arrive: feed `push(bytes)` with what the
 * network delivers, then call `finish()`. Each opened chunk goes to `onChunk(plaintext)`.
 * `finish()` throws unless the final chunk (AAD "final") was present and authentic.
 */
export function chunkedResponseOpener(state, onChunk) {
  const { context, enc, aead, label } = state;
  const nonceLength = responseNonceLength(aead);
  let buffer = new Uint8Array(0);
  let keys = null;
  let counter = 0;
  let inFinal = false;
  let chunks = 0;

  async function openChunk(sealed, aad) {
    const opener = aead.createEncryptionContext(keys.key);
    const plain = new Uint8Array(await opener.open(chunkNonce(keys.nonce, counter), sealed, aad));
    counter += 1;
    chunks += 1;
    onChunk(plain);
  }

  async function push(bytes) {
    buffer = concat(buffer, bytes);
    if (keys === null) {
      if (buffer.length < nonceLength) return;
      const responseNonce = buffer.slice(0, nonceLength);
      keys = await deriveResponseKeys(context, enc, responseNonce, aead, label);
      buffer = buffer.slice(nonceLength);
    }
    while (!inFinal) {
      const length = decodeVarint(buffer, 0);
      if (length === null) return;
      if (length.value === 0) {
        // The final chunk runs to the end of the stream.
        inFinal = true;
        buffer = buffer.slice(length.size);
        return;
      }
      if (buffer.length < length.size + length.value) return;
      await openChunk(buffer.slice(length.size, length.size + length.value), EMPTY);
      buffer = buffer.slice(length.size + length.value);
    }
  }

  async function finish() {
    if (!inFinal) throw new Error("chunked response truncated: no final chunk");
    await openChunk(buffer, FINAL_AAD);
    return chunks;
  }

  return { push, finish };
}
