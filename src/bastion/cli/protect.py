"""`bastion protect`: each model's protection policy, and the extraction monitor's findings.

`show` lists every model's policy, its own or the default; `set` changes one model's
(a running server restarts its worker with it, within its refresh interval); `status`
shows each key's extraction risk as the running gateway last wrote it; `clear` lifts a
key's block; `reference` stores what a model's real inputs look like in its directory, for
the monitor. See docs/model-protection.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer

from bastion.cli.common import HomeOpt, JsonOpt, err, open_home, out, print_json, run, table
from bastion.cli.models import PROTECT_KEYS, protect_options
from bastion.identity.principal import OPERATOR
from bastion.models.marks import MarksStore
from bastion.models.overrides import ALL_MODELS, OverrideStore
from bastion.models.registry import ModelRecord
from bastion.models.risk import RiskBoard
from bastion.models.watermark_secret import WatermarkSecret
from bastion.protection.monitor import REFERENCE_FILE, build_reference
from bastion.protection.policy import policy_view
from bastion.protection.textmark import TextWatermark
from bastion.protection.watermark import MarksError, error_upper_bound, open_marks, verify

app = typer.Typer(
    help="Model protection: what answers reveal, and who seems to be copying a model "
    "(see docs/model-protection.md).",
    no_args_is_help=True,
)
_COLUMNS = ["model", "output", "scores", "monitor"]
_LEVELS = ("alert", "throttle", "block")
_STATUS_COLUMNS = ["tenant", "key_id", "model", "risk", "level", "queries", "signals"]


@app.command("show")
def protect_show(
    model: Annotated[str | None, typer.Option("--model", help="One model only.")] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Each model's protection policy: its own, or the default."""
    h = open_home(home)
    records = [run(lambda: h.registry.get(model))] if model else run(h.registry.list)
    rows = [_policy(r) for r in records]
    if json_output:
        print_json(rows)
    else:
        table(rows, _COLUMNS, "Protection policies")


