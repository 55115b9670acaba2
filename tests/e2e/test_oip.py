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
    # The answers' scores follow the default output policy, declared to clients.
    declared = metadata["output_policy"]
    assert declared["policy"] == "label_only" and declared["scores"] == ["probabilities"]
    # The extraction monitor watches it, with the reference the demo stores.
    assert declared["monitor"]["monitor"] == "on" and declared["reference"] is True


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
    # The default output policy: the best class alone, its score to two decimals.
    assert (np.count_nonzero(probabilities, axis=1) == 1).all()
    np.testing.assert_allclose(probabilities, np.round(probabilities, 2), atol=1e-6)
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


def _text_tensor(texts: list[str]) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.asarray(texts, dtype=object), binary_data=True)
    return tensor


def test_text_through_oip_counts_tokens_against_quotas(
    client: triton.InferenceServerClient, server: BastionServer
) -> None:
    # The finding: embeddings through /v2 reserved and metered 0 tokens, so a tenant held to
    # 100 tokens a minute embedded 20 x 500 texts.
    with server.client() as admin:
        admin.post("/admin/v1/tenants", json={"name": "oip-tokens"})
        key = admin.post("/admin/v1/keys", json={"tenant": "oip-tokens"}).json()["key"]
        patched = admin.patch(
            "/admin/v1/quotas/tenants/oip-tokens", json={"tokens_per_minute": 100}
        )
        assert patched.status_code == 200
    auth = {"Authorization": f"Bearer {key}"}
    with pytest.raises(InferenceServerException) as refused:
        client.infer("minilm-l6", [_text_tensor(["word " * 100] * 20)], headers=auth)
    assert refused.value.status() == "429" and "tokens" in str(refused.value)
    before = server.tokens("minilm-l6", "prompt")
    result = client.infer("minilm-l6", [_text_tensor(["a cat", "a dog"])], headers=auth)
    assert result.as_numpy("embedding").shape == (2, 384)
    # What the model counted (with its special tokens), metered like /v1/embeddings.
    assert server.wait_tokens("minilm-l6", "prompt", before + 8) >= before + 8


def test_oip_batches_elements_and_answers_are_capped(
    client: triton.InferenceServerClient, server: BastionServer, auth: dict[str, str]
) -> None:
    # 45,000 texts once kept the worker busy 35 s; 200,000 empty strings killed it.
    with pytest.raises(InferenceServerException) as refused:
        client.infer("minilm-l6", [_text_tensor([""] * 2049)], headers=auth)
    assert "batch of 2049" in str(refused.value)
    # A declared shape asking for millions of elements is refused before anything else.
    with server.client() as http:
        huge = http.post(
            "/v2/models/echo/infer",
            json={"inputs": [{"name": "input", "shape": [1, 5_000_000], "datatype": "FP32",
                              "data": [0.0]}]},
        )  # fmt: skip
    assert huge.status_code == 413 and "elements" in huge.json()["error"]
