"""`bastion chat`: read a line, stream the model's answer, keep the conversation."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from bastion.cli.common import HomeOpt, JsonOpt, err, out, settings_of


def _stream_answer(
    client: httpx.Client,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    temperature: float,
    out: Console,
) -> str:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
    }
    pieces: list[str] = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {response.status_code}"
            raise RuntimeError(message)
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(event["error"].get("message", "stream failed"))
            for choice in event.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    pieces.append(text)
                    out.print(text, end="", highlight=False, markup=False)
    out.print()
    return "".join(pieces)


def run_chat(
    url: str,
    key: str,
    model: str,
    max_tokens: int,
    temperature: float,
    json_output: bool,
    out: Console,
    err: Console,
    *,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """Chat until end of input or /quit; returns the exit code.

    With an OHTTP `transport`, every message and answer is encrypted end to end.
    """
    messages: list[dict[str, str]] = []
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=120, transport=transport) as client:
        while True:
            if sys.stdin.isatty():
                out.print("[bold]you>[/] ", end="")
            line = sys.stdin.readline()
            if not line or line.strip() == "/quit":
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.strip()})
            try:
                if json_output:
                    quiet = Console(quiet=True)
                    answer = _stream_answer(client, model, messages, max_tokens, temperature, quiet)
                    sys.stdout.write(json.dumps({"role": "assistant", "content": answer}) + "\n")
                    sys.stdout.flush()
                else:
                    answer = _stream_answer(client, model, messages, max_tokens, temperature, out)
            except (RuntimeError, httpx.HTTPError) as exc:
                err.print(f"[red]error:[/] {exc}")
                return 1
            messages.append({"role": "assistant", "content": answer})


# ---------------------------------------------------------------- the command (bastion chat)


def chat(
    model: Annotated[str, typer.Option(help="Model to chat with.")] = "tiny-chat",
    url: Annotated[str, typer.Option(help="Server URL.")] = "http://127.0.0.1:8000",
    key: Annotated[
        str | None, typer.Option(envvar="BASTION_API_KEY", help="API key (default: admin.key).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    e2e: Annotated[
        bool,
        typer.Option(
            "--e2e", help="Encrypt end to end (Oblivious HTTP): only the model's worker reads it."
        ),
    ] = False,
    fingerprint: Annotated[
        list[str] | None,
        typer.Option(
            "--fingerprint",
            help="With --e2e: the server's OHTTP key fingerprint (`bastion ohttp keys`); repeat "
            "for several. Without it the key is trusted on first use and pinned in --pin-file.",
        ),
    ] = None,
    pin_file: Annotated[
        Path | None,
        typer.Option(help="With --e2e: pins file (default ~/.config/bastion/ohttp-pins.json)."),
    ] = None,
    kem: Annotated[
        str,
        typer.Option(
            help="With --e2e: the key agreement; auto takes the post-quantum hybrid "
            "(mlkem768-x25519) when the server offers it, else x25519; naming one requires it."
        ),
    ] = "auto",
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """A small interactive chat client (streams the answers). /quit ends it."""
    settings = settings_of(home)
    token = key
    if token is None:
        try:
            token = settings.admin_key_path.read_text().strip()
        except OSError:
            err.print("[red]error:[/] no --key given and no admin.key in the home directory")
            raise typer.Exit(2) from None
    transport = None
    if kem != "auto" and not e2e:
        err.print("[red]error:[/] --kem chooses the end-to-end encryption: it needs --e2e")
        raise typer.Exit(2)
    if e2e:
        from bastion.client import OHTTPKeyError, OHTTPTransport

        pins = pin_file or Path.home() / ".config" / "bastion" / "ohttp-pins.json"
        try:
            transport = OHTTPTransport(
                fingerprints=fingerprint or None,
                pin_file=None if fingerprint else pins,
                kem=kem.strip().lower(),
            )
            # Fetched now, so that the chat says what protects it before the first line.
            suite = transport.fetch_keys(url)
        except ValueError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        except (OHTTPKeyError, httpx.HTTPError) as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
        err.print(f"End-to-end encrypted (Oblivious HTTP): {suite}", highlight=False)
    code = run_chat(
        url, token, model, max_tokens, temperature, json_output, out, err, transport=transport
    )
    raise typer.Exit(code)