@app.command("set")
def protect_set(
    model: Annotated[str, typer.Argument(help="The model (* with --tenant or --key: all).")],
    settings: Annotated[
        list[str],
        typer.Argument(
            help="output=full|label_only|top_k=K,decimals=D, scores=OUTPUT[,OUTPUT], "
            "monitor=on|off, alert_at|throttle_at|block_at=RISK|off, throttle_rps=N; "
            "KEY=default goes back to the default"
        ),
    ],
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Only for this tenant's requests.")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only for this API key's.")] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Change a model's policy; `default` goes back to the default. With --tenant or
    --key, the settings hold for that caller only (output, monitor, alert_at,
    throttle_at, block_at, throttle_rps, watermark), over the model's own."""
    given = [s for s in settings if not s.endswith("=default")]
    changes: dict[str, str | None] = dict(protect_options(given))
    for reset in (s.removesuffix("=default") for s in settings if s.endswith("=default")):
        if reset not in PROTECT_KEYS:
            err.print(f"[red]error:[/] --protect takes {' or '.join(PROTECT_KEYS)}, got {reset!r}")
            raise typer.Exit(2)
        changes[f"protect.{reset}"] = None
    h = open_home(home)
    if tenant is not None or key is not None:
        if tenant is not None and key is not None:
            err.print("[red]error:[/] give --tenant or --key, not both")
            raise typer.Exit(2)
        kind, subject = ("tenant", tenant) if tenant is not None else ("key", key)
        assert subject is not None
        if model != ALL_MODELS:
            run(lambda: h.registry.get(model))
        short = {name.removeprefix("protect."): value for name, value in changes.items()}
        store = OverrideStore(h.db, h.events)
        override = run(lambda: store.set(OPERATOR, kind, subject, model, short))
        if json_output:
            print_json(override.as_dict())
        else:
            settings_text = ", ".join(f"{k}={v}" for k, v in override.options.items()) or "none"
            out.print(
                f"{kind.capitalize()} {subject} on {model}: {settings_text}; a running server "
                "applies it shortly."
            )
        return
    record = run(lambda: h.registry.set_protection(OPERATOR, model, changes))
    result = _policy(record)
    if json_output:
        print_json(result)
    else:
        out.print(
            f"Model {record.name}: output {result['output']}, monitor {result['monitor']}; "
            "a running server applies it shortly."
        )


@app.command("overrides")
def protect_overrides(home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """The protection settings tenants and API keys have of their own."""
    h = open_home(home)
    overrides = run(lambda: OverrideStore(h.db, h.events).list())
    rows = [
        {
            "kind": o.kind,
            "subject": o.subject,
            "model": o.model,
            "settings": ", ".join(f"{k}={v}" for k, v in sorted(o.options.items())),
        }
        for o in overrides
    ]
    if json_output:
        print_json([o.as_dict() for o in overrides])
    else:
        table(rows, ["kind", "subject", "model", "settings"], "Protection overrides")


@app.command("status")
def protect_status(
    tenant: Annotated[str | None, typer.Option("--tenant", help="One tenant only.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="One model only.")] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Each API key's extraction risk per model (highest first), as last reported."""
    h = open_home(home)
    records = run(lambda: RiskBoard(h.db).read(tenant=tenant, model=model))
    if json_output:
        print_json([r.as_dict() for r in records])
        return
    rows: list[dict[str, Any]] = [
        {
            **r.as_dict(),
            "risk": f"{r.risk:.2f}",
            "signals": ", ".join(f"{k} {v:g}" for k, v in sorted(r.signals.items())),
        }
        for r in records
    ]
    table(rows, _STATUS_COLUMNS, "Extraction risk")


@app.command("clear")
def protect_clear(
    key: Annotated[str, typer.Option("--key", help="The API key's id.")],
    model: Annotated[str | None, typer.Option("--model", help="One model only.")] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Lift an API key's extraction block and forget its history (every model, or one)."""
    h = open_home(home)
    cleared = run(lambda: RiskBoard(h.db, h.events).clear(OPERATOR, key, model))
    if json_output:
        print_json({"key_id": key, "cleared": cleared})
    elif cleared:
        out.print(f"Cleared {cleared} record(s) of key {key}; a running server applies it shortly.")
    else:
        err.print(
            f"[red]error:[/] key {key} has no extraction record" + (f" on {model}" if model else "")
        )
        raise typer.Exit(1)


@app.command("reference")
def protect_reference(
    model_dir: Annotated[
        Path, typer.Argument(help="The model's directory (before adding or importing it).")
    ],
    samples: Annotated[
        Path, typer.Argument(help="Real inputs: a .npy array [n, ...] or a .csv of rows, n >= 50.")
    ],
    json_output: JsonOpt = False,
) -> None:
    """Store what the model's real inputs look like (statistics, not the samples) in its
    directory, for the extraction monitor; add or import the model afterwards."""
    if not model_dir.is_dir():
        err.print(f"[red]error:[/] {model_dir} is not a directory")
        raise typer.Exit(2)
    try:
        if samples.suffix == ".npy":
            data = np.load(samples, allow_pickle=False)
        elif samples.suffix == ".csv":
            data = np.loadtxt(samples, delimiter=",", ndmin=2)
        else:
            err.print("[red]error:[/] samples must be a .npy or .csv file")
            raise typer.Exit(2)
        reference = build_reference(np.asarray(data, dtype=np.float64))
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/] cannot use {samples.name}: {exc}")
        raise typer.Exit(2) from None
    target = model_dir / REFERENCE_FILE
    target.write_bytes(reference.to_json())
    summary = {
        "path": str(target),
        "features": reference.features,
        "cells": reference.cells,
        "grid_step": reference.step,
    }
    if json_output:
        print_json(summary)
    else:
        out.print(f"Wrote {target} ({reference.features} features, {reference.cells} cells).")


@app.command("detect")
def protect_detect(
    model: Annotated[str, typer.Option("--model", help="The text model whose watermark to test.")],
    source: Annotated[
        str, typer.Argument(help="A file holding the text, or - for standard input.")
    ] = "-",
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Test whether a text carries a model's watermark: tokens scored, z-score, p-value
    (z > 4: watermarked; about 200 tokens are needed for a reliable answer)."""
    h = open_home(home)
    record = run(lambda: h.registry.get(model))
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        err.print(f"[red]error:[/] cannot read {source}: {exc}")
        raise typer.Exit(2) from None
    try:
        tokenizer, vocab_size = _tokenizer(h, record)
    except Exception as exc:  # tokenizers raises its own types for a bad tokenizer.json
        err.print(f"[red]error:[/] {model} has no tokenizer Bastion can read: {exc}")
        raise typer.Exit(2) from None
    key = run(lambda: WatermarkSecret(h.settings.home, h.keyring).model_key(model))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    found = TextWatermark(key, vocab_size).score(ids)
    result = {
        "model": model,
        "tokens": len(ids),
        "tokens_scored": found.tokens_scored,
        "green": found.green,
        "z": round(found.z, 3),
        "p_value": found.p_value,
        "watermarked": found.watermarked,
    }
    if json_output:
        print_json(result)
        return
    verdict = "watermarked" if found.watermarked else "not detected"
    out.print(
        f"{model}: {verdict} (z {found.z:.2f}, p {found.p_value:.2e}, "
        f"{found.tokens_scored} tokens scored)"
    )


@app.command("verify")
def protect_verify(
    model: Annotated[
        str, typer.Option("--model", help="The classifier whose watermark to look for.")
    ],
    suspect_url: Annotated[
        str | None,
        typer.Option(
            "--suspect-url",
            help="An Open Inference Protocol endpoint: the server's base URL, or the "
            "model's /v2/models/NAME URL.",
        ),
    ] = None,
    suspect_key: Annotated[
        str | None, typer.Option("--suspect-key", help="Bearer token for --suspect-url.")
    ] = None,
    suspect_onnx: Annotated[
        Path | None, typer.Option("--suspect-onnx", help="A suspect model as an ONNX file.")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Only the answers one API key got.")
    ] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Ask a suspect model the questions this model answered with its watermark: if it
    gives the watermark's answers far more often than chance, it was trained on them."""
    if (suspect_url is None) == (suspect_onnx is None):
        err.print("[red]error:[/] give one of --suspect-url or --suspect-onnx")
        raise typer.Exit(2)
    h = open_home(home)
    run(lambda: h.registry.get(model))
    private = run(lambda: WatermarkSecret(h.settings.home, h.keyring).marks_private_key())
    records = run(lambda: MarksStore(h.db).read(model, key))
    try:
        marks = _opened(private, [r for r in records if r.kind == "marks"])
        controls = _opened(private, [r for r in records if r.kind == "controls"])
    except (MarksError, ValueError) as exc:
        err.print(f"[red]error:[/] a sealed record of {model} cannot be opened: {exc}")
        raise typer.Exit(1) from None
    if marks is None:
        err.print(f"[red]error:[/] {model} has no record of watermarked answers (yet)")
        raise typer.Exit(1)
    classes = max(r.classes for r in records)
    try:
        ask = (
            _onnx_suspect(suspect_onnx)
            if suspect_onnx is not None
            else _http_suspect(str(suspect_url), suspect_key)
        )
        suspect_marks = ask(marks[0])
        suspect_controls = ask(controls[0]) if controls is not None else None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, httpx.HTTPError) as exc:
        err.print(f"[red]error:[/] the suspect could not be asked: {str(exc)[:300]}")
        raise typer.Exit(2) from None
    except Exception as exc:
        # onnxruntime raises its own types for a file that is not a model it can run.
        err.print(f"[red]error:[/] the suspect could not be run: {str(exc)[:300]}")
        raise typer.Exit(2) from None
    clean = None
    if controls is not None and suspect_controls is not None:
        disagreed = int((suspect_controls != controls[2]).sum())
        clean = 1.0 - error_upper_bound(disagreed, len(controls[2]))
    try:
        verdict = verify(
            marks[1], marks[2], suspect_marks, suspect_clean_agreement=clean, classes=classes
        )
    except ValueError as exc:
        err.print(f"[red]error:[/] the suspect's answers cannot be compared: {exc}")
        raise typer.Exit(2) from None
    result = {
        "model": model,
        "marks": verdict.marks,
        "agreed": verdict.agreed,
        "agreement": round(verdict.agreement, 4),
        "controls": 0 if controls is None else len(controls[2]),
        "clean_agreement_lower_bound": None if clean is None else round(clean, 4),
        "p_value": verdict.p_value,
        "stolen": verdict.stolen,
    }
    if json_output:
        print_json(result)
        return
    verdict_text = "trained on this model's answers" if verdict.stolen else "not shown to be a copy"
    out.print(
        f"{model}: suspect {verdict_text}: it gave {verdict.agreed} of {verdict.marks} "
        f"watermark answers (p {verdict.p_value:.2e}, threshold 1e-9)."
    )


Opened = tuple[Any, Any, Any]


def _opened(private: bytes, records: list[Any]) -> Opened | None:
    """The inputs, watermark (or shown) labels and true labels of sealed records, joined."""
    if not records:
        return None
    parts = [open_marks(private, r.blob) for r in records]
    shapes = {p[0].shape[1:] for p in parts}
    if len(shapes) != 1:
        raise ValueError("the model's records hold inputs of several shapes")
    inputs = np.concatenate([p[0] for p in parts])
    return inputs, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def _labels(outputs: list[Any], rows: int) -> Any:
    """A suspect's predicted classes: its integer output [rows], or the argmax of its
    first float output [rows, classes]."""
    arrays = [np.asarray(o) for o in outputs]
    for array in arrays:
        if array.dtype.kind in "iu" and array.shape == (rows,):
            return array.astype(np.int64)
    for array in arrays:
        if array.dtype.kind == "f" and array.ndim == 2 and array.shape[0] == rows:
            return np.argmax(array, axis=1)
    raise ValueError("the suspect gave no labels or scores")


def _onnx_suspect(path: Path) -> Any:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def ask(inputs: Any) -> Any:
        return _labels(session.run(None, {name: inputs.astype(np.float32)}), len(inputs))

    return ask


def _http_suspect(url: str, token: str | None) -> Any:
    base = url.rstrip("/")
    if "/v2/models/" not in base:
        raise ValueError("--suspect-url must name the model: .../v2/models/NAME")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    # The suspect's first input, by the name its metadata gives (Open Inference Protocol).
    metadata = httpx.get(base, headers=headers, timeout=30)
    if metadata.status_code != 200:
        raise RuntimeError(f"{metadata.status_code} {metadata.text[:200]}")
    name = str(metadata.json()["inputs"][0]["name"])

    def ask(inputs: Any) -> Any:
        labels = []
        with httpx.Client(timeout=60) as client:
            for start in range(0, len(inputs), 200):
                part = inputs[start : start + 200].astype(np.float32)
                tensor = {"name": name, "shape": list(part.shape), "datatype": "FP32",
                          "data": part.ravel().tolist()}  # fmt: skip
                answer = client.post(f"{base}/infer", json={"inputs": [tensor]}, headers=headers)
                if answer.status_code != 200:
                    raise RuntimeError(f"{answer.status_code} {answer.text[:200]}")
                outputs = []
                for output in answer.json()["outputs"]:
                    kind = (
                        np.int64 if output["datatype"].startswith(("INT", "UINT")) else np.float64
                    )
                    data = np.asarray(output["data"], dtype=kind)
                    outputs.append(data.reshape(output["shape"]))
                labels.append(_labels(outputs, len(part)))
        return np.concatenate(labels)

    return ask


def _tokenizer(h: Any, record: ModelRecord) -> tuple[Any, int]:
    """The model's tokenizer and vocabulary size, from its directory or its bundle."""
    from tokenizers import Tokenizer

    from bastion.models.bundle.reader import (
        IntegrityError,
        open_bundle_with_key,
        read_bundle,
        unseal_data_key,
    )
    from bastion.models.bundle_store import BUNDLE_OPTION, BundleStore

    path = Path(record.path)
    if not path.is_absolute():
        path = h.settings.home / path
    if BUNDLE_OPTION in record.options:
        try:
            bundle = read_bundle(path)
            key = unseal_data_key(bundle, h.keyring)
            trusted = BundleStore(h.settings.home, h.keyring).trusted_keys()
            _, files = open_bundle_with_key(bundle, key, trusted)
        except IntegrityError as exc:
            raise ValueError(str(exc)) from None
        tokenizer_json, config = bytes(files["tokenizer.json"]), bytes(files["config.json"])
    else:
        tokenizer_json = (path / "tokenizer.json").read_bytes()
        config = (path / "config.json").read_bytes()
    tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    vocab = json.loads(config).get("vocab_size") or tokenizer.get_vocab_size()
    return tokenizer, int(vocab)


def _policy(record: ModelRecord) -> dict[str, str]:
    """A model's policy as shown: its own settings, or what it gets by default."""
    view = policy_view(record.options)
    monitor = view["monitor"]
    if isinstance(monitor, dict):
        levels = ", ".join(f"{level} {monitor[f'{level}_at']}" for level in _LEVELS)
        monitor = levels if monitor["monitor"] == "on" else "off"
    return {
        "model": record.name,
        "output": view["output"] + (" (default)" if view["output_is_default"] else ""),
        "scores": view["scores"] or "(by name: prob, score, logit)",
        "monitor": monitor,
    }
