"""Chat templates render in Jinja's immutable sandbox and fail as input errors."""

from __future__ import annotations

import pytest

from bastion.runtimes.base import RuntimeInputError
from bastion.runtimes.chat_template import ChatTemplate, find_template_source, special_token_text
from bastion.wire.protocol import ChatMessage

MESSAGES = [
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content="Héllo"),
]


def test_renders_messages_tokens_and_generation_prompt() -> None:
    template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m.content }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
        bos_token="<s>",
        eos_token="</s>",
    )
    assert template.render(MESSAGES) == "<s>[system]Be brief.</s>[user]Héllo</s>[assistant]"


def test_tojson_keeps_non_ascii() -> None:
    template = ChatTemplate("{{ messages[1] | tojson }}", None, None)
    assert template.render(MESSAGES) == '{"role": "user", "content": "Héllo"}'


def test_raise_exception_does_not_leak_the_template_message() -> None:
    template = ChatTemplate("{{ raise_exception('bad: ' + messages[1].content) }}", None, None)
    with pytest.raises(RuntimeInputError) as caught:
        template.render(MESSAGES)
    assert "Héllo" not in caught.value.message
    assert caught.value.code == "invalid_messages"


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",  # mutation: immutable sandbox
        "{{ messages.__class__.__mro__[1].__subclasses__() }}",  # attribute escape
        "{{ ''.__class__.__base__ }}",
    ],
)
def test_sandbox_refuses_unsafe_templates(source: str) -> None:
    with pytest.raises(RuntimeInputError):
        ChatTemplate(source, None, None).render(MESSAGES)


def test_syntax_error_fails_at_load() -> None:
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", None, None)


def test_template_sources() -> None:
    assert find_template_source(None, {}) is None
    assert find_template_source(None, {"chat_template": "A"}) == "A"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert find_template_source(None, {"chat_template": named}) == "D"
    assert find_template_source(b"F", {"chat_template": "A"}) == "F"


def test_special_token_text() -> None:
    assert special_token_text("<s>") == "<s>"
    assert special_token_text({"content": "</s>", "lstrip": False}) == "</s>"
    assert special_token_text(None) is None
