"""An Open Inference Protocol client (tritonclient) against the `digits` ONNX model."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bastion.models.demo import digits_split
from bastion_testing import BastionServer


@pytest.fixture(scope="module")
def client(server: BastionServer, consumer_key: str) -> triton.InferenceServerClient:
    url = server.url.removeprefix("http://")
    return triton.InferenceServerClient(url)


@pytest.fixture()
def auth(consumer_key: str) -> dict[str, str]:
    # A fresh dict per test: tritonclient writes its binary header into the dict it is given.
    return {"Authorization": f"Bearer {consumer_key}"}


def test_health_and_metadata(client: triton.InferenceServerClient, auth: dict[str, str]) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits", headers=auth)
    metadata = client.get_model_metadata("digits", headers=auth)
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    outputs = {o["name"]: o for o in metadata["outputs"]}
    assert outputs["probabilities"]["datatype"] == "FP32"
    assert outputs["probabilities"]["shape"] == [-1, 10]


def test_heldout_accuracy_through_the_api(
    client: triton.InferenceServerClient, auth: dict[str, str]
) -> None:
    _, x_test, _, y_test = digits_split()
    x = np.asarray(x_test, dtype=np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    wanted = [triton.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer("digits", [tensor], outputs=wanted, headers=auth)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(y_test), 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    accuracy = float((probabilities.argmax(axis=1) == np.asarray(y_test)).mean())
    assert accuracy >= 0.95


def test_wrong_shape_and_datatype_are_refused(
    client: triton.InferenceServerClient, auth: dict[str, str]
) -> None:
    bad = triton.InferInput("input", [1, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32), binary_data=False)
    with pytest.raises(InferenceServerException) as shape_error:
        client.infer("digits", [bad], headers=auth)
    assert "shape" in str(shape_error.value)
    wrong_type = triton.InferInput("input", [1, 64], "INT64")
    wrong_type.set_data_from_numpy(np.zeros((1, 64), dtype=np.int64), binary_data=False)
    with pytest.raises(InferenceServerException) as type_error:
        client.infer("digits", [wrong_type], headers=auth)
    assert "datatype" in str(type_error.value)


def test_credentials_are_needed(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("digits")
    assert not client.is_model_ready("digits")


def test_binary_tensor_extension_with_client_defaults(
    client: triton.InferenceServerClient, auth: dict[str, str]
) -> None:
    _, x_test, _, y_test = digits_split()
    x = np.asarray(x_test[:50], dtype=np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # binary_data=True is the client's default
    result = client.infer("digits", [tensor], headers=auth)
    labels = result.as_numpy("label")
    probabilities = result.as_numpy("probabilities")
    assert labels.dtype == np.int64 and labels.shape == (50,)
    assert (labels == probabilities.argmax(axis=1)).all()
    assert float((labels == np.asarray(y_test[:50])).mean()) >= 0.9


def test_bytes_tensors_in_binary_and_json(
    client: triton.InferenceServerClient, auth: dict[str, str]
) -> None:
    texts = np.array([b"a cat on a mat", b"quantum computing"], dtype=object)
    answers = []
    for binary in (True, False):
        tensor = triton.InferInput("text", [2], "BYTES")
        tensor.set_data_from_numpy(texts, binary_data=binary)
        wanted = [triton.InferRequestedOutput("embedding", binary_data=binary)]
        result = client.infer("minilm-l6", [tensor], outputs=wanted, headers=dict(auth))
        answers.append(result.as_numpy("embedding"))
    assert answers[0].shape == (2, 384)
    assert np.allclose(answers[0], answers[1], atol=1e-6)
    assert np.allclose(np.linalg.norm(answers[0], axis=1), 1.0, atol=1e-4)
