// Known-answer checks of the client's code paths against RFC 9458 Appendix A, plus a chunked
// round trip. The appendix values below are copied from the RFC (X25519, HKDF-SHA256,
// AES-128-GCM); the AEAD tags make a mistyped value fail rather than pass.

import { Aes128Gcm, CipherSuite, DhkemX25519HkdfSha256, HkdfSha256 } from "@hpke/core";
import { BHttpDecoder } from "bhttp-js";
import {
  AEAD_AES_128_GCM,
  CHUNKED_REQUEST_LABEL,
  CHUNKED_RESPONSE_LABEL,
  chunkedResponseOpener,
  concat,
  decapsulateResponse,
  decodeVarint,
  deriveResponseKeys,
  encapsulateChunkedRequest,
  encapsulateRequest,
  encodeVarint,
  fromHex,
  hex,
  parseKeyConfigs,
  requestHeader,
  responseNonceLength,
  utf8,
} from "./ohttp.mjs";

// RFC 9458 Appendix A ("Complete Example of a Request and Response").
const A = {
  skR: "3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a",
  keyConfig:
    "01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e79815500080001000100010003",
  request: "00034745540568747470730b6578616d706c652e636f6d012f",
  skE: "bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73",
  pkE: "4b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472",
  encapsulatedRequest:
    "010020000100014b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad1" +
    "9dec96c208b4726374e469135906992e1268c594d2a10c695d858c40a026e796" +
    "5e7d86b83dd440b2c0185204b4d63525",
  response: "0140c8",
  exportedSecret: "62d87a6ba569ee81014c2641f52bea36",
  responseNonce: "c789e7151fcba46158ca84b04464910d",
  responseKey: "5d0172a080e428b16d298c4ea0db620d",
  responseAeadNonce: "f6bf1aeb88d6df87007fa263",
  encapsulatedResponse: "c789e7151fcba46158ca84b04464910d86f9013e404feea014e7be4a441f234f857fbd",
};

function suite() {
  return new CipherSuite({
    kem: new DhkemX25519HkdfSha256(),
    kdf: new HkdfSha256(),
    aead: new Aes128Gcm(),
  });
}

// The gateway's side, which the client never needs: open a request with the private key.
async function gatewayOpen(encapsulated, label, skR) {
  const header = encapsulated.subarray(0, 7);
  const enc = encapsulated.subarray(7, 39);
  const s = suite();
  const recipient = await s.createRecipientContext({
    recipientKey: await s.kem.deserializePrivateKey(skR),
    enc,
    info: concat(utf8(label), new Uint8Array([0]), header),
  });
  return { recipient, enc, aead: s.aead, rest: encapsulated.subarray(39) };
}

async function ephemeralKeyPair() {
  const kem = new DhkemX25519HkdfSha256();
  return {
    privateKey: await kem.deserializePrivateKey(fromHex(A.skE)),
    publicKey: await kem.deserializePublicKey(fromHex(A.pkE)),
  };
}

async function appendixChecks() {
  const checks = {};
  const keyConfig = fromHex(A.keyConfig);
  const [config] = parseKeyConfigs(concat(encodeU16(keyConfig.length), keyConfig));
  checks.key_config_parsed =
    config.keyId === 1 &&
    config.suites.length === 2 &&
    config.suites[0].aeadId === AEAD_AES_128_GCM &&
    config.suites[1].aeadId === 0x0003;

  // The client's encapsulation, with the appendix's ephemeral key, gives the appendix's bytes.
  const { encapsulated, state } = await encapsulateRequest(
    config,
    AEAD_AES_128_GCM,
    fromHex(A.request),
    await ephemeralKeyPair(),
  );
  checks.encapsulated_request_matches = hex(encapsulated) === A.encapsulatedRequest;

  // The appendix's encapsulated request opens with its private key to its BHTTP request.
  const opened = await gatewayOpen(
    fromHex(A.encapsulatedRequest),
    "message/bhttp request",
    fromHex(A.skR),
  );
  const plain = new Uint8Array(await opened.recipient.open(opened.rest));
  checks.request_decapsulates = hex(plain) === A.request;
  const request = new BHttpDecoder().decodeRequest(plain);
  checks.bhttp_request_decodes = request.method === "GET" && request.url === "https://example.com/";

  // The response key schedule, on the gateway's context, gives the appendix's values...
  const derived = await deriveResponseKeys(
    opened.recipient,
    opened.enc,
    fromHex(A.responseNonce),
    opened.aead,
    "message/bhttp response",
  );
  checks.response_secret_matches = hex(derived.secret) === A.exportedSecret;
  checks.response_key_matches = hex(derived.key) === A.responseKey;
  checks.response_nonce_matches = hex(derived.nonce) === A.responseAeadNonce;

  // ...and sealing the appendix response with them reproduces its encapsulated response.
  const sealed = new Uint8Array(
    await opened.aead
      .createEncryptionContext(derived.key)
      .seal(derived.nonce, fromHex(A.response), new Uint8Array(0)),
  );
  checks.encapsulated_response_matches =
    hex(concat(fromHex(A.responseNonce), sealed)) === A.encapsulatedResponse;

  // The client, holding the sender context, opens the appendix's encapsulated response.
  const response = await decapsulateResponse(state, fromHex(A.encapsulatedResponse));
  checks.client_opens_response = hex(response) === A.response;
  checks.bhttp_response_decodes = new BHttpDecoder().decodeResponse(response).status === 200;
  return checks;
}

