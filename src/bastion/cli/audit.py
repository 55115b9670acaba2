"""`bastion audit`: verify, prove, export and prune the tamper-evident audit log."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion import __version__
from bastion.audit import merkle
from bastion.audit.events import ADMIN_READ, AUDIT_VERIFY_FAILED, Event
from bastion.audit.log import AuditLogError, AuditRecord, iso_time
from bastion.audit.note import MalformedKeyError, Verifier, b64encode
from bastion.audit.verify import verify_log
from bastion.audit.writer import AuditWriter
from bastion.bootstrap import Home
from bastion.cli.common import HomeOpt, JsonOpt, err, open_home, out, print_json, run, table
from bastion.errors import InvalidRequest
from bastion.identity.principal import OPERATOR
from bastion.quotas.usage import parse_since

app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


def _audited_home(home: Path | None) -> tuple[Home, AuditWriter]:
    h = open_home(home)
    if h.audit is None:
        raise _fail("the audit log is off (BASTION_AUDIT_ENABLED=false)", 1)
    return h, h.audit


def _time_ms(value: str | None, what: str) -> int | None:
    """An ISO 8601 date or time (UTC unless it says), or an age like 7d, 12h, 30m: what
    `bastion usage --since` takes."""
    if value is None:
        return None
    try:
        moment = parse_since(value, datetime.now(UTC))
    except InvalidRequest as exc:
        raise _fail(f"{what}: {exc.message.removeprefix('since ')}") from None
    return int(moment.timestamp() * 1000)


def _verifier(audit: AuditWriter, key: str | None) -> Verifier:
    """The log's key: given by the caller (a witness's copy), else the key ring's own."""
    if key is not None:
        return _given_key(key)
    verifier = run(audit.log.own_verifier)
    if verifier is None:
        raise _fail("the audit log has no records yet", 1)
    return verifier


def _given_key(key: str) -> Verifier:
    try:
        path = Path(key)
        text = path.read_text().strip() if path.is_file() else key.strip()
        return Verifier.parse(text)
    except (OSError, UnicodeDecodeError, MalformedKeyError, ValueError):
        raise _fail(
            "--key is a verifier key (name+id+key) or a readable file holding one"
        ) from None


def _keys(audit: AuditWriter, key: str | None) -> tuple[Verifier, bytes | None, list[str]]:
    """The key to check signatures with, the records' MAC key when the key ring opens the
    log's seed (and it is the given key's), and problems found on the way."""
    problems: list[str] = []
    try:
        own = audit.log.own_keys()
    except AuditLogError as exc:
        own = None
        problems.append(exc.message)
    if key is not None:
        verifier = _given_key(key)
        return verifier, own[1] if own and own[0] == verifier else None, problems
    if own is None:
        raise _fail(problems[0] if problems else "the audit log has no records yet", 1)
    return own[0], own[1], problems


