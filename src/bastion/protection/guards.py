"""Guards for language models: checks run in the model worker on a prompt and on an answer.

A guard (:class:`Guard`) looks at the texts of a request before the model runs
(:meth:`Guard.check_input`) and at the text the model wrote (:meth:`Guard.check_output`),
and answers a :class:`GuardVerdict`: allowed or not, the guard's name, a short category
(never a quotation of the text) and a score. :class:`GuardChain` runs a model's guards in
order and stops at the first refusal. Guards run in the worker, next to the model, so they
hold for plaintext and end-to-end encrypted requests alike.

Which guards a model runs is its option ``protect.guards`` (:data:`GUARDS_OPTION`), a
comma-separated list of names; none by default. ``prompt-injection`` is the built-in
:class:`PromptInjectionGuard`; any other name is looked up in the ``bastion.guards``
entry-point group (:data:`ENTRY_POINT_GROUP`), whose object is a callable taking no
arguments that returns a guard (:func:`load_guards`).

The built-in guard is a heuristic: it normalises the text (NFKC, which folds fullwidth
letters; zero-width characters and soft hyphens removed; casefolded; whitespace collapsed)
and makes a second, de-obfuscated copy when that differs: simple leetspeak undone
(``0->o 1->i 3->e 4->a 5->s 7->t @->a $->s``), letters spelled one at a time joined
("i g n o r e"), marks inside words removed ("ign-ore"). Weighted regular expressions in
six families then score both copies: instruction override, role-play jailbreak,
system-prompt extraction, delimiter/role injection, encoded payloads and privilege
escalation. Within a family the weights of the matching patterns add up to at most 1; the
score of a text is the sum over families, and a text at or above the threshold (1.0 by
default) is refused. One strong pattern ("ignore all previous instructions") suffices;
weak ones ("developer mode", "no restrictions", "act as an admin", a chat-template token
named alone) refuse only together. Each text of a request is scored on its own and the
worst counts. The patterns are English, plus the override request in five other languages.

On its small labelled set (``data/prompt_injection.jsonl``, written for Bastion; measured
by ``benchmarks/guards_eval.py``) it refuses most injections written in English and lets
most tricky benign texts pass: precision 0.985 and recall 0.857 on all 150 texts, but
recall 0.69 on the third held out while its patterns were tuned. It is easy to evade: a
paraphrase without its keywords, another language, homoglyphs from other scripts (NFKC
does not fold Cyrillic U+043E into Latin "o"), a keyword cut by a space ("ign ore"), an
instruction hidden in an encoding it does not name or spread over several messages, all
pass. It costs about 1 µs per character (50-70 µs for a typical prompt). It is one layer,
never the only control on what a model may do.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

GUARDS_OPTION = "protect.guards"
ENTRY_POINT_GROUP = "bastion.guards"
BUILTIN_NAME = "prompt-injection"
DEFAULT_THRESHOLD = 1.0
# The labelled set the built-in guard is measured on (see data/README.md).
LABELLED_SET = Path(__file__).resolve().parent / "data" / "prompt_injection.jsonl"


@dataclass(frozen=True, slots=True)
class GuardVerdict:
    """One guard's answer on one check.

    ``reason`` is a short category ("instruction_override", "canary_leak", "none"), never
    a quotation of the text it judged, so it may be logged and shown to a client.
    """

    allowed: bool
    guard: str
    reason: str
    score: float


@runtime_checkable
class Guard(Protocol):
    """What a guard provides; a plug-in's factory returns one."""

    name: str

    def check_input(self, texts: Sequence[str]) -> GuardVerdict:
        """Judge the texts of a request (its prompt, or each message of a chat)."""
        ...

    def check_output(self, text: str) -> GuardVerdict:
        """Judge the text the model wrote."""
        ...


# --- normalisation ---------------------------------------------------------------------

# Zero-width space/non-joiner/joiner, word joiner, BOM, soft hyphen, Mongolian vowel
# separator: invisible characters that split a keyword without changing how it looks.
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e]")
_LEET = (
    ("0", "o"),
    ("1", "i"),
    ("3", "e"),
    ("4", "a"),
    ("5", "s"),
    ("7", "t"),
    ("@", "a"),
    ("$", "s"),
)
_HAS_LEET = re.compile(r"[013457@$]")
# Letters spelled out one at a time ("i g n o r e"), and words cut by marks ("ign-ore").
_SPACED_LETTERS = re.compile(r"\b(?:\w ){3,}\w\b")
_INNER_MARK = re.compile(r"(?<=\w)[-.*_](?=\w)")


