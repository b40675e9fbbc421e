"""Choice scoring (batchgen.engine.scoring) against transformers computing the definition directly.

A tiny random ``LlamaForCausalLM`` with LLaMA's 32,000-piece vocabulary is saved with
``save_pretrained`` and loaded by batchgen; the real LLaMA tokenizer encodes prompts and choices.
transformers scores each choice by one full forward over prompt + choice; batchgen scores from the
prompt's last logits plus a continuation forward of each multi-token choice's earlier tokens.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

from batchgen.checkpoint import load_model
from batchgen.demo import task
from batchgen.engine.scoring import (
    ChoiceScores,
    encode_choices,
    finish_scores,
    full_forward,
    score_choices,
)
from batchgen.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the reference")

PROMPTS = [
    "Comment: you are a wonderful person, thank you!\nLabel:",
    "Comment: BUY CHEAP WATCHES at www.example.com\nLabel:",
    "Is the sky green? Answer:",
]
ROW_CHOICES = [  # per-row choices, of one and several tokens
    ["toxic", "non-toxic", "spam"],
    ["spam", "ham", "not spam at all"],
    ["yes", "no"],
]


@pytest.fixture(scope="module")
def tok(shared_dir: Path) -> Tokenizer:
    path = shared_dir / "tokenizers" / "llama" / "tokenizer.model"
    if not path.exists():
        pytest.skip(f"real LLaMA tokenizer not found at {path}")
    return Tokenizer(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_hf_config: Any) -> tuple[Any, Any]:
    """(transformers model, batchgen model) with the same random weights, LLaMA's vocabulary size."""
    torch.manual_seed(0)
    # initializer_range 0.1: peaked enough that the choices' scores differ clearly.
    hf = transformers.LlamaForCausalLM(tiny_hf_config(vocab_size=32000, initializer_range=0.1)).eval()
    out = tmp_path_factory.mktemp("scoring") / "hf"
    hf.save_pretrained(out, safe_serialization=True)
    return hf, load_model(out, dtype="float32", device="cpu")


def hf_definition(hf: Any, prompt: Sequence[int], choices: Sequence[Sequence[int]]) -> list[float]:
    """Each choice's summed log-prob, by one full forward over prompt + choice (the definition)."""
    out = []
    with torch.no_grad():
        for c in choices:
            seq = torch.tensor([list(prompt) + list(c)])
            lp = torch.log_softmax(hf(seq).logits[0].float(), dim=-1)
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c))
            out.append(float(lp[positions, torch.tensor(c)].double().sum()))
    return out


def batchgen_scores(model: Any, prompts: list[list[int]], choice_ids: list[list[list[int]]],
                    normalize: str) -> tuple[list[ChoiceScores], list[tuple[int, Sequence[int]]]]:
    """Scores from batchgen's model: one forward per prompt, then the continuations as one batch."""
    calls: list[tuple[int, Sequence[int]]] = []

    def logits_fn(ids: list[int]) -> torch.Tensor:
        return model.logits_full(torch.tensor([ids]))[0]

    ref = full_forward(logits_fn, prompts)

    def forward(requests: Sequence[tuple[int, Sequence[int]]]) -> Sequence[torch.Tensor]:
        calls.extend(requests)
        return ref(requests)

    with torch.no_grad():
        last = torch.stack([logits_fn(p)[-1] for p in prompts])
        return score_choices(last, choice_ids, forward, normalize=normalize), calls  # type: ignore[arg-type]


