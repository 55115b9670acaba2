"""LitServe 0.2.19 serving a trivial model with its API key on: the peer in gateway.py.

It runs in benchmarks/.venv-litserve (never a Bastion dependency). The model does the same
work as Bastion's `echo` runtime: it takes 64 floats and answers them back.

Usage: LIT_SERVER_API_KEY=<key> python litserve_server.py PORT
"""

import os
import signal
import sys

# A child of a background job may start with SIGINT ignored; LitServe shuts its worker
# processes down cleanly only on SIGINT, so restore Python's handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
# LitServe reads the key when it is imported, so it must be set before the import.
if not os.environ.get("LIT_SERVER_API_KEY"):
    raise SystemExit("set LIT_SERVER_API_KEY")

import litserve as ls  # type: ignore[import-not-found]  # noqa: E402


class EchoAPI(ls.LitAPI):  # type: ignore[misc]
    # No annotations on `request` and on encode_response's return: LitServe builds the
    # FastAPI endpoint from them, and without them it passes the parsed JSON body as is.
    def setup(self, device: str) -> None:
        self.model = None

    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return request["input"]

    def predict(self, x: list[float]) -> list[float]:
        return x

    def encode_response(self, output):  # type: ignore[no-untyped-def]
        return {"output": output}


def main() -> None:
    port = int(sys.argv[1])
    server = ls.LitServer(
        EchoAPI(api_path="/predict"), accelerator="cpu", devices=1, workers_per_device=1
    )
    server.run(
        host="127.0.0.1",
        port=port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