function encodeU16(value) {
  return new Uint8Array([value >> 8, value & 0xff]);
}

// No published vectors exist for chunked OHTTP, so this is a round trip between the client and
// a gateway written here from the draft's pseudocode: it checks labels, AADs and framing.
async function chunkedRoundTrip() {
  const checks = {};
  const skR = fromHex(A.skR);
  const config = { keyId: 1, kemId: 0x20, publicKey: fromHex(A.keyConfig).subarray(3, 35) };
  const parts = [utf8("first part, "), utf8("final part")];
  const { encapsulated, state } = await encapsulateChunkedRequest(config, AEAD_AES_128_GCM, parts);
  checks.chunked_request_header = hex(encapsulated.subarray(0, 7)) === hex(requestHeader(1, 1));

  const opened = await gatewayOpen(encapsulated, CHUNKED_REQUEST_LABEL, skR);
  const first = decodeVarint(opened.rest, 0);
  const firstSealed = opened.rest.subarray(first.size, first.size + first.value);
  const finalIndicator = decodeVarint(opened.rest, first.size + first.value);
  const finalSealed = opened.rest.subarray(first.size + first.value + finalIndicator.size);
  const got = [
    await opened.recipient.open(firstSealed, new Uint8Array(0)),
    await opened.recipient.open(finalSealed, utf8("final")),
  ];
  checks.chunked_request_opens =
    finalIndicator.value === 0 &&
    new TextDecoder().decode(concat(...got.map((b) => new Uint8Array(b)))) ===
      "first part, final part";

  // The gateway seals three response chunks; the client opener gets them back in order.
  const responseNonce = crypto.getRandomValues(new Uint8Array(responseNonceLength(opened.aead)));
  const keys = await deriveResponseKeys(
    opened.recipient,
    opened.enc,
    responseNonce,
    opened.aead,
    CHUNKED_RESPONSE_LABEL,
  );
  const pieces = ["alpha ", "beta ", "gamma"];
  const wire = [responseNonce];
  for (const [counter, piece] of pieces.entries()) {
    const final = counter === pieces.length - 1;
    const nonce = keys.nonce.slice();
    nonce[nonce.length - 1] ^= counter;
    const sealed = new Uint8Array(
      await opened.aead
        .createEncryptionContext(keys.key)
        .seal(nonce, utf8(piece), final ? utf8("final") : new Uint8Array(0)),
    );
    wire.push(encodeVarint(final ? 0 : sealed.length), sealed);
  }
  const received = [];
  const opener = chunkedResponseOpener(state, (plain) => {
    received.push(new TextDecoder().decode(plain));
  });
  // Deliver the bytes in awkward slices, as a network would.
  const all = concat(...wire);
  for (let at = 0; at < all.length; at += 5) await opener.push(all.subarray(at, at + 5));
  const count = await opener.finish();
  checks.chunked_response_opens = count === 3 && received.join("") === "alpha beta gamma";

  // A response cut before its final chunk must not pass as complete.
  const cut = chunkedResponseOpener(state, () => {});
  await cut.push(concat(...wire.slice(0, 3)));
  checks.chunked_truncation_detected = await refused(cut.finish());

  // Nor may a relay promote a non-final chunk to final by rewriting its length to 0.
  const promoted = chunkedResponseOpener(state, () => {});
  await promoted.push(concat(wire[0], encodeVarint(0), wire[2]));
  checks.chunked_promotion_detected = await refused(promoted.finish());
  return checks;
}

async function refused(promise) {
  return promise.then(
    () => false,
    () => true,
  );
}

/** Run every check; returns { ok, checks }. */
export async function runSelftest() {
  const checks = { ...(await appendixChecks()), ...(await chunkedRoundTrip()) };
  return { ok: Object.values(checks).every((v) => v === true), checks };
}
