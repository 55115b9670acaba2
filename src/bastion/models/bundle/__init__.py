"""Model bundles: scanned, signed, encrypted at rest.

A bundle is a directory::

    bundle.json     format, model name and version, the files (path, size, blob), the
                    bundle's data key in a key ring envelope, the signer's key id
    model.sig       the OpenSSF Model Signing signature over every plaintext file's SHA-256
    load.sig        the same format and key over every file's BLAKE3 and over model.sig:
                    what a worker checks when it loads (BLAKE3 hashes about twice as fast
                    as SHA-256; model.sig stays the standard one, for export and publishers)
    blobs/NNNN.enc  each file, encrypted with the streaming AEAD (Tink's AES-GCM-HKDF,
                    1 MiB segments) under the data key, the file's identity (model name,
                    version, path) bound as associated data

`bundle.json` is not itself signed: everything that matters in it is checked elsewhere.
A blob moved to another path, or from another bundle, does not decrypt (associated
data); a file left out, added or changed fails the signed manifest; another data key
does not decrypt; an envelope edited or moved to another bundle does not open.

Plaintext exists only in memory while a bundle is verified or loaded; :func:`export_bundle`
is the one operation that writes it, on the operator's explicit request.

:mod:`.reader` is what a worker loads (verify and decrypt); :mod:`.writer` imports and
exports, and is never loaded into a worker.
"""
