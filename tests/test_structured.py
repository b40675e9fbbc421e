"""Constrained decoding through the engine (``SamplingParams.constraint``).

A random-weight model with the real LLaMA tokenizer's 32,000-piece vocabulary samples freely
under the masks: whatever it prefers, every row that finishes with ``stop`` must conform.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from batchgen.engine import LLM, SamplingParams
from batchgen.engine.constraints import incomplete_message
from batchgen.tokenizer import Tokenizer
from reference import sharp_model

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test dependency")

from schemas import CHOICES, REGEX, SCHEMA
PROMPTS = ["Classify this:", "Tell me about the weather", "Q: what is it?\nA:", "{"]


@pytest.fixture(scope="module")
def llm(shared_dir: Path) -> LLM:
    path = shared_dir / "tokenizers" / "llama" / "tokenizer.model"
    if not path.exists():
        pytest.skip(f"real LLaMA tokenizer not found at {path}")
    model = sharp_model(n_layers=2, vocab_size=32000, seed=3, max_seq_len=256)
    return LLM(model=model, tokenizer=Tokenizer(path), device="cpu", num_kv_blocks=256)


def sampled(constraint: tuple, n: int, max_tokens: int = 80, **kw) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=s, constraint=constraint, **kw)
            for s in range(n)]


def test_json_schema_rows_that_stop_validate(llm: LLM) -> None:
    params = sampled(("json_schema", SCHEMA), 8)
    outs = llm.generate([PROMPTS[i % 4] for i in range(8)], params)
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert len(stopped) >= 4, [(o.finish_reason, o.text) for o in outs]
    for o in stopped:
        assert o.error is None
        jsonschema.validate(json.loads(o.text), SCHEMA)
        assert o.text == o.text.strip() and ": " not in o.text  # no free whitespace
    for o in outs:
        assert o.finish_reason in ("stop", "length")
        if o.finish_reason == "length":
            assert o.error == incomplete_message("json_schema")


def test_regex_and_choice_rows_conform(llm: LLM) -> None:
    outs = llm.generate(PROMPTS * 2, sampled(("regex", REGEX), 4, max_tokens=20) + sampled(("choice", CHOICES), 4))
    for o in outs[:4]:
        assert o.finish_reason == "stop" and re.fullmatch(REGEX, o.text), o.text
    for o in outs[4:]:
        assert o.finish_reason == "stop" and o.text in CHOICES, o.text
    # Greedy works too, and stops even with ignore_eos (the grammar, not EOS, ends the output).
    [o] = llm.generate(["x"], SamplingParams(max_tokens=20, ignore_eos=True, constraint=("regex", REGEX)))
    assert o.finish_reason == "stop" and re.fullmatch(REGEX, o.text)


def test_cut_by_max_tokens_is_length_with_an_error(llm: LLM) -> None:
    [o] = llm.generate(["x"], SamplingParams(max_tokens=3, temperature=1.0, seed=0, constraint=("json_schema", SCHEMA)))
    assert o.finish_reason == "length" and o.error == incomplete_message("json_schema")
    assert o.ok  # a length row, with its partial text, not an error row


def test_mixed_batch_leaves_unconstrained_rows_unchanged(llm: LLM) -> None:
    free = [SamplingParams(max_tokens=12, temperature=0.8, seed=7, stop=["e"]),
            SamplingParams(max_tokens=12, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=1.0, seed=9, logprobs=True)]
    alone = llm.generate(PROMPTS[:3], free)
    mixed_params = [free[0], sampled(("json_schema", SCHEMA), 1)[0], free[1],
                    sampled(("regex", REGEX), 1)[0], free[2], sampled(("choice", CHOICES), 1)[0]]
    mixed = llm.generate([PROMPTS[0], PROMPTS[3], PROMPTS[1], PROMPTS[2], PROMPTS[2], PROMPTS[0]], mixed_params)
    for a, m in zip(alone, [mixed[0], mixed[2], mixed[4]]):
        assert (m.token_ids, m.text, m.finish_reason, m.logprobs) == (a.token_ids, a.text, a.finish_reason, a.logprobs)


def test_seeded_sampling_under_a_constraint_is_reproducible(llm: LLM) -> None:
    params = sampled(("json_schema", SCHEMA), 3) + sampled(("regex", REGEX), 2, max_tokens=20)
    first = [(o.token_ids, o.text) for o in llm.generate(PROMPTS + ["z"], params)]
    # Alone, and in another order: each row's draws depend on its seed only.
    again = [(o.token_ids, o.text) for o in llm.generate((PROMPTS + ["z"])[::-1], params[::-1])][::-1]
    assert first == again


def test_bad_constraints_are_error_rows(llm: LLM) -> None:
    outs = llm.generate(["x", "y"], [SamplingParams(constraint=("json_schema", {"type": "nonsense"})),
                                     SamplingParams(constraint=("regex", "("))])
    assert [o.finish_reason for o in outs] == ["error", "error"]
    assert outs[0].error.startswith("json_schema: cannot compile") and outs[1].error.startswith("regex:")
    no_tok = LLM(model=llm.model, device="cpu", num_kv_blocks=16)
    [o] = no_tok.generate([[1, 5]], SamplingParams(constraint=("regex", "a")))
    assert o.finish_reason == "error" and "tokenizer" in o.error


def test_demo_model_writes_valid_json(model_dir: Path) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 200},
                                               "kind": {"enum": ["add", "sort", "reverse"]}},
              "required": ["answer", "kind"], "additionalProperties": False}
    demo = LLM(model_dir, dtype="float32", device="cpu")
    outs = demo.generate(["12+45=", "3+4=", "sort: 3 1 2 ="],
                         SamplingParams(max_tokens=40, constraint=("json_schema", schema)))
    for o in outs:
        assert o.finish_reason == "stop", (o.text, o.error)
        jsonschema.validate(json.loads(o.text), schema)
    # The regex the task's answers follow: the demo model's own answer fits it.
    [o] = demo.generate(["12+45="], SamplingParams(max_tokens=8, constraint=("regex", r"\d+")))
    assert o.finish_reason == "stop" and o.text == "57"
