"""The demo's synthetic task: problems whose answers a program can check exactly.

Three kinds of problem, mixed evenly, each a plain-text prompt whose answer follows it:

* addition      ``"12+45="``                   -> ``"57"``         (operands of 1-2 digits)
* word reversal ``"reverse: cat dog sun ="``   -> ``"sun dog cat"`` (2-5 words from :data:`WORDS`)
* digit sorting ``"sort: 5 1 3 ="``            -> ``"1 3 5"``       (3-7 digits, repeats allowed)

A problem belongs to the training or the held-out split by a hash of its prompt, so the split
is fixed for every seed and every run: no held-out prompt can ever appear in a training corpus.
This module imports nothing heavy; the CLI's ``demo`` command uses it without torch.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Mapping, Optional

# Short words, each of which the demo tokenizer learns as a single piece.
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "red", "box", "cup", "hat", "map", "pen", "sky",
    "tree", "fish", "bird", "milk", "rain", "star", "moon", "frog", "lamp", "door",
)
SPLITS: tuple[str, ...] = ("train", "heldout")
KINDS: tuple[str, ...] = ("add", "reverse", "sort")
# One problem in HELDOUT_MOD is held out: 1/8 leaves ~8,900 of the 10,000 addition problems
# (the smallest sub-task) to learn from, enough to learn the rule rather than a table.
HELDOUT_MOD = 8
# Two-digit operands: a ~1M-parameter model learns carries into a most-significant-first answer
# within a few CPU minutes; three digits takes it several times longer.
MAX_DIGITS = 2

_ADD = re.compile(rf"(\d{{1,{MAX_DIGITS}}})\+(\d{{1,{MAX_DIGITS}}})=")
_REVERSE = re.compile(r"reverse:((?: [a-z]+){2,5}) =")
_SORT = re.compile(r"sort:((?: \d){3,7}) =")


def split_of(prompt: str) -> str:
    """The split (``"train"`` or ``"heldout"``) that a problem's prompt belongs to.

    A cryptographic hash, not Python's ``hash()``: the latter is salted per process.
    """
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % HELDOUT_MOD == 0 else "train"


def _number(rng: random.Random) -> int:
    # Pick the digit count first, so short operands are as common as long ones.
    digits = rng.randint(1, MAX_DIGITS)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def random_prompt(rng: random.Random, mix: Optional[Mapping[str, float]] = None) -> str:
    """One random problem's prompt, of a kind drawn from :data:`KINDS` by the weights ``mix``
    (default: evenly)."""
    weights = [1.0] * len(KINDS) if mix is None else [float(mix.get(k, 0.0)) for k in KINDS]
    kind = rng.choices(KINDS, weights=weights)[0]
    if kind == "add":
        return f"{_number(rng)}+{_number(rng)}="
    if kind == "reverse":
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        return "reverse: " + " ".join(words) + " ="
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 7))]
    return "sort: " + " ".join(digits) + " ="


def kind_of(prompt: str) -> str:
    """The kind of a demo prompt (one of :data:`KINDS`); ``ValueError`` if it is not one."""
    answer(prompt)  # validates the whole prompt
    return "add" if _ADD.fullmatch(prompt) else "reverse" if prompt.startswith("reverse:") else "sort"


def answer(prompt: str) -> str:
    """The one correct answer to a demo prompt; ``ValueError`` if the prompt is not one."""
    if m := _ADD.fullmatch(prompt):
        return str(int(m[1]) + int(m[2]))
    if m := _REVERSE.fullmatch(prompt):
        words = m[1].split()
        unknown = [w for w in words if w not in WORDS]
        if unknown:
            raise ValueError(f"demo prompt {prompt!r} uses words outside the task's list: {unknown}")
        return " ".join(reversed(words))
    if m := _SORT.fullmatch(prompt):
        return " ".join(sorted(m[1].split()))
    raise ValueError(
        f"not a demo prompt: {prompt!r}; expected 'A+B=' (1-2 digit numbers), "
        "'reverse: w1 w2 ... =' (2-5 words) or 'sort: d1 d2 ... =' (3-7 digits)"
    )


def score(prompt: str, completion: str) -> bool:
    """True when ``completion``, stripped of surrounding whitespace, is exactly the answer."""
    return completion.strip() == answer(prompt)


def make_examples(n: int, seed: int, split: str, mix: Optional[Mapping[str, float]] = None) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of ``split``, reproducible from ``seed``.

    ``mix`` weights the kinds of problem (e.g. ``{"add": 2, "reverse": 1, "sort": 1}``); by
    default they are equally likely. Held-out examples are distinct from each other (each counts
    once in an accuracy); training examples may repeat, as problems do in any sampled corpus.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if mix is not None:
        unknown = sorted(set(mix) - set(KINDS))
        if unknown or any(w < 0 for w in mix.values()) or not any(w > 0 for w in mix.values()):
            raise ValueError(f"mix must give non-negative weights to kinds among {KINDS}, "
                             f"at least one positive; got {dict(mix)!r}")
    # The split name is part of the seed so that the two splits draw independent streams.
    rng = random.Random(f"batchgen-demo:{seed}:{split}")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        prompt = random_prompt(rng, mix)
        if split_of(prompt) != split:
            continue
        if split == "heldout":
            if prompt in seen:
                continue
            seen.add(prompt)
        out.append((prompt, answer(prompt)))
    return out