def normalise(text: str) -> str:
    """NFKC, invisible characters removed, casefolded, runs of whitespace as one space."""
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    # Typographic apostrophes (U+2019, U+2018) become "'" (NFKC keeps them): "don't" matches.
    text = _INVISIBLE.sub("", text).replace("\u2019", "'").replace("\u2018", "'")
    return " ".join(text.casefold().split())


def _deobfuscate(view: str) -> str:
    if _HAS_LEET.search(view):
        for leet, letter in _LEET:
            view = view.replace(leet, letter)
    view = _INNER_MARK.sub("", view)
    return _SPACED_LETTERS.sub(lambda m: m.group().replace(" ", ""), view)


def _views(text: str) -> tuple[str, ...]:
    """The normalised text, and a copy with leetspeak, spaced letters and split words undone
    when that changes it (patterns run on both: undoing leetspeak spoils "base64")."""
    plain = normalise(text)
    other = _deobfuscate(plain)
    return (plain,) if other == plain else (plain, other)


# --- the families ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pattern:
    regex: re.Pattern[str]
    weight: float
    # Literal strings of which the text must hold one for the regex to match: a cheap
    # test first, since most texts hold none (empty: always run the regex).
    anchors: tuple[str, ...]

    def matches(self, view: str) -> bool:
        if self.anchors and not any(anchor in view for anchor in self.anchors):
            return False
        return self.regex.search(view) is not None


def _p(regex: str, weight: float, *anchors: str) -> _Pattern:
    return _Pattern(re.compile(regex), weight, anchors)


_OVERRIDE_VERBS = (
    "ignor",
    "disregard",
    "forget",
    "overrid",
    "bypass",
    "discard",
    "set aside",
    "stop following",
)
_OVERRIDE_VERB = r"(?:ignore|disregard|forget|override|bypass|discard|set aside|stop following)"
# "never ignore previous instructions" is advice, not an attack: it weighs half.
_NOT_NEGATED = r"(?<!never )(?<!not )(?<!n't )"
_FILLER = r"(?:(?:all|any|each|every|of|the|your|my|these|those|whatever)\s+){0,3}"
_QUALIFIER = (
    r"(?:(?:previous|prior|above|earlier|preceding|foregoing|original|initial|former|system)\s+)?"
)
_RULES = (
    r"(?:instructions?|rules|directions|directives|guidelines|guidance|prompts?|commands"
    r"|constraints|restrictions|programming|polic(?:y|ies))"
)
_OVERRIDE = rf"\b{_OVERRIDE_VERB}\s+{_FILLER}{_QUALIFIER}{_RULES}\b"
_REVEAL_VERBS = (
    "reveal",
    "print",
    "show",
    "display",
    "repeat",
    "output",
    "tell",
    "give",
    "share",
    "leak",
    "dump",
    "recite",
    "list",
    "translate",
    "summar",
    "write out",
)
_REVEAL_VERB = (
    r"(?:reveal|print|show|display|repeat|output|tell|give|share|leak|dump|recite|list"
    r"|translate|summari[sz]e|write out)"
)
_LOOSE_RULES = ("restriction", "filter", "limit", "censor", "polic", "guideline", "rules")

