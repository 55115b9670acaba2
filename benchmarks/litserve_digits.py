"""LitServe 0.2.19 serving the digits ONNX model with batching on: the peer in serving.py.

It runs in benchmarks/.venv-litserve (with onnxruntime; never a Bastion dependency). It
takes the same Open Inference Protocol body Bastion's `digits` takes (one image of 64 FP32
pixels) and answers in the same shape: the label and the class probabilities. LitServe
batches up to 32 requests, waiting at most 1 ms for more; the ONNX session uses one thread
per operator, as Bastion's worker does by default (`threads=1`).

Usage: LIT_SERVER_API_KEY=<key> python litserve_digits.py PORT MODEL.onnx
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
import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402

MAX_BATCH_SIZE = 32
BATCH_TIMEOUT_S = 0.001


class DigitsAPI(ls.LitAPI):  # type: ignore[misc]
    # No annotations on `request` and on encode_response's return: LitServe builds the
    # FastAPI endpoint from them, and without them it passes the parsed JSON body as is.
    def setup(self, device: str) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            sys.argv[2], options, providers=["CPUExecutionProvider"]
        )

    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return np.asarray(request["inputs"][0]["data"], dtype=np.float32).reshape(64)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> list[tuple[int, list[float]]]:
        labels, probabilities = self.session.run(
            ["label", "probabilities"], {"input": x.reshape(-1, 64)}
        )
        return list(zip(labels.tolist(), probabilities.tolist(), strict=True))

    def unbatch(self, output: list[tuple[int, list[float]]]) -> list[tuple[int, list[float]]]:
        return output

    def encode_response(self, output):  # type: ignore[no-untyped-def]
        label, probabilities = output
        return {
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [1], "data": [label]},
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": [1, 10],
                    "data": probabilities,
                },
            ]
        }


def main() -> None:
    port = int(sys.argv[1])
    api = DigitsAPI(
        api_path="/predict", max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(
        host="127.0.0.1",
        port=port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
