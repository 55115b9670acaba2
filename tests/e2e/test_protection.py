"""Runtime model protection against a real server: what a classifier's answers reveal.

A consumer key tries the equation-solving extraction attack (Tramèr et al. 2016) on the
`digits` logistic regression through the Open Inference Protocol: 2,000 noisy
near-average images, the returned probabilities solved for the model's weights. Served
with `protect.output=full`, the copy agrees with the model on held-out digits; with the
default policy it does not, while the model's own top-1 answers are unchanged.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from bastion.models.demo import digits_split
from bastion.wire import bhttp
from bastion_testing import (
    BastionServer,
    add_echo_model,
    digits_model,
    ohttp_config,
    post_sealed,
    run_cli,
    seal_request,
)

pytestmark = pytest.mark.e2e

QUERIES = 2000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    base = tmp_path_factory.mktemp("protection")
    model = digits_model(base)
    home = base / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    # The output policy on its own: these two do not watch for extraction (a thief's
    # 2,000 probes would be blocked after a few dozen; see test_extraction_monitor.py).
    run_cli(
        home, "models", "add", "digits", "--runtime", "onnx", "--path", str(model),
        "--protect", "monitor=off", "--protect", "watermark=off",
    )  # fmt: skip
    run_cli(
        home, "models", "add", "digits-full", "--runtime", "onnx", "--path", str(model),
        "--protect", "output=full", "--protect", "monitor=off", "--protect", "watermark=off",
    )  # fmt: skip
    # A bundle, imported with a policy of its own.
    run_cli(
        home, "models", "import", str(model), "--name", "digits-sealed", "--runtime", "onnx",
        "--protect", "output=label_only", "--protect", "monitor=off",
        "--protect", "watermark=off",
    )  # fmt: skip
    # Feature squeezing on (an adversarial-input detector), the monitor off.
    run_cli(
        home, "models", "add", "digits-squeezed", "--runtime", "onnx", "--path", str(model),
        "--protect", "squeeze=on", "--protect", "squeeze_range=0,16", "--protect", "monitor=off",
        "--protect", "watermark=off",
    )  # fmt: skip
    # The ownership watermark on (the default), the monitor off: a natural-data thief.
    run_cli(
        home, "models", "add", "digits-wm", "--runtime", "onnx", "--path", str(model),
        "--protect", "monitor=off",
    )  # fmt: skip
    # A deliberately overfit random forest, for membership inference.
    forest = base / "forest"
    forest.mkdir()
    (forest / "model.onnx").write_bytes(_overfit_forest_onnx())
    for name, policy in (("forest", "output=default"), ("forest-full", "output=full")):
        extra = ["--protect", policy] if policy != "output=default" else []
        run_cli(
            home, "models", "add", name, "--runtime", "onnx", "--path", str(forest), *extra
        )  # fmt: skip
    srv = BastionServer(home)
    try:
        srv.wait_ready(
            ["digits", "digits-full", "digits-sealed", "digits-squeezed", "digits-wm", "forest"]
        )
        yield srv
    finally:
        srv.stop()


def _forest_split() -> list[np.ndarray[Any, Any]]:
    """Digits split in halves: the forest's training records, and records it never saw."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    split: list[np.ndarray[Any, Any]] = train_test_split(
        x.astype(np.float32), y, test_size=0.5, random_state=0, stratify=y
    )
    return split