FAMILIES: dict[str, tuple[_Pattern, ...]] = {
    "instruction_override": (
        _p(_NOT_NEGATED + _OVERRIDE, 1.0, *_OVERRIDE_VERBS),
        _p(r"\b(?:never|not|n't) " + _OVERRIDE, 0.5, *_OVERRIDE_VERBS),
        _p(
            r"\b(?:previous|prior|above|earlier|old|original|your) (?:instructions|rules|guidelines"
            r"|restrictions) (?:are|is|have been|has been|were) (?:now )?(?:void|cancell?ed"
            r"|revoked|lifted|removed|disabled|obsolete|no longer valid)",
            1.0,
            "void",
            "cancel",
            "revoked",
            "lifted",
            "removed",
            "disabled",
            "obsolete",
            "no longer",
        ),
        _p(
            r"\b(?:instructions|rules|guidelines|restrictions)\b[^.]{0,30}\bno longer apply\b",
            1.0,
            "no longer apply",
        ),
        _p(r"\bno longer apply\b", 0.5, "no longer apply"),
        _p(r"\bnew (?:instructions|rules) for the (?:assistant|ai|model)\b", 0.8, "new "),
        _p(r"\bnew (?:instructions|rules)\s*:", 0.6, "new "),
        # The same request in Spanish, German, French, Italian and Portuguese (French
        # "ignore ... instructions" is also English: it needs a French article).
        _p(
            r"\b(?:ignora|ignoriere|vergiss|oublie|olvida|dimentica|esquece|desconsidera"
            r"|ignorez?\s+(?:toutes\s+)?(?:les|tes|vos))\b\s+(?:\S+\s+){0,3}?(?:instrucciones"
            r"|instruções|instrucoes|anweisungen|instructions|istruzioni|regeln|reglas|règles"
            r"|regole|regras|consignes)\b",
            1.0,
            "ignor",
            "vergiss",
            "oublie",
            "olvida",
            "dimentica",
            "esquece",
            "desconsidera",
        ),
    ),
    "roleplay_jailbreak": (
        _p(
            r"\b(?:you are (?:now )?|pretend to be |called )(?:dan|stan|aim|dude)\b",
            1.0,
            "dan",
            "stan",
            "aim",
            "dude",
        ),
        _p(r"\bdo anything now\b", 0.6, "anything now"),
        _p(r"\bdeveloper mode\b", 0.5, "developer mode"),
        _p(r"\bjailbre?a?k(?:ed|ing)?\b", 0.5, "jailb"),
        _p(
            r"\b(?:no|without(?: any)?) (?:restrictions|filters|limitations|limits|censorship|rules"
            r"|content polic(?:y|ies)|ethical guidelines|moral guidelines|safety guidelines)\b",
            0.5,
            *_LOOSE_RULES,
        ),
        _p(
            r"\b(?:freed|free|liberated|released|broken free) (?:from|of) (?:the |your |its |all )?"
            r"(?:\w+ )?(?:limitations|restrictions|rules|constraints|confines)\b",
            0.8,
            "free",
            "liberated",
            "released",
        ),
        _p(
            r"\b(?:unfiltered|uncensored|unrestricted)\b",
            0.5,
            "unfiltered",
            "uncensored",
            "unrestricted",
        ),
        _p(
            r"\ban? (?:evil|rogue|amoral|unethical|unaligned) (?:ai|assistant|chatbot|model|bot)\b",
            0.6,
            "evil",
            "rogue",
            "amoral",
            "unethical",
            "unaligned",
        ),
        _p(
            r"\b(?:roleplay|role-play|role play|pretend|act)(?:ing)? (?:as|to be|you are) an? "
            r"(?:\w+ ){0,2}(?:ai|assistant|chatbot|model|bot)\b",
            0.5,
            "role",
            "pretend",
            "act",
        ),
        _p(r"\bnever refuses?\b", 0.4, "never refuse"),
        _p(r"\bbreak (?:the|all|your|its) rules\b", 0.5, "break"),
        _p(r"\b(?:stay|remain) in character\b", 0.3, "in character"),
        _p(
            r"\b(?:disable|turn off|remove|drop|bypass)\s+(?:\w+\s+){0,3}"
            r"(?:content filters?|safety (?:rules|filters|checks)|safeguards|guardrails)\b",
            0.8,
            "filter",
            "safety",
            "safeguard",
            "guardrail",
        ),
    ),
    "system_prompt_extraction": (
        _p(
            rf"\b{_REVEAL_VERB}\s+(?:me\s+)?(?:\w+\s+){{0,2}}your\s+(?:\w+\s+)?"
            r"(?:system prompt|system message|prompt|instructions|rules)\b",
            1.0,
            *_REVEAL_VERBS,
        ),
        _p(
            rf"\b{_REVEAL_VERB}\s+(?:me\s+)?(?:everything|all|the text|the words|the content"
            r"|what is written|what was written)\s+(?:\w+\s+)?(?:above|before)\b",
            1.0,
            *_REVEAL_VERBS,
        ),
        _p(
            r"\b(?:instructions|rules|prompt)\s+(?:that\s+)?(?:you were given|you were told"
            r"|you got|you received|given to you|your (?:developers?|creators?) gave you)\b",
            0.6,
            "you were",
            "you got",
            "you received",
            "given to you",
            "gave you",
        ),
        _p(
            r"\b(?:first|last|next) (?:sentence|line|word|paragraph) of (?:your|the) "
            r"(?:instructions|prompt|system prompt)\b",
            0.5,
            "sentence",
            "line",
            "word",
            "paragraph",
        ),
        _p(
            r"\b(?:your|the) (?:system prompt|system message|hidden prompt|initial prompt"
            r"|initial instructions)\b",
            0.5,
            "prompt",
            "system message",
            "instructions",
        ),
        _p(
            r"\b(?:verbatim|word for word|exactly as written)\b",
            0.5,
            "verbatim",
            "word for word",
            "exactly as written",
        ),
    ),
    "delimiter_injection": (
        # A chat template's role markers. Naming one is weak (people ask about templates);
        # a system turn, or a pair that wraps text, is strong.
        _p(r"</?system>", 1.0, "system>"),
        _p(r"<\|im_start\|>\s*system|<\|system\|>", 1.0, "system|>", "im_start"),
        _p(r"<\|(?:assistant|user|end|im_start|im_end)\|>", 0.4, "|>"),
        _p(r"(?:^|\s)#{2,}\s*(?:system|assistant|instructions?)\s*:", 1.0, "##"),
        _p(r"\[inst\].{1,500}?\[/inst\]|<<sys>>.{1,500}?<</sys>>", 1.0, "[inst]", "<<sys>>"),
        _p(r"\[/?inst\]", 0.4, "inst]"),
        _p(r"<</?sys>>", 0.4, "sys>>"),
        _p(r"\bsystem\s*:", 0.5, "system"),
        _p(r"\[system\]", 0.5, "[system]"),
        _p(r"\bend of (?:user )?input\b", 0.5, "end of"),
    ),
    "encoded_payload": (
        _p(
            r"\b(?:base ?-?64|b64|rot ?-?13|hex(?:-encoded)?|encoded)\b[^.]{0,60}?"
            r"\b(?:follow|execute|obey|do what it says|carry out|act on)\b",
            1.0,
            "64",
            "rot",
            "hex",
            "encoded",
        ),
        _p(
            r"\bdecode\b[^.]{0,60}?\b(?:follow|execute|obey|do what it says|carry out|act on)\b",
            1.0,
            "decode",
        ),
    ),
    "privilege_escalation": (
        _p(
            r"\bact as (?:an? |the )?(?:admin|administrator|root|superuser|sysadmin)\b",
            0.6,
            "act as",
        ),
        _p(r"\bsudo mode\b", 0.8, "sudo mode"),
        _p(r"\b(?:god|admin|root|debug|maintenance) mode\b", 0.6, " mode"),
        _p(
            r"\b(?:elevated|admin|root|administrator) (?:access|privileges?) "
            r"(?:granted|enabled)\b",
            0.8,
            "granted",
            "enabled",
        ),
        _p(
            r"\b(?:(?:i am|i'm|as) (?:your|the) (?:developer|creator|admin|administrator|owner)"
            r"|i (?:authori[sz]e|permit|allow) you to)\b",
            0.5,
            "i am",
            "i'm",
            "as ",
            " you to",
        ),
    ),
}

