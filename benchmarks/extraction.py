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
POLICIES = ["full", "decimals=2", "decimals=1", "top_k=3,decimals=2", DEFAULT_POLICY, "label_only"]
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
        for text in ("full", DEFAULT_POLICY):
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

    policies = ["full", "decimals=1", DEFAULT_POLICY, "top_k=1,decimals=1", "label_only"]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
