"""Model extraction against the output policies (issue 12, part 1: what answers reveal).

    .venv/bin/python benchmarks/extraction.py            # about 3 minutes on 2 cores

The victim is the `digits` demo model's recipe (scikit-learn logistic regression on the
8x8 digits). The attacker sends noisy near-average images (the issue's probe) and gets
the scores Bastion's output policy lets through (bastion.protection.output, the code the
worker runs). Two attacks:

- equation-solving (Tramèr et al. 2016): log(p_a / p_b) is linear in x for a softmax
  model; least squares over every pair of classes an answer gives a score for;
- label-only retraining: a logistic regression trained on the answers' best classes.

Fidelity is the copy's agreement with the victim on the held-out split, at 100, 500 and
2,000 queries. The policy's cost is the change in the victim's held-out top-1 accuracy
when read from the policy's scores. The end-to-end test (tests/e2e/test_protection.py)
runs the equation-solving attack through a real server.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bastion.models.demo import digits_split
from bastion.protection.output import DEFAULT_POLICY, OutputPolicy

Array = np.ndarray[Any, Any]
POLICIES = [
    "full",
    "decimals=2",
    "decimals=1",
    "top_k=3,decimals=2",
    "top_k=1,decimals=2",
    "label_only",
]
BUDGETS = (100, 500, 2000)


def equation_solving(x: Array, p: Array) -> Callable[[Array], Array]:
    n, d = x.shape
    ones = np.hstack([x, np.ones((n, 1))])
    rows, targets = [], []
    for r in range(n):
        known = np.nonzero(p[r] > 0)[0]
        for a in known:
            for b in known:
                if a < b:
                    row = np.zeros((10, d + 1))
                    row[a], row[b] = ones[r], -ones[r]
                    rows.append(row[1:].ravel())
                    targets.append(np.log(p[r, a] / p[r, b]))
    if not rows:
        return lambda z: np.zeros(len(z), dtype=int)
    solved = np.linalg.lstsq(np.asarray(rows), np.asarray(targets), rcond=None)[0]
    weights = np.vstack([np.zeros(d + 1), solved.reshape(9, d + 1)])
    return lambda z: np.argmax(np.hstack([z, np.ones((len(z), 1))]) @ weights.T, axis=1)


def label_only(x: Array, p: Array) -> Callable[[Array], Array]:
    labels = np.argmax(p, axis=1)
    if len(set(labels)) < 2:
        return lambda z: np.full(len(z), labels[0])
    model: Any = LogisticRegression(max_iter=3000, C=10).fit(x, labels)
    return lambda z: np.asarray(model.predict(z))


def guard_overhead() -> None:
    """What the policy costs the worker per answer (the digits model's outputs)."""
    import timeit

    from bastion.protection.output import OutputGuard
    from bastion.wire.protocol import InferResult, ModelMetadata, TensorData, TensorSpec

    metadata = ModelMetadata(
        runtime="onnx",
        capabilities=["infer"],
        outputs=[
            TensorSpec(name="label", datatype="INT64", shape=[-1]),
            TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10]),
        ],
    )
    rng = np.random.default_rng(1)
    print("\n| answer | policy | µs per answer |")
    print("|---|---|---:|")
    for batch in (1, 64):
        scores = rng.dirichlet(np.ones(10), size=batch).astype("<f4")
        result = InferResult(
            id=1,
            outputs=[
                TensorData(name="label", datatype="INT64", shape=[batch], raw=bytes(8 * batch)),
                TensorData(
                    name="probabilities", datatype="FP32", shape=[batch, 10], raw=scores.tobytes()
                ),
            ],
        )
        for text in ("full", "top_k=1,decimals=2", "label_only"):
            guard = OutputGuard({"protect.output": text}, metadata)
            runs = 20000
            seconds = min(
                timeit.repeat(lambda g=guard, r=result: g.apply(r), number=runs, repeat=3)
            )
            print(f"| {batch} x 10 scores | {text} | {1e6 * seconds / runs:.1f} |")


