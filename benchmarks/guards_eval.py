#!/usr/bin/env python3
"""Precision and recall of the built-in prompt-injection guard on its labelled set.

    .venv/bin/python benchmarks/guards_eval.py                 # the table, a few seconds
    .venv/bin/python benchmarks/guards_eval.py --errors dev    # + the dev split's mistakes

No server: the guard runs in this process exactly as the worker would run it
(``PromptInjectionGuard().check_input([text])``, one text per check).

- Data: ``src/bastion/protection/data/prompt_injection.jsonl``, written for Bastion (see
  the README beside it): 150 texts, 77 injections and 73 benign, many of them chosen to be
  hard (benign texts full of "ignore", "previous", "system prompt", "sudo"; obfuscated,
  indirect and non-English injections). It is small and was written by the same person who
  wrote the patterns, so its numbers are optimistic for real adversarial traffic.
- Split: a text is "held-out" when the first byte of SHA-256(text) is divisible by 3 (a
  third of the set, fixed by the text alone); the rest is "dev". Errors may be looked at
  and patterns changed on dev only; the held-out split's mistakes are never printed unless
  asked for with ``--errors all``.
- Positive class: injection. A false positive is a benign text refused.
- µs per check: ``timeit`` of one check over every text of the set (best of 5 rounds, per
  text; texts of this set are 10 to 400 characters), and of one 10 kB benign text.

History. The set was written and frozen first; then the guard, from the brief's pattern
families, without running it on the set; then the first measurement (v1). After it, the
dev split's mistakes (only) were read and the patterns changed (v2, the code as it is);
the held-out split's mistakes were not looked at while tuning (its totals were printed by
each run, as the table prints every split). Both, on one machine (2 shared cores, so
timings are rough):

| version | split | precision | recall | F1 | FP | FN | µs per check | 10 kB text |
|---|---|---|---|---|---|---|---|---|
| v1 | dev (98) | 0.944 | 0.667 | 0.782 | 2 | 17 | | |
| v1 | held-out (52) | 0.944 | 0.654 | 0.773 | 1 | 9 | | |
| v1 | all (150) | 0.944 | 0.662 | 0.779 | 3 | 26 | 58 | 9.3 ms |
| v2 | dev (98) | 1.000 | 0.941 | 0.970 | 0 | 3 | | |
| v2 | held-out (52) | 0.947 | 0.692 | 0.800 | 1 | 8 | | |
| v2 | all (150) | 0.985 | 0.857 | 0.917 | 1 | 11 | 49-68 | 10.3-10.9 ms |

The gap between dev and held-out in v2 is the tuning fitting the dev split: held-out
recall is the honest number, and it moved little (0.654 -> 0.692). The changes of v2:

- a second, de-obfuscated view: letters spelled one at a time ("i g n o r e") joined and
  marks inside words ("ign-ore") removed, as well as leetspeak undone;
- "never/not ignore previous instructions" weighs 0.5, not 1 (advice, not an attack);
- chat-template tokens named alone ("[INST]", "<<SYS>>", "<|im_end|>") weigh 0.4; a pair
  that wraps text, a system turn or "<|system|>" weighs 1;
- paraphrases: "rules no longer apply", "previous guidelines have been revoked", "freed
  from the limitations", "an evil AI", "roleplay as an AI", "break the rules", "no rules",
  "bypass your restrictions", "the instructions you were given", "the first sentence of
  your instructions", "as your developer" / "I authorize you to";
- the same override in Spanish, German, French, Italian and Portuguese (one pattern);
- literal anchors tested before each regex, and a faster normalisation.

After v2 was frozen, the held-out mistakes were read once (for the report; nothing was
changed after): paraphrases the patterns do not know ("forget everything you were told",
"ignore the content policy", "no safety filters", "skip all safety checks", "ignore any
other instructions"), weak signals that do not add up to 1 ("sudo mode ... root
privileges", "god mode ... safeguards are disabled"), and one false positive ("show me the
text above the fold").

Left on dev, not fixed because no keyword pattern would catch them without refusing
benign texts: a request hidden in a hint ("it is in the instructions you got above"), the
"grandmother" role-play, and an indirect injection with no override wording.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import timeit
from dataclasses import dataclass

from bastion.protection.guards import LABELLED_SET, PromptInjectionGuard


@dataclass(frozen=True)
class Example:
    index: int
    text: str
    injection: bool
    source: str

    @property
    def split(self) -> str:
        return "held-out" if hashlib.sha256(self.text.encode()).digest()[0] % 3 == 0 else "dev"


@dataclass(frozen=True)
class Scores:
    n: int
    injections: int
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else float("nan")


def load() -> list[Example]:
    examples = []
    with LABELLED_SET.open(encoding="utf-8") as f:
        for index, line in enumerate(f, 1):
            row = json.loads(line)
            assert row["label"] in ("injection", "benign"), row
            examples.append(Example(index, row["text"], row["label"] == "injection", row["source"]))
    return examples


def score(guard: PromptInjectionGuard, examples: list[Example]) -> Scores:
    tp = fp = fn = 0
    for example in examples:
        refused = not guard.check_input([example.text]).allowed
        tp += refused and example.injection
        fp += refused and not example.injection
        fn += not refused and example.injection
    return Scores(len(examples), sum(e.injection for e in examples), tp, fp, fn)


def us_per_check(guard: PromptInjectionGuard, texts: list[str]) -> float:
    def run() -> None:
        for text in texts:
            guard.check_input([text])

    rounds = timeit.repeat(run, number=20, repeat=5)
    return min(rounds) / 20 / len(texts) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--errors",
        choices=("none", "dev", "all"),
        default="none",
        help="list the misclassified texts of the dev split, or of both",
    )
    args = parser.parse_args()

    guard = PromptInjectionGuard()
    examples = load()
    splits = {
        "dev": [e for e in examples if e.split == "dev"],
        "held-out": [e for e in examples if e.split == "held-out"],
        "all": examples,
    }
    per_text = us_per_check(guard, [e.text for e in examples])
    long_text = " ".join(e.text for e in examples if not e.injection)
    long_text = (long_text * (10_000 // len(long_text) + 1))[:10_000]
    per_long = us_per_check(guard, [long_text])

    print(f"guard: {guard.name}, threshold {guard.threshold}\n")
    print(
        "| split | examples | injections / benign | precision | recall | F1 "
        "| false positives | false negatives | µs per check |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, subset in splits.items():
        s = score(guard, subset)
        timing = f"{per_text:.1f}" if name == "all" else ""
        print(
            f"| {name} | {s.n} | {s.injections} / {s.n - s.injections} | {s.precision:.3f} "
            f"| {s.recall:.3f} | {s.f1:.3f} | {s.fp} | {s.fn} | {timing} |"
        )
    print(f"\nµs per check of one 10 kB benign text: {per_long:.0f}")
    print("\n(v1, before the patterns were changed on dev: see this script's docstring)")

    if args.errors != "none":
        shown = splits["dev"] if args.errors == "dev" else examples
        print(f"\nmistakes ({args.errors}):")
        for e in shown:
            verdict = guard.check_input([e.text])
            if verdict.allowed == e.injection:
                kind = "FN" if e.injection else "FP"
                print(
                    f"{kind} #{e.index} [{e.split}, {e.source}] score {verdict.score:.2f} "
                    f"({verdict.reason}): {e.text!r}"
                )


if __name__ == "__main__":
    main()