@pytest.mark.parametrize("normalize", ["none", "tokens"])
def test_logprobs_match_transformers_by_definition(tok: Tokenizer, models: tuple[Any, Any], normalize: str) -> None:
    hf, model = models
    prompts = [tok.encode(p) for p in PROMPTS]
    choice_ids = [encode_choices(tok, c) for c in ROW_CHOICES]
    assert any(len(c) == 1 for row in choice_ids for c in row) and any(len(c) > 2 for row in choice_ids for c in row)
    scores, calls = batchgen_scores(model, prompts, choice_ids, normalize)
    # Only multi-token choices need a continuation, and it is the choice's tokens but the last.
    assert calls == [(r, c[:-1]) for r, row in enumerate(choice_ids) for c in row if len(c) > 1]
    for r, (s, row) in enumerate(zip(scores, choice_ids)):
        want = torch.tensor(hf_definition(hf, prompts[r], row), dtype=torch.float64)
        if normalize == "tokens":
            want = want / torch.tensor([len(c) for c in row], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64), want, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(s.probs, dtype=torch.float64), torch.softmax(want, 0),
                                   rtol=0, atol=1e-4)
        assert s.index == int(torch.argmax(want)) and s.label(ROW_CHOICES[r]) == ROW_CHOICES[r][s.index]
        assert s.num_tokens == [len(c) for c in row]


def test_single_token_choices_need_no_forward(tok: Tokenizer, models: tuple[Any, Any]) -> None:
    hf, model = models
    prompt = tok.encode(PROMPTS[2])
    choice_ids = encode_choices(tok, ["yes", "no", "maybe"])
    assert all(len(c) == 1 for c in choice_ids), choice_ids
    with torch.no_grad():
        last = model.logits_full(torch.tensor([prompt]))[0, -1:]
    (s,) = score_choices(last, [choice_ids], forward=None)
    torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64),
                               torch.tensor(hf_definition(hf, prompt, choice_ids), dtype=torch.float64),
                               rtol=0, atol=1e-4)


def test_choice_encoding_has_the_word_start_marker_and_no_bos(tok: Tokenizer) -> None:
    (ids,) = encode_choices(tok, ["toxic"])
    assert ids == tok.encode("toxic", bos=False) and tok.bos_id not in ids
    assert tok.id_to_piece(ids[0]).startswith("\u2581")


def test_bad_input_is_refused(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"choices\[1\] must be a non-empty string"):
        encode_choices(tok, ["a", ""])
    with pytest.raises(ValueError, match="non-empty list"):
        encode_choices(tok, "abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalize must be one of none, tokens"):
        finish_scores([-1.0], [1], normalize="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="need a forward callable"):
        score_choices(torch.zeros(1, 10), [[[1, 2]]], forward=None)
    with pytest.raises(ValueError, match=r"prompt_logits must be \[R, V\] with R = 2 rows"):
        score_choices(torch.zeros(1, 10), [[[1]], [[2]]])


def test_finish_scores_normalizes_and_breaks_ties_first() -> None:
    s = finish_scores([-2.0, -3.0, -2.0], [1, 3, 1], normalize="tokens")
    assert s.logprobs == [-2.0, -1.0, -2.0] and s.index == 1
    assert abs(sum(s.probs) - 1) < 1e-12
    assert finish_scores([-2.0, -3.0, -2.0], [1, 3, 1]).index == 0


def test_demo_model_labels_its_task(model_dir: Path) -> None:
    """The bundled trained model picks the right sum among near misses."""
    tok = Tokenizer(model_dir / "tokenizer.model")
    model = load_model(model_dir, dtype="float32", device="cpu")
    rng = random.Random(0)
    prompts, choices = [], []
    while len(prompts) < 6:
        p = task.random_prompt(rng, {"add": 1.0})
        if task.split_of(p) != "heldout":
            continue
        a = int(task.answer(p))
        prompts.append(p)
        choices.append([str(x) for x in rng.sample([a, a + 1, a + 10, max(a - 1, 0) if a else a + 2], 4)])
    ids = [tok.encode(p) for p in prompts]
    cids = [encode_choices(tok, c) for c in choices]
    scores, _ = batchgen_scores(model, ids, cids, "none")
    right = sum(s.label(c) == task.answer(p) for s, c, p in zip(scores, choices, prompts))
    assert right >= 5, [(p, c, s.logprobs) for p, c, s in zip(prompts, choices, scores)]