def _overfit_forest_onnx() -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestClassifier

    x_in, _, y_in, _ = _forest_split()
    forest = RandomForestClassifier(n_estimators=50, random_state=0).fit(x_in, y_in)
    model = convert_sklearn(
        forest,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={"zipmap": False},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    data: bytes = model.SerializeToString()
    return data


@pytest.fixture(scope="module")
def consumer(server: BastionServer) -> str:
    with server.client() as admin:
        admin.post("/admin/v1/tenants", json={"name": "thief"})
        created = admin.post(
            "/admin/v1/keys",
            json={
                "tenant": "thief",
                "role": "consumer",
                "models": ["digits*", "echo", "forest*"],
            },
        )
        assert created.status_code == 201, created.text
        return str(created.json()["key"])


def _infer(server: BastionServer, key: str, model: str, x: np.ndarray[Any, Any]) -> Any:
    """Labels and probabilities for `x`, asked 400 images a request (the body limit)."""
    if len(x) > 400:
        parts = [_infer(server, key, model, x[i : i + 400]) for i in range(0, len(x), 400)]
        return np.concatenate([a for a, _ in parts]), np.vstack([b for _, b in parts])
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    body = {"inputs": [{**tensor, "data": x.ravel().tolist()}]}
    answer = httpx.post(
        f"{server.url}/v2/models/{model}/infer",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    probabilities = np.asarray(outputs["probabilities"]["data"], dtype=np.float64)
    return np.asarray(outputs["label"]["data"]), probabilities.reshape(len(x), 10)


def _equation_solving(x: np.ndarray[Any, Any], p: np.ndarray[Any, Any]) -> Any:
    """Tramèr et al.'s attack on a softmax model: log(p_i / p_0) is linear in x, so each
    class's weights (relative to class 0's) are a least-squares fit over the answers that
    give a score for both. (Small matrices: this runs inside the test process.)"""
    n, d = x.shape
    ones = np.hstack([x, np.ones((n, 1))])
    weights = np.zeros((10, d + 1))
    for i in range(1, 10):
        known = (p[:, i] > 0) & (p[:, 0] > 0)
        if known.sum() > d:
            ratio = np.log(p[known, i] / p[known, 0])
            weights[i] = np.linalg.lstsq(ones[known], ratio, rcond=None)[0]
    return lambda z: np.argmax(np.hstack([z, np.ones((len(z), 1))]) @ weights.T, axis=1)


def test_the_model_declares_its_policy(server: BastionServer, consumer: str) -> None:
    declared = (
        ("digits", "label_only"),
        ("digits-full", "full"),
        ("digits-sealed", "label_only"),
    )
    for model, policy in declared:
        answer = httpx.get(
            f"{server.url}/v2/models/{model}", headers={"authorization": f"Bearer {consumer}"}
        )
        declared_policy = answer.json()["output_policy"]
        assert declared_policy["policy"] == policy
        assert declared_policy["scores"] == ["probabilities"]
        listed = httpx.get(
            f"{server.url}/v1/models/{model}", headers={"authorization": f"Bearer {consumer}"}
        )
        assert listed.json()["output_policy"]["policy"] == policy


def test_equation_solving_fails_under_the_default_policy(
    server: BastionServer, consumer: str
) -> None:
    x_train, x_test, _, _ = digits_split()
    rng = np.random.default_rng(0)
    mean, spread = x_train.mean(axis=0), x_train.std(axis=0) + 1e-3
    probes = np.clip(mean + rng.normal(size=(QUERIES, 64)) * spread, 0, 16).astype(np.float32)
    agreement = {}
    for model in ("digits-full", "digits"):
        _, answers = _infer(server, consumer, model, probes)
        copy = _equation_solving(probes.astype(np.float64), answers)
        served, _ = _infer(server, consumer, model, x_test.astype(np.float32))
        agreement[model] = float(np.mean(copy(x_test.astype(np.float64)) == served))
    # Full scores: the copy is the model. The default: no better than the 60 %.
    assert agreement["digits-full"] >= 0.95, agreement
    assert agreement["digits"] <= 0.60, agreement


def test_top1_answers_are_unchanged_by_the_policy(server: BastionServer, consumer: str) -> None:
    _, x_test, _, y_test = digits_split()
    x = x_test.astype(np.float32)
    full_labels, full_scores = _infer(server, consumer, "digits-full", x)
    labels, scores = _infer(server, consumer, "digits", x)
    assert (labels == full_labels).all()
    assert (scores.argmax(axis=1) == full_scores.argmax(axis=1)).all()
    assert float(np.mean(labels == y_test)) >= 0.95
    # An imported bundle served label_only: one-hot answers, the same labels.
    sealed_labels, one_hot = _infer(server, consumer, "digits-sealed", x)
    assert (sealed_labels == full_labels).all()
    assert (one_hot.sum(axis=1) == 1).all() and (one_hot.argmax(axis=1) == full_labels).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--protect", "output=top_k=0"], "top_k"),
        (["--protect", "output=everything"], "protect.output"),
        (["--protect", "colour=red"], "--protect takes"),
    ],
)
def test_a_bad_policy_is_a_clear_cli_error(
    server: BastionServer, args: list[str], message: str
) -> None:
    model = server.home.parent / "digits"
    for command in (
        ["models", "add", "digits-bad", "--runtime", "onnx", "--path", str(model)],
        ["models", "import", str(model), "--name", "digits-bad", "--runtime", "onnx"],
    ):
        done = run_cli(server.home, *command, *args, check=False)
        assert done.returncode == 2, done.stdout + done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
    listed = run_cli(server.home, "models", "list", "--json")
    assert "digits-bad" not in listed.stdout