# What in a model's answer shows that its instructions leaked (check_output).
_OUTPUT_LEAK: tuple[_Pattern, ...] = (
    _p(r"<\|im_start\|>\s*system|<\|system\|>|<</?sys>>|</?system>", 1.0, "system", "sys>>"),
    _p(r"(?:^|\s)#{2,}\s*system\s*:", 1.0, "##"),
    _p(
        r"\b(?:my|the) (?:system prompt|initial instructions|hidden instructions)"
        r" (?:is|are|says?|reads?)\s*:",
        1.0,
        "prompt",
        "instructions",
    ),
    _p(r"\bhere (?:is|are) my (?:system prompt|initial instructions|instructions)\b", 1.0, "here "),
)


def _score_view(view: str) -> dict[str, float]:
    scores: dict[str, float] = {}
    for family, patterns in FAMILIES.items():
        total = sum(pattern.weight for pattern in patterns if pattern.matches(view))
        if total:
            scores[family] = min(1.0, total)
    return scores


def score_text(text: str) -> tuple[float, str]:
    """The heuristic's score of one text and the family that weighs most ("none" if none)."""
    best: dict[str, float] = {}
    for view in _views(text):
        for family, score in _score_view(view).items():
            best[family] = max(score, best.get(family, 0.0))
    if not best:
        return 0.0, "none"
    return sum(best.values()), max(best, key=lambda family: best[family])


