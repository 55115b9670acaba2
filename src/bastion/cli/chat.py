"""`bastion chat`: read a line, stream the model's answer, keep the conversation."""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx
from rich.console import Console


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