def test_protect_on_import_needs_a_runtime(server: BastionServer) -> None:
    model = server.home.parent / "digits"
    done = run_cli(
        server.home, "models", "import", str(model), "--name", "x", "--protect", "output=full",
        check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "--protect needs --runtime" in done.stderr


LEAKY = [
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"logprobs": False, "top_logprobs": 5}, "top_logprobs"),
    ("chat", {"logit_bias": {"50256": -100}}, "logit_bias"),
    ("completions", {"logprobs": 2}, "logprobs"),
    ("completions", {"logit_bias": {"1": 5}}, "logit_bias"),
]


@pytest.mark.parametrize(("kind", "extra", "param"), LEAKY)
def test_text_models_refuse_what_would_reveal_their_logits(
    server: BastionServer, consumer: str, kind: str, extra: dict[str, Any], param: str
) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=consumer, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        if kind == "chat":
            client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hi"}], extra_body=extra
            )
        else:
            client.completions.create(model="echo", prompt="hi", extra_body=extra)
    error = refused.value.response.json()["error"]
    assert error["code"] == "output_policy" and error["param"] == param
    assert "output policy" in error["message"]


def test_asking_for_nothing_leaky_is_served(server: BastionServer, consumer: str) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=consumer, max_retries=0)
    answer = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "a b"}],
        logprobs=False,
        extra_body={"logit_bias": {}},
    )
    assert answer.choices[0].message.content == "a b"


def test_the_policy_holds_inside_an_encrypted_request(server: BastionServer, consumer: str) -> None:
    config = ohttp_config(server)
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    data, context = seal_request(config, body)
    response = post_sealed(server, consumer, data)
    assert response.status_code == 200  # the outer answer; the inner one is the refusal
    inner = bhttp.decode_response(context.open(response.content))
    assert inner.status == 400
    assert json.loads(inner.content)["error"]["code"] == "output_policy"


