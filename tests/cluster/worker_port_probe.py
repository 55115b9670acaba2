"""An intruder's attempts on a gateway's worker port, run on a simulated host (inside its
network namespace) by tests/cluster/test_intruders.py.

    python worker_port_probe.py HOST PORT plain
    python worker_port_probe.py HOST PORT tls [CERT KEY]

`plain` connects and sends garbage; `tls` makes a TLS 1.3 handshake (with the client
certificate, if given, and without checking the server's), then sends a frame's worth of
bytes. Either way it reads until the gateway closes, and prints one JSON object: how the
handshake went, the bytes received (hex), and how the connection ended.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
from typing import Any

TIMEOUT_S = 10.0


def _drain(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the peer sends until it closes: (bytes, how it ended)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, "timeout"
    except ssl.SSLError as exc:
        return data, f"tls error: {exc.reason or exc}"
    except ConnectionResetError:
        return data, "reset"
    except OSError as exc:
        return data, f"error: {exc}"
    return data, "closed"


def plain(host: str, port: int) -> dict[str, Any]:
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(256))
        except OSError as exc:
            return {"handshake": None, "received": "", "end": f"send failed: {exc}"}
        data, end = _drain(sock)
    return {"handshake": None, "received": data.hex(), "end": end}


def tls(host: str, port: int, cert: str | None, key: str | None) -> dict[str, Any]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    raw = socket.create_connection((host, port), timeout=TIMEOUT_S)
    with context.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False) as sock:
        try:
            sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            return {"handshake": f"failed: {exc}", "received": "", "end": "handshake"}
        # In TLS 1.3 the client's handshake ends before the server has checked the
        # client's certificate: a refusal shows on the first read.
        try:
            # A length-prefixed frame's worth of bytes, as a worker would send.
            sock.sendall(b"\x00\x00\x00\x10" + os.urandom(16))
        except (ssl.SSLError, OSError) as exc:
            return {"handshake": "completed", "received": "", "end": f"send failed: {exc}"}
        data, end = _drain(sock)
    return {"handshake": "completed", "received": data.hex(), "end": end}


def main(argv: list[str]) -> None:
    host, port, mode, *files = argv
    if mode == "plain":
        result = plain(host, int(port))
    else:
        cert, key = (files[0], files[1]) if files else (None, None)
        result = tls(host, int(port), cert, key)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
