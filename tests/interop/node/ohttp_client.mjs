#!/usr/bin/env node
// An independent OHTTP client for Bastion, for interoperability tests. It prints one JSON line:
//   {"outer_status", "status", "headers", "body"}   when the gateway answered with encryption
//   {"outer_status", "outer_body"}                   when it refused before decryption
// and exits non-zero on any local failure (bad arguments, malformed or unauthentic response).
//
//   node ohttp_client.mjs --base URL --key APIKEY --model NAME --path /v1/embeddings \
//        --body '<json>' [--aead aes128gcm|chacha20poly1305] [--chunked]
//        [--tamper] [--stale-date] [--replay]
//   node ohttp_client.mjs --base URL --show-keys
//   node ohttp_client.mjs --selftest

import { parseArgs } from "node:util";
import { BHttpDecoder, BHttpEncoder } from "bhttp-js";
import {
  AEADS,
  chooseConfig,
  chunkedResponseOpener,
  concat,
  decapsulateResponse,
  encapsulateChunkedRequest,
  encapsulateRequest,
  hex,
  parseKeyConfigs,
  utf8,
} from "./ohttp.mjs";
import { runSelftest } from "./selftest.mjs";

const KEYS_PATH = "/.well-known/ohttp-gateway";
const OHTTP_PATH = "/v1/ohttp";
const STALE_BY_MS = 3600 * 1000;

const OPTIONS = {
  base: { type: "string" },
  key: { type: "string" },
  model: { type: "string" },
  path: { type: "string" },
  body: { type: "string" },
  aead: { type: "string", default: "aes128gcm" },
  chunked: { type: "boolean", default: false },
  tamper: { type: "boolean", default: false },
  "stale-date": { type: "boolean", default: false },
  replay: { type: "boolean", default: false },
  "show-keys": { type: "boolean", default: false },
  selftest: { type: "boolean", default: false },
};

class UsageError extends Error {}

function required(args, ...names) {
  for (const name of names) {
    if (args[name] === undefined) throw new UsageError(`--${name} is required`);
  }
}

async function fetchKeyConfigs(base) {
  const response = await fetch(base + KEYS_PATH);
  const type = response.headers.get("content-type") ?? "";
  if (response.status !== 200 || !type.startsWith("application/ohttp-keys")) {
    throw new Error(`key configuration fetch gave ${response.status} ${type}`);
  }
  return parseKeyConfigs(new Uint8Array(await response.arrayBuffer()));
}

/** The inner request as Binary HTTP, encoded by bhttp-js from a Fetch API Request. */
async function binaryRequest(path, body, date) {
  // bhttp-js encodes only the URL's pathname, so a query would be silently lost.
  if (!path.startsWith("/") || path.includes("?")) {
    throw new UsageError("--path must be a plain path");
  }
  const request = new Request(`https://localhost${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", date: date.toUTCString() },
    body: utf8(body),
  });
  return await new BHttpEncoder().encodeRequest(request);
}

function flipBit(bytes, at) {
  const copy = bytes.slice();
  copy[at] ^= 0x01;
  return copy;
}

async function post(args, encapsulated) {
  return await fetch(args.base + OHTTP_PATH, {
    method: "POST",
    headers: {
      authorization: `Bearer ${args.key}`,
      "bastion-model": args.model,
      "content-type": args.chunked ? "message/ohttp-chunked-req" : "message/ohttp-req",
    },
    body: encapsulated,
  });
}

async function openAnswer(args, response, state) {
  const wanted = args.chunked ? "message/ohttp-chunked-res" : "message/ohttp-res";
  const type = response.headers.get("content-type") ?? "";
  if (!type.startsWith(wanted)) throw new Error(`outer 200 with content-type ${type}`);
  let plaintext;
  let chunks;
  if (args.chunked) {
    const pieces = [];
    const opener = chunkedResponseOpener(state, (piece) => pieces.push(piece));
    for await (const bytes of response.body) await opener.push(bytes);
    chunks = await opener.finish();
    plaintext = concat(...pieces);
  } else {
    plaintext = await decapsulateResponse(state, new Uint8Array(await response.arrayBuffer()));
  }
  const inner = new BHttpDecoder().decodeResponse(plaintext);
  const answer = {
    outer_status: response.status,
    status: inner.status,
    headers: Object.fromEntries(inner.headers.entries()),
    body: await inner.text(),
  };
  if (chunks !== undefined) answer.chunks = chunks;
  return answer;
}

async function exchange(args) {
  required(args, "base", "key", "model", "path", "body");
  if (AEADS[args.aead] === undefined) throw new UsageError(`unknown --aead ${args.aead}`);
  const { config, aeadId } = chooseConfig(await fetchKeyConfigs(args.base), args.aead);
  const date = args["stale-date"] ? new Date(Date.now() - STALE_BY_MS) : new Date();
  const request = await binaryRequest(args.path, args.body, date);

  let encapsulated;
  let state;
  if (args.chunked) {
    // Two request chunks, so the gateway has to join a non-final and a final chunk.
    const cut = Math.floor(request.length / 2);
    const parts = [request.subarray(0, cut), request.subarray(cut)];
    ({ encapsulated, state } = await encapsulateChunkedRequest(config, aeadId, parts));
  } else {
    ({ encapsulated, state } = await encapsulateRequest(config, aeadId, request));
  }
  if (args.tamper) {
    // Inside the AEAD ciphertext: its middle for a plain request, the final chunk's tag when
    // chunked (the last byte is always ciphertext there).
    const headerLength = 7 + state.enc.length;
    const at = args.chunked
      ? encapsulated.length - 1
      : headerLength + Math.floor((encapsulated.length - headerLength) / 2);
    encapsulated = flipBit(encapsulated, at);
  }

  const response = await post(args, encapsulated);
  const answer =
    response.status === 200
      ? await openAnswer(args, response, state)
      : { outer_status: response.status, outer_body: await response.text() };
  if (args.replay) {
    const again = await post(args, encapsulated);
    answer.replay_outer_status = again.status;
    answer.replay_outer_body = await again.text();
  }
  return answer;
}

async function showKeys(args) {
  required(args, "base");
  const configs = await fetchKeyConfigs(args.base);
  return {
    configs: configs.map((c) => ({
      key_id: c.keyId,
      kem_id: c.kemId,
      public_key: hex(c.publicKey),
      suites: c.suites.map((s) => ({ kdf_id: s.kdfId, aead_id: s.aeadId })),
    })),
  };
}

async function main() {
  let args;
  try {
    ({ values: args } = parseArgs({ options: OPTIONS, strict: true }));
  } catch (error) {
    throw new UsageError(error.message);
  }
  if (args.selftest) {
    const result = await runSelftest();
    console.log(JSON.stringify(result));
    return result.ok ? 0 : 1;
  }
  const result = args["show-keys"] ? await showKeys(args) : await exchange(args);
  console.log(JSON.stringify(result));
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    console.error(`ohttp_client: ${error instanceof Error ? error.message : String(error)}`);
    process.exitCode = error instanceof UsageError ? 2 : 1;
  },
);