def test_protect_show_and_set_reach_the_running_server(
    server: BastionServer, consumer: str
) -> None:
    shown = {
        row["model"]: row["output"]
        for row in json.loads(run_cli(server.home, "protect", "show", "--json").stdout)
    }
    assert shown["digits"] == "label_only (default)"
    assert shown["digits-full"] == "full" and shown["digits-sealed"] == "label_only"
    _, x_test, _, _ = digits_split()
    x = x_test[:50].astype(np.float32)
    run_cli(server.home, "protect", "set", "digits", "output=top_k=2,decimals=1")
    try:
        # The server reloads the model with its new policy (its worker is restarted).
        deadline = time.monotonic() + 60
        while True:
            metadata = httpx.get(
                f"{server.url}/v2/models/digits",
                headers={"authorization": f"Bearer {consumer}"},
            )
            policy = (metadata.json().get("output_policy") or {}).get("policy")
            if metadata.status_code == 200 and policy == "top_k=2,decimals=1":
                break
            assert time.monotonic() < deadline, metadata.text
            time.sleep(0.5)
        _, scores = _infer(server, consumer, "digits", x)
        assert (np.count_nonzero(scores, axis=1) <= 2).all()
        assert (np.count_nonzero(scores, axis=1) == 2).any()
    finally:
        run_cli(server.home, "protect", "set", "digits", "output=default")
    reset = json.loads(
        run_cli(server.home, "protect", "show", "--model", "digits", "--json").stdout
    )
    assert reset == [
        {"model": "digits", "output": "label_only (default)",
         "scores": "(by name: prob, score, logit)", "monitor": "off"}
    ]  # fmt: skip
    bad = run_cli(server.home, "protect", "set", "digits", "output=top_k=0", check=False)
    assert bad.returncode == 2 and "top_k" in bad.stderr
    missing = run_cli(server.home, "protect", "set", "nope", "output=full", check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_membership_inference_through_the_api_is_near_chance_by_default(
    server: BastionServer, consumer: str
) -> None:
    """The confidence-threshold attack (the attacker knows a record and its label, and
    reads the score of that label) on an overfit forest: with full scores it tells
    training records from others; under the default policy it is near chance (<= 0.55)."""
    from sklearn.metrics import roc_auc_score

    x_in, x_out, y_in, y_out = _forest_split()
    x = np.vstack([x_in, x_out])
    labels = np.r_[y_in, y_out]
    member = np.r_[np.ones(len(y_in)), np.zeros(len(y_out))]
    auc = {}
    for model in ("forest-full", "forest"):
        _, scores = _infer(server, consumer, model, x)
        auc[model] = roc_auc_score(member, scores[np.arange(len(labels)), labels])
    assert auc["forest-full"] >= 0.7, auc
    assert auc["forest"] <= 0.55, auc


def test_feature_squeezing_refuses_adversarial_digits(server: BastionServer, consumer: str) -> None:
    """FGSM examples (white-box: the attacker has the recipe's weights) fool the model;
    served with squeeze=on, most are refused (400 adversarial_input), real digits rarely."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = digits_split()
    recipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    recipe.fit(x_train, y_train)
    weights = recipe[1].coef_ / recipe[0].scale_
    gradient = (recipe.predict_proba(x_test) - np.eye(10)[y_test]) @ weights
    adversarial = np.clip(x_test + 2.0 * np.sign(gradient), 0, 16).astype(np.float32)
    fooled = recipe.predict(adversarial) != y_test

    def refused(model: str, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        codes = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for row in x:
                body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                    "data": row.tolist()}]}  # fmt: skip
                answer = client.post(
                    f"/v2/models/{model}/infer",
                    json=body,
                    headers={"authorization": f"Bearer {consumer}"},
                )
                assert answer.status_code in (200, 400), answer.text
                if answer.status_code == 400:
                    assert "squeezed" in answer.json()["error"]
                codes.append(answer.status_code == 400)
        return np.asarray(codes)

    assert fooled.mean() > 0.8
    assert refused("digits-squeezed", adversarial[fooled][:120]).mean() >= 0.7
    assert refused("digits-squeezed", x_test[:200]).mean() <= 0.08
    # Without the detector, nothing is refused.
    assert not refused("digits-full", adversarial[fooled][:20]).any()


def _forest_onnx(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], path: Any) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(n_estimators=50, random_state=0).fit(x, y)
    model = convert_sklearn(
        forest,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={"zipmap": False},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    path.write_bytes(model.SerializeToString())


def test_a_copy_trained_on_the_answers_is_identified_by_its_watermark(
    server: BastionServer, consumer: str, tmp_path: Any
) -> None:
    """A thief asks 3,000 near-real digits, trains a forest on the labels it got; the
    owner verifies the copy (an ONNX file, then an endpoint): p < 1e-9. A model trained
    independently is not flagged. Honest answers change at about the watermark's rate."""
    x_train, x_test, y_train, _ = digits_split()
    rng = np.random.default_rng(7)
    base = x_test[rng.integers(0, len(x_test), 3000)]
    queries = np.clip(base + rng.integers(-1, 2, base.shape), 0, 16).astype(np.float32)
    answered, _ = _infer(server, consumer, "digits-wm", queries)
    copy, independent = tmp_path / "copy.onnx", tmp_path / "independent.onnx"
    _forest_onnx(queries, answered, copy)
    _forest_onnx(x_train, y_train, independent)

    def verify(*args: str) -> dict[str, Any]:
        done = run_cli(server.home, "protect", "verify", "--model", "digits-wm", *args, "--json")
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    stolen = verify("--suspect-onnx", str(copy))
    assert stolen["stolen"] is True and stolen["p_value"] < 1e-9, stolen
    assert stolen["marks"] >= 5 and stolen["controls"] >= 5
    clean = verify("--suspect-onnx", str(independent))
    assert clean["stolen"] is False and clean["p_value"] > 0.01, clean
    # The same copy, served as an endpoint.
    served = tmp_path / "served"
    served.mkdir()
    (served / "model.onnx").write_bytes(copy.read_bytes())
    run_cli(
        server.home, "models", "add", "digits-copy", "--runtime", "onnx", "--path", str(served),
        "--protect", "output=full", "--protect", "monitor=off", "--protect", "watermark=off",
    )  # fmt: skip
    try:
        server.wait_ready(["digits-copy"])
        remote = verify(
            "--suspect-url", f"{server.url}/v2/models/digits-copy", "--suspect-key", consumer
        )
        assert remote["stolen"] is True and remote["marks"] == stolen["marks"], remote
    finally:
        run_cli(server.home, "models", "remove", "digits-copy")
    # What honest clients pay: the marked share of answers, about the 0.5 % rate.
    plain, _ = _infer(server, consumer, "digits-full", queries)
    assert 0 < float(np.mean(answered != plain)) <= 0.015
    # The gateway stores the records sealed: no input in the clear in the database.
    with sqlite3.connect(server.home / "bastion.db") as db:
        blobs = [row[0] for row in db.execute("SELECT blob FROM watermark_records")]
    assert blobs and not any(queries[0].tobytes() in blob for blob in blobs)


def test_verify_needs_one_suspect_and_records(server: BastionServer, tmp_path: Any) -> None:
    both = run_cli(
        server.home, "protect", "verify", "--model", "digits-wm", "--suspect-url", "x",
        "--suspect-onnx", "y", check=False,
    )  # fmt: skip
    assert both.returncode == 2 and "one of" in both.stderr
    none = run_cli(
        server.home, "protect", "verify", "--model", "digits", "--suspect-onnx", "y", check=False
    )
    assert none.returncode == 1 and "no record" in none.stderr