class PromptInjectionGuard:
    """The built-in heuristic against prompt injection and jailbreaks (see the module).

    ``canary``: a random string the integrator places in the model's system prompt; an
    answer that contains it (after the same normalisation) leaked the prompt.
    ``check_output`` also refuses answers that quote chat-template role markers of a
    system prompt or announce one ("here is my system prompt", "my instructions are:"). It
    does not look for the prompt's wording itself, which it does not know.
    """

    name = BUILTIN_NAME

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, canary: str | None = None) -> None:
        if not threshold > 0:
            raise ValueError("the threshold of the prompt-injection guard must be positive")
        if canary is not None and not canary.strip():
            raise ValueError("the canary of the prompt-injection guard must not be blank")
        self.threshold = threshold
        self._canary = normalise(canary) if canary is not None else None

    def check_input(self, texts: Sequence[str]) -> GuardVerdict:
        if isinstance(texts, str):  # one text, not a sequence of characters
            texts = (texts,)
        worst, reason = 0.0, "none"
        for text in texts:
            score, family = score_text(text)
            if score > worst:
                worst, reason = score, family
        return GuardVerdict(worst < self.threshold, self.name, reason, worst)

    def check_output(self, text: str) -> GuardVerdict:
        view = normalise(text)
        if self._canary is not None and self._canary in view:
            return GuardVerdict(False, self.name, "canary_leak", 1.0)
        if any(pattern.matches(view) for pattern in _OUTPUT_LEAK):
            return GuardVerdict(False, self.name, "system_prompt_leak", 1.0)
        return GuardVerdict(True, self.name, "none", 0.0)


# --- plug-ins and options -----------------------------------------------------------------


def entry_points(*, group: str) -> Any:
    """The installed entry points of `group`. importlib.metadata is imported here, when a
    model names a plug-in, not when every worker starts (it costs about 30 ms)."""
    from importlib.metadata import entry_points as installed

    return installed(group=group)


def load_guards(names: Sequence[str]) -> list[Guard]:
    """The guards of these names, in order; ValueError for an unknown or broken name.

    ``prompt-injection`` is the built-in guard; any other name is an entry point of the
    ``bastion.guards`` group whose object, called with no arguments, returns a guard.
    """
    guards: list[Guard] = []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"guard {name!r} is named twice")
        seen.add(name)
        guards.append(PromptInjectionGuard() if name == BUILTIN_NAME else _plugin(name))
    return guards


def _plugin(name: str) -> Guard:
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        available = sorted(
            {BUILTIN_NAME, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))}
        )
        raise ValueError(
            f"unknown guard {name!r}: not built in and no {ENTRY_POINT_GROUP!r} entry point of "
            f"that name is installed (available: {', '.join(available)})"
        )
    try:
        factory: Callable[[], object] = found[0].load()
    except Exception as exc:  # a plug-in that fails to import: say which, and why
        raise ValueError(f"guard {name!r} could not be loaded ({type(exc).__name__})") from exc
    if not callable(factory):
        raise ValueError(f"the entry point of guard {name!r} is not callable")
    try:
        guard = factory()
    except Exception as exc:
        raise ValueError(f"guard {name!r} could not be created ({type(exc).__name__})") from exc
    if not isinstance(guard, Guard):
        raise ValueError(f"guard {name!r} does not provide name, check_input and check_output")
    return guard


def guard_names(options: Mapping[str, Any]) -> list[str]:
    """The guard names in a model's ``protect.guards`` option; [] when it is not set."""
    raw = options.get(GUARDS_OPTION)
    if raw is None:
        return []
    if isinstance(raw, str):
        items: Iterable[object] = raw.split(",")
    elif isinstance(raw, list | tuple):
        items = raw
    else:
        raise ValueError(f"{GUARDS_OPTION} must be a comma-separated list of guard names")
    names = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{GUARDS_OPTION} must be a comma-separated list of guard names")
        if item.strip():
            names.append(item.strip())
    return names


def guards_of(options: Mapping[str, Any]) -> list[Guard]:
    """The guards a model's options name, loaded; ValueError if one is not valid."""
    return load_guards(guard_names(options))


class GuardChain:
    """A model's guards, run in order; the first refusal stops the chain.

    An exception in a guard propagates: whether that refuses the request is the caller's
    choice (it should).
    """

    def __init__(self, guards: Iterable[Guard]) -> None:
        self.guards: tuple[Guard, ...] = tuple(guards)

    def __len__(self) -> int:
        return len(self.guards)

    def check_input(self, texts: Sequence[str]) -> GuardVerdict | None:
        """The first refusal of the request's texts, or None when every guard allows them."""
        for guard in self.guards:
            verdict = guard.check_input(texts)
            if not verdict.allowed:
                return verdict
        return None

    def check_output(self, text: str) -> GuardVerdict | None:
        """The first refusal of the model's answer, or None when every guard allows it."""
        for guard in self.guards:
            verdict = guard.check_output(text)
            if not verdict.allowed:
                return verdict
        return None