def membership_inference() -> None:
    """Confidence-threshold membership inference (the attacker knows a record's label and
    reads the score of that label) against deliberately overfit classifiers, per policy:
    ROC AUC of telling training records from held-out ones (0.5: no better than chance)."""
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    policies = ["full", "decimals=1", "top_k=1,decimals=2", "top_k=1,decimals=1", "label_only"]
    print("\n| overfit model | train / test accuracy | " + " | ".join(policies) + " |")
    print("|---|---|" + "---:|" * len(policies))
    for name, loader in (
        ("random forest, digits", load_digits),
        ("random forest, breast cancer", load_breast_cancer),
    ):
        features, labels = loader(return_X_y=True)
        x_in, x_out, y_in, y_out = train_test_split(
            features, labels, test_size=0.5, random_state=0, stratify=labels
        )
        model: Any = RandomForestClassifier(n_estimators=50, random_state=0).fit(x_in, y_in)
        scores_in = model.predict_proba(x_in).astype(np.float32)
        scores_out = model.predict_proba(x_out).astype(np.float32)
        cells = []
        for text in policies:
            policy = OutputPolicy.parse(text)
            seen = policy.apply_scores(scores_in)[np.arange(len(y_in)), y_in]
            unseen = policy.apply_scores(scores_out)[np.arange(len(y_out)), y_out]
            truth = np.r_[np.ones(len(seen)), np.zeros(len(unseen))]
            cells.append(f"{roc_auc_score(truth, np.r_[seen, unseen]):.3f}")
        accuracy = f"{model.score(x_in, y_in):.2f} / {model.score(x_out, y_out):.2f}"
        print(f"| {name} | {accuracy} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------- the extraction monitor


def jbda(victim: Any, seeds: Array, n: int) -> Array:
    """Jacobian-based augmentation (Papernot et al. 2017) from 50 real digits, with a
    logistic-regression substitute trained on the victim's labels each round."""
    points = seeds.astype(np.float64)
    while len(points) < n:
        substitute: Any = LogisticRegression(max_iter=500).fit(points, victim.predict(points))
        classes = list(substitute.classes_)
        rows = [classes.index(c) for c in substitute.predict(points)]
        points = np.vstack([points, np.clip(points + 1.6 * np.sign(substitute.coef_[rows]), 0, 16)])
    return points[:n]


def streams(victim: Any, x_train: Array, pool: Array, rng: Any) -> dict[str, Array]:
    """Each attacker's 2,000 queries, in the order it sends them (real digits come from
    `pool`, which the fidelity is not measured on)."""
    mean, spread = x_train.mean(axis=0), x_train.std(axis=0) + 1e-3
    natural = pool[rng.integers(0, len(pool), 2000)]
    return {
        "equation-solving probes": np.clip(mean + rng.normal(size=(2000, 64)) * spread, 0, 16),
        "random inputs": rng.uniform(0, 16, (2000, 64)),
        "JBDA (50 real seeds)": jbda(victim, pool[rng.permutation(len(pool))[:50]], 2000),
        "natural data (held-out digits)": natural,
    }


def watch(monitor: Any, victim: Any, stream: Array) -> dict[str, int]:
    """Queries (one a request) until the monitor first reports each level."""
    first: dict[str, int] = {}
    labels = victim.predict(stream)
    for i, row in enumerate(stream.astype(np.float32)):
        report = monitor.observe("key", "tenant", row[None], labels[i : i + 1])
        if report is not None:
            first.setdefault(report.level, i + 1)
    return first


def monitor_tables(victim: Any, x_train: Array, x_test: Array, seed: int) -> None:
    """Per attack: queries until the default monitor alerts and blocks, the copy's
    fidelity at 100 / 500 / 2,000 queries per policy, and what the thief holds when it
    is blocked; then the benign false-positive rate and the monitor's cost."""
    from bastion.protection.monitor import ExtractionMonitor, MonitorPolicy, build_reference

    reference = build_reference(x_train)
    rng = np.random.default_rng(seed)
    # The thief's real digits and the digits its copy is judged on are disjoint halves.
    pool, x_test = x_test[: len(x_test) // 2], x_test[len(x_test) // 2 :]
    truth = victim.predict(x_test)
    policies = ["full", "top_k=1,decimals=2", DEFAULT_POLICY]
    names = [f"{p}{' (default)' if p == DEFAULT_POLICY else ''}" for p in policies]
    print(
        "\n| attack (2,000 queries, one a request) | alert at | blocked at | "
        + " | ".join(f"{n}: copy at block / unwatched at 2,000" for n in names)
        + " |"
    )
    print("|---|---:|---:|" + "---:|" * len(policies))
    for name, stream in streams(victim, x_train, pool, rng).items():
        first = watch(ExtractionMonitor(MonitorPolicy(), reference), victim, stream)
        blocked = first.get("block")
        answers_full = victim.predict_proba(stream.astype(np.float32)).astype(np.float32)
        cells = []
        for text in policies:
            answers = OutputPolicy.parse(text).apply_scores(answers_full).astype(np.float64)
            # The thief's best of equation-solving (probes only) and label-only retraining.
            attacks = [equation_solving, label_only] if "probes" in name else [label_only]
            budgets = [*([blocked] if blocked else []), len(stream)]
            fidelity = [
                max(float(np.mean(a(stream[:n], answers[:n])(x_test) == truth)) for a in attacks)
                for n in budgets
            ]
            at_block = f"{100 * fidelity[0]:.0f} %" if blocked else "-"
            cells.append(f"{at_block} / {100 * fidelity[-1]:.0f} %")
        alert = first.get("alert", first.get("block", "never"))
        print(f"| {name} | {alert} | {blocked or 'never'} | " + " | ".join(cells) + " |")
    benign(victim, np.vstack([pool, x_test]), reference, rng)
    monitor_overhead(victim, x_test, reference)


def benign(victim: Any, x_test: Array, reference: Any, rng: Any) -> None:
    from bastion.protection.monitor import ExtractionMonitor, MonitorPolicy

    tenants, alerted, blocked = 50, 0, 0
    sizes = []
    for _ in range(tenants):
        size = int(rng.integers(100, len(x_test)))
        sizes.append(size)
        stream = x_test[rng.permutation(len(x_test))[:size]]
        first = watch(ExtractionMonitor(MonitorPolicy(), reference), victim, stream)
        alerted += "alert" in first or "block" in first
        blocked += "block" in first
    print(
        f"\nBenign tenants (real held-out digits, {min(sizes)}-{max(sizes)} queries each): "
        f"{blocked} of {tenants} blocked, {alerted} alerted (coverage: heavy users explore "
        "the input space as a natural-data thief does)."
    )


def monitor_overhead(victim: Any, x_test: Array, reference: Any) -> None:
    import timeit

    from bastion.protection.monitor import ExtractionMonitor, MonitorPolicy

    monitor = ExtractionMonitor(MonitorPolicy(), reference)
    labels = victim.predict(x_test)
    rows = [x_test[i : i + 1].astype(np.float32) for i in range(len(x_test))]
    for i, row in enumerate(rows):  # a warm history of a few hundred queries
        monitor.observe("k", "t", row, labels[i : i + 1])
    counter = iter(range(10**9))

    def one() -> None:
        i = next(counter) % len(rows)
        monitor.observe(f"k{i % 8}", "t", rows[i], labels[i : i + 1])

    runs = 4000
    per = min(timeit.repeat(one, number=runs, repeat=5)) / runs
    batch = x_test[:64].astype(np.float32)
    per_batch = (
        min(
            timeit.repeat(
                lambda: monitor.observe("b", "t", batch, labels[:64]), number=200, repeat=3
            )
        )
        / 200
    )
    print(
        f"\nMonitor cost in the worker: {1e6 * per:.1f} µs per one-image request, "
        f"{1e6 * per_batch:.0f} µs per 64-image request (best of 5)."
    )


# What the throughput table compares: the model's protect options, and how it is named.
VARIANTS = {
    "off": ["output=full", "monitor=off", "watermark=off"],
    "policy": ["monitor=off", "watermark=off"],
    "monitor": ["watermark=off"],
    "watermark": ["monitor=off"],
    "on": [],
}
VARIANT_NAMES = {
    "off": "everything off (output=full, monitor=off, watermark=off)",
    "policy": "label_only alone",
    "monitor": "label_only + monitor",
    "watermark": "label_only + watermark",
    "on": "the defaults (label_only + monitor + watermark)",
}


def throughput(reps: int, dur: int) -> None:
    """Requests per second through a real server, protection on (the defaults: label_only,
    monitor with a reference, watermark) against off (`output=full`, `monitor=off`,
    `watermark=off`), same run, interleaved; wrk at 16 connections, each request one real
    held-out digit in turn."""
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gateway_servers import bastion_env
    from proctree import Fleet

    with (
        tempfile.TemporaryDirectory(prefix="bastion-extraction-") as tmp,
        Fleet(Path(tmp)) as fleet,
    ):
        rates = _throughput_run(fleet, Path(tmp), bastion_env(), reps, dur)
    median = {name: float(np.median(values)) for name, values in rates.items()}
    print(
        f"\nThroughput, digits through a server, wrk 16 connections, {reps} x {dur} s "
        "interleaved (target: protection on >= 95 % of off):\n"
    )
    print("| served with | req/s | vs everything off | vs label_only alone |")
    print("|---|---:|---:|---:|")
    for name, label in VARIANT_NAMES.items():
        print(
            f"| {label} | {median[name]:.0f} | {100 * median[name] / median['off']:.1f} % | "
            f"{100 * median[name] / median['policy']:.1f} % |"
        )


def _throughput_run(
    fleet: Any, work: Any, env: dict[str, str], reps: int, dur: int
) -> dict[str, list[float]]:
    import json
    import subprocess

    import httpx

    from bastion.models.demo import digits_onnx
    from bastion.protection.monitor import REFERENCE_FILE, build_reference
    from gateway_servers import HERE, WRK, bastion, free_port, run_command, wait_until

    x_train, x_test, _, _ = digits_split()
    model = work / "digits"
    model.mkdir()
    (model / "model.onnx").write_bytes(digits_onnx())
    (model / REFERENCE_FILE).write_bytes(build_reference(x_train).to_json())
    home = str(work / "home")
    run_command(bastion("init", "--home", home, "--no-demo-models", "--json"), env)
    for name, protect in VARIANTS.items():
        extra = [arg for p in protect for arg in ("--protect", p)]
        add = ["models", "add", f"digits-{name}", "--runtime", "onnx", "--path", str(model)]
        run_command(bastion(*add, *extra, "--home", home), env)
    run_command(bastion("tenants", "create", "bench", "--home", home), env)
    create = ["keys", "create", "--tenant", "bench", "--model", "digits-*", "--json"]
    key = json.loads(run_command(bastion(*create, "--home", home), env))["key"]
    port = free_port()
    serve = bastion("serve", "--home", home, "--port", str(port), "--no-demo-models")
    server = fleet.start("bastion", serve, env)
    base = f"http://127.0.0.1:{port}"
    auth = {"authorization": f"Bearer {key}"}

    def ready() -> bool:
        urls = [f"{base}/v2/models/digits-{n}/ready" for n in VARIANTS]
        try:
            return all(httpx.get(url, headers=auth).status_code == 200 for url in urls)
        except httpx.HTTPError:
            return False

    wait_until(server, ready, 120)
    bodies = work / "bodies.txt"
    tensors = ({"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}
               for row in x_test)  # fmt: skip
    bodies.write_text("\n".join(json.dumps({"inputs": [tensor]}) for tensor in tensors))
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(reps):
        for name in VARIANTS:
            command = [WRK, "-t1", "-c16", f"-d{dur}s", "-s", str(HERE / "post.lua")]
            out = subprocess.run(
                [*command, f"{base}/v2/models/digits-{name}/infer"],
                env={**env, "BODYFILE": str(bodies), "AUTH": f"Bearer {key}"},
                capture_output=True,
                text=True,
                timeout=dur + 60,
            )
            fields = dict(pair.split("=") for pair in out.stdout.split("RESULT ")[1].split())
            if int(fields["err_status"]):
                raise RuntimeError(f"digits-{name} answered errors: {out.stdout}")
            rates[name].append(int(fields["requests"]) / (int(fields["duration_us"]) / 1e6))
    return rates


# ---------------------------------------------------------------- watermarks


def watermark_tables(victim: Any, x_train: Array, x_test: Array, seed: int) -> None:
    """Ownership: a thief's copy trained on the watermarked answers against a model
    trained independently, verified as `bastion protect verify` does (marks, and the
    controls' agreement as the clean bound); then the text watermark on tiny-chat."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier

    from bastion.protection.watermark import ClassifierWatermark, error_upper_bound, verify

    rng = np.random.default_rng(seed)
    marks = ClassifierWatermark(rng.bytes(32), 0.005)
    controls = ClassifierWatermark(rng.bytes(32), 0.005)
    pool, held_out = x_test[: len(x_test) // 2], x_test[len(x_test) // 2 :]
    stream = pool[rng.integers(0, len(pool), 5000)]
    stream = np.clip(stream + rng.integers(-1, 2, stream.shape), 0, 16).astype(np.float32)
    scores = victim.predict_proba(stream)
    true = scores.argmax(axis=1)
    shown_scores, marked = marks.apply(stream, scores)
    shown = shown_scores.argmax(axis=1)
    controlled = controls.select(stream) & ~marked
    makers: dict[str, Callable[[], Any]] = {
        "random forest": lambda: RandomForestClassifier(n_estimators=100, random_state=0),
        "1-NN": lambda: KNeighborsClassifier(1),
        "MLP": lambda: MLPClassifier((128,), max_iter=500, random_state=0),
        "logistic regression": lambda: LogisticRegression(max_iter=3000),
    }
    print(
        "\n| answered queries | surrogate | marks | reproduced | p (copy) | "
        "p (independent) | copy's fidelity |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    truth = victim.predict(held_out)
    for n in (2000, 5000):
        m, c = marked[:n], controlled[:n]
        for name, make in makers.items():
            copy = make().fit(stream[:n], shown[:n])
            independent = make().fit(x_train, victim.predict(x_train))
            cells = []
            for suspect in (copy, independent):
                answers = suspect.predict(stream[:n])
                disagreed = int((answers[c] != true[:n][c]).sum())
                clean = 1.0 - error_upper_bound(disagreed, int(c.sum()))
                verdict = verify(
                    shown[:n][m], true[:n][m], answers[m],
                    suspect_clean_agreement=clean, classes=10,
                )  # fmt: skip
                cells.append(verdict)
            fidelity = float(np.mean(copy.predict(held_out) == truth))
            print(
                f"| {n:,} | {name} | {cells[0].marks} | {cells[0].agreed} | "
                f"{cells[0].p_value:.1e} | {cells[1].p_value:.2f} | {100 * fidelity:.0f} % |"
            )
    changed = float(np.mean(marked))
    print(
        f"\nHonest cost of the classifier watermark: {100 * changed:.2f} % of answers changed "
        f"(rate 0.5 %), top-1 accuracy {-100 * changed * 0.97:+.2f} pts expected."
    )
    text_watermark(seed)


def text_watermark(seed: int) -> None:
    """tiny-chat, in this process: z-scores of its answers (T=0.8) with and without the
    watermark, and of human text (this repository's docs), over about 200 tokens each."""
    import importlib.resources
    from pathlib import Path

    from bastion.protection.textmark import TextWatermark
    from bastion.runtimes.base import CancelToken
    from bastion.runtimes.textgen import TextGenerationRuntime
    from bastion.wire.protocol import ChatMessage, Generate

    assets = importlib.resources.files("bastion.models") / "demo_assets" / "tiny-chat"
    runtime = TextGenerationRuntime(Path(str(assets)), threads=1)
    mark = TextWatermark(np.random.default_rng(seed).bytes(32), runtime.vocab_size)
    prompts = [
        "Tell me about the sea.",
        "What is a good breakfast?",
        "Describe a city.",
        "Why do people like music?",
        "Write about a forest walk.",
        "What is a friend?",
    ]

    def answers(bias: Any, salt: int) -> str:
        runtime.set_logits_bias(bias)
        texts = []
        for i, prompt in enumerate(prompts):
            request = Generate(
                id=i, messages=[ChatMessage(role="user", content=prompt)],
                max_tokens=60, temperature=0.8, seed=salt + i,
            )  # fmt: skip
            texts.append(runtime.generate(request, CancelToken(), lambda *_: None).choices[0].text)
        return "\n".join(texts)

    print("\n| text (about 200 tokens each) | samples | z min / median / max | detected (z > 4) |")
    print("|---|---:|---:|---:|")
    docs = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))
    rows = {
        "tiny-chat, watermarked, T=0.8": [answers(mark.bias, 100 * k) for k in range(5)],
        "tiny-chat, no watermark, T=0.8": [answers(None, 100 * k) for k in range(5)],
        "human text (docs/*.md)": [d.read_text(encoding="utf-8")[:1500] for d in docs[:10]],
    }
    for name, texts in rows.items():
        z = [mark.score(runtime.tokenize(t)[:220]).z for t in texts]
        found = sum(v > 4 for v in z)
        print(
            f"| {name} | {len(z)} | {min(z):.1f} / {float(np.median(z)):.1f} / {max(z):.1f} | "
            f"{found} of {len(z)} |"
        )
    runtime.set_logits_bias(None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=3, help="throughput repetitions")
    parser.add_argument("--dur", type=int, default=5, help="seconds per throughput run")
    parser.add_argument(
        "--skip-server", action="store_true", help="leave out the throughput through a server"
    )
    parser.add_argument(
        "--only-server", action="store_true", help="only the throughput through a server"
    )
    args = parser.parse_args()
    if args.only_server:
        throughput(args.reps, args.dur)
        return 0
    x_train, x_test, y_train, y_test = digits_split()
    victim: Any = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    victim.fit(x_train, y_train)
    truth = victim.predict(x_test)
    rng = np.random.default_rng(args.seed)
    mean, spread = x_train.mean(axis=0), x_train.std(axis=0) + 1e-3
    probes = np.clip(mean + rng.normal(size=(max(BUDGETS), 64)) * spread, 0, 16)
    answers_full = victim.predict_proba(probes.astype(np.float32)).astype(np.float32)
    held_out = victim.predict_proba(x_test).astype(np.float32)
    print("| policy | top-1 accuracy (change) | equation-solving 100 / 500 / 2,000 | "
          "label-only retraining 100 / 500 / 2,000 |")  # fmt: skip
    print("|---|---:|---:|---:|")
    base = float(np.mean(np.argmax(held_out, axis=1) == y_test))
    for text in POLICIES:
        policy = OutputPolicy.parse(text)
        answers = policy.apply_scores(answers_full)
        accuracy = float(np.mean(np.argmax(policy.apply_scores(held_out), axis=1) == y_test))
        cells = []
        for attack in (equation_solving, label_only):
            fidelity = [
                float(np.mean(attack(probes[:n], answers[:n].astype(np.float64))(x_test) == truth))
                for n in BUDGETS
            ]
            cells.append(" / ".join(f"{100 * f:.0f} %" for f in fidelity))
        name = f"{text} (default)" if text == DEFAULT_POLICY else text
        change = f"{100 * (accuracy - base):+.2f} pts"
        print(f"| {name} | {100 * accuracy:.2f} % ({change}) | {cells[0]} | {cells[1]} |")
    membership_inference()
    guard_overhead()
    monitor_tables(victim, x_train, x_test, args.seed)
    watermark_tables(victim, x_train, x_test, args.seed)
    if not args.skip_server:
        throughput(args.reps, args.dur)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