@app.command("verify")
def verify(
    from_checkpoint: Annotated[
        list[Path] | None,
        typer.Option(
            "--from-checkpoint",
            help="A signed checkpoint kept elsewhere (a witness's copy); the log must not "
            "have rolled back behind it or diverged from it. Repeatable.",
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(help="The log's verifier key (or a file), instead of the key ring's."),
    ] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Recompute the log's Merkle tree and check it against every signed checkpoint."""
    h, audit = _audited_home(home)
    notes = []
    for path in from_checkpoint or []:
        try:
            notes.append(path.read_bytes())
        except OSError:
            raise _fail(f"cannot read {path}") from None
    verifier, mac_key, problems = _keys(audit, key)
    stored = run(audit.log.stored_verifier)
    report = run(lambda: verify_log(h.db, verifier, mac_key=mac_key, witness_notes=notes))
    report.problems[:0] = problems
    if stored is not None and stored != verifier and not problems:
        report.problems.insert(0, "The log's stored public key is not the key it was checked with.")
    if not report.ok:
        h.events.emit(
            Event(
                kind=AUDIT_VERIFY_FAILED,
                outcome="failure",
                actor=OPERATOR.key_id,
                detail={"problems": len(report.problems), "first": report.problems[0]},
            )
        )
    if json_output:
        print_json(report.as_dict())
    else:
        state = "[green]OK[/]" if report.ok else "[red]FAILED[/]"
        out.print(
            f"audit log {verifier.name}: {state} — {report.size} records, "
            f"{report.checkpoints} checkpoints checked, {report.unsigned} after the latest, "
            f"pruned below {report.pruned_below}, {report.witnesses} witness checkpoints",
            highlight=False,
        )
        for problem in report.problems:
            out.print(f"  [red]✗[/] {problem}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@app.command("proof")
def proof(
    index: Annotated[
        int | None, typer.Option(help="Prove that record INDEX is in the tree.")
    ] = None,
    old_size: Annotated[
        int | None, typer.Option("--old-size", help="Prove the tree of OLD_SIZE is a prefix.")
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(help="The tree size to prove against (default: the latest checkpoint's)."),
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Print an inclusion proof (--index) or a consistency proof (--old-size) as JSON."""
    if (index is None) == (old_size is None):
        raise _fail("give --index (inclusion) or --old-size (consistency)")
    _, audit = _audited_home(home)
    if size is None:
        latest = run(audit.log.latest_checkpoint)
        if latest is None:
            raise _fail("no checkpoint is signed yet; give --size", 1)
        size = latest.size
    if size < 0 or (index is not None and not 0 <= index < size):
        raise _fail(f"--index must be within 0..{size - 1}")
    if old_size is not None and not 0 <= old_size <= size:
        raise _fail(f"--old-size must be within 0..{size}")
    try:
        leaves = audit.log.leaves(size)
        answer: dict[str, Any] = {
            "size": size,
            "root": b64encode(audit.log.tree_root(size, leaves)),
        }
        if index is not None:
            found = audit.log.records(after_seq=index - 1, limit=1)
            if not found or found[0].seq != index:
                raise _fail(f"record {index} is not in the log (pruned or never written)", 1)
            answer |= {
                "index": index,
                "entry": found[0].entry,
                "leaf_hash": b64encode(found[0].leaf_hash),
                "proof": [b64encode(n) for n in merkle.inclusion_proof(index, leaves)],
            }
        else:
            assert old_size is not None
            old_root = audit.log.tree_root(old_size, leaves) if old_size else merkle.EMPTY_ROOT
            answer |= {
                "old_size": old_size,
                "old_root": b64encode(old_root),
                "proof": [b64encode(n) for n in merkle.consistency_proof(old_size, leaves)],
            }
    except AuditLogError as exc:
        raise _fail(exc.message, 1) from None
    except ValueError as exc:
        raise _fail(f"{exc}: records that old were pruned", 1) from None
    signed = run(lambda: audit.log.checkpoint_at(size))
    answer["checkpoint"] = signed.note if signed is not None else None
    if old_size is not None:
        old = run(lambda: audit.log.checkpoint_at(old_size))
        answer["old_checkpoint"] = old.note if old is not None else None
    print_json(answer)


@app.command("checkpoints")
def checkpoints(
    latest: Annotated[bool, typer.Option("--latest", help="Only the latest, as a note.")] = False,
    after: Annotated[int | None, typer.Option(help="Only those larger than this size.")] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """The signed checkpoints, for a witness to keep copies of (and the verifier key)."""
    _, audit = _audited_home(home)
    if latest:
        newest = run(audit.log.latest_checkpoint)
        if newest is None:
            raise _fail("no checkpoint is signed yet", 1)
        sys.stdout.write(newest.note)
        return
    rows = run(lambda: audit.log.checkpoints(after_size=after))
    verifier = run(audit.log.own_verifier)
    if json_output:
        print_json(
            {
                "key": verifier.encode() if verifier else None,
                "checkpoints": [
                    {"size": c.size, "signed_at": iso_time(c.at_ms), "note": c.note} for c in rows
                ],
            }
        )
        return
    if verifier is not None:
        out.print(f"verifier key: {verifier.encode()}", highlight=False)
    table(
        [{"size": c.size, "signed_at": iso_time(c.at_ms)} for c in rows],
        ["size", "signed_at"],
        "audit checkpoints",
    )


@app.command("key")
def key(home: HomeOpt = None) -> None:
    """Print the log's verifier key (give it to witnesses and auditors)."""
    _, audit = _audited_home(home)
    verifier = run(audit.log.own_verifier)
    if verifier is None:
        raise _fail("the audit log has no records yet", 1)
    sys.stdout.write(verifier.encode() + "\n")


@app.command("export")
def export(
    since: Annotated[str | None, typer.Option(help="From this time (ISO) or age (7d).")] = None,
    until: Annotated[str | None, typer.Option(help="Before this time (ISO) or age.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's records.")] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="jsonl (the signed entries) or cef (ArcSight).")
    ] = "jsonl",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to a file (default stdout).")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Export records for a SIEM: one JSON entry (as hashed) or one CEF line per record."""
    if output_format not in ("jsonl", "cef"):
        raise _fail("--format is jsonl or cef")
    since_ms, until_ms = _time_ms(since, "--since"), _time_ms(until, "--until")
    h, audit = _audited_home(home)
    records = audit.log.iter_records(since_ms=since_ms, until_ms=until_ms, tenant=tenant)
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        for record in records:
            count += 1
            yield record.entry if output_format == "jsonl" else cef_line(record)

    run(lambda: _write_lines(lines(), output))
    h.events.emit(
        Event(
            kind=ADMIN_READ,
            actor=OPERATOR.key_id,
            tenant=tenant,
            target="audit",
            detail={"records": count, "format": output_format},
        )
    )


@app.command("prune")
def prune(
    retention_days: Annotated[
        float | None, typer.Option(help="Keep this many days (default: the setting).")
    ] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Remove records older than the retention, with a signed note of what was removed."""
    h, audit = _audited_home(home)
    days = h.settings.audit_retention_days if retention_days is None else retention_days
    if not math.isfinite(days) or days < 0:
        raise _fail("--retention-days must be a finite number of days, 0 or more")
    removed = run(lambda: audit.log.prune(days * 86_400))
    if json_output:
        print_json({"pruned": removed})
    else:
        out.print(f"pruned {removed} records older than {days:g} days")


def cef_line(record: AuditRecord) -> str:
    """One record as ArcSight Common Event Format (CEF:0)."""
    fields = record.fields()
    severity = "3" if record.outcome == "success" else "7"
    extension = {
        "rt": str(record.at_ms),
        "suser": record.actor,
        "outcome": record.outcome,
        "cs1Label": "tenant",
        "cs1": record.tenant,
        "cs2Label": "target",
        "cs2": record.target,
        "cn1Label": "seq",
        "cn1": str(record.seq),
        "msg": json.dumps(fields.get("detail", {}), sort_keys=True, separators=(",", ":")),
    }
    header = ["CEF:0", "Bastion", "Bastion", __version__, record.action, record.action, severity]
    text = "|".join(_cef_header(part) for part in header)
    pairs = " ".join(f"{k}={_cef_value(v)}" for k, v in extension.items() if v is not None)
    return f"{text}|{pairs}"


def _cef_header(value: str) -> str:
    return value.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _cef_value(value: str) -> str:
    text = value.replace("\\", "\\\\").replace("=", "\\=")
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _write_lines(lines: Iterable[str], output: Path | None) -> None:
    if output is None:
        for line in lines:
            sys.stdout.write(line + "\n")
        return
    try:
        with output.open("w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(line + "\n")
    except OSError:
        raise _fail(f"cannot write {output}") from None
