"""Constrained decoding (batchgen.engine.constraints) with the real LLaMA tokenizer.

Random logits from a seeded generator stand in for a model: under the masks, every row that
terminates must decode to text that conforms (checked with ``jsonschema``, ``re`` and set
membership), whatever the "model" prefers. The bundled demo model then drives the same loop.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import llguidance
import pytest
import torch

from batchgen.engine.constraints import (
    ConstraintError,
    ConstraintState,
    TokenizerInfo,
    allocate_bitmask,
    check_constraint,
    apply_masks,
    compile_constraint,
    incomplete_message,
    tokenizer_info,
    unpack_bitmask,
)
from batchgen.tokenizer import Tokenizer

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test dependency")

from schemas import CHOICES, REGEX, SCHEMA


@pytest.fixture(scope="module")
def tok(shared_dir: Path) -> Tokenizer:
    path = shared_dir / "tokenizers" / "llama" / "tokenizer.model"
    if not path.exists():
        pytest.skip(f"real LLaMA tokenizer not found at {path}")
    return Tokenizer(path)


@pytest.fixture(scope="module")
def info(tok: Tokenizer) -> TokenizerInfo:
    return tokenizer_info(tok)


def sample_loop(states: list[Optional[ConstraintState]], vocab: int, steps: int, seed: int,
                sample: bool = False) -> tuple[list[list[int]], list[bool]]:
    """Pick every row's tokens from fresh seeded random logits under the masks; stop a row when it
    terminates. The argmax of fresh random logits is already a uniform draw among the allowed
    tokens (cheap); ``sample`` draws from their softmax with the generator instead, as the engine does."""
    g = torch.Generator().manual_seed(seed)
    B = len(states)
    ids: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(steps):
        logits = torch.randn(B, vocab, generator=g) * 3
        apply_masks(logits, [None if done[i] else s for i, s in enumerate(states)])
        if sample:
            toks = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g)[:, 0].tolist()
        else:
            toks = logits.argmax(dim=-1).tolist()
        for i, s in enumerate(states):
            if done[i] or s is None:
                continue
            assert s.accept(toks[i]), f"row {i}: the mask allowed token {toks[i]} that the matcher refused"
            ids[i].append(toks[i])
            done[i] = s.is_terminated()
        if all(d or s is None for d, s in zip(done, states)):
            break
    return ids, done


def completion_text(tok: Tokenizer, ids: list[int]) -> str:
    """batchgen's completion text: ``decode`` of the completion ids, EOS excluded (as the engine does)."""
    return tok.decode([t for t in ids if t != tok.eos_id])


def run_constraint(tok: Tokenizer, info: TokenizerInfo, kind: str, value: object, rows: int = 12,
                   steps: int = 80, seed: int = 0) -> list[str]:
    c = compile_constraint(kind, value, info)
    states: list[Optional[ConstraintState]] = [c.new_state() for _ in range(rows)]
    ids, done = sample_loop(states, info.vocab_size, steps, seed)
    texts = [completion_text(tok, row) for row, d in zip(ids, done) if d]
    # The check below must have something to check: most rows end well within the step budget.
    assert len(texts) >= rows // 2, f"only {len(texts)}/{rows} rows terminated"
    for row, d, s in zip(ids, done, states):
        if d:
            assert s.is_complete() and s.error is None and s.length_error() is None
    return texts


def test_json_schema_rows_parse_and_validate(tok: Tokenizer, info: TokenizerInfo) -> None:
    texts = run_constraint(tok, info, "json_schema", SCHEMA)
    for t in texts:
        jsonschema.validate(json.loads(t), SCHEMA)
        assert not t[0].isspace(), f"free whitespace at the start of {t!r}"
    # Random logits explore the schema: several labels and array lengths occur.
    docs = [json.loads(t) for t in texts]
    assert len({d["label"] for d in docs}) > 1 and len({len(d["tags"]) for d in docs}) > 1


def test_regex_rows_match(tok: Tokenizer, info: TokenizerInfo) -> None:
    for t in run_constraint(tok, info, "regex", REGEX, seed=1):
        assert re.fullmatch(REGEX, t, flags=re.ASCII), t


def test_choice_rows_are_one_of_the_choices(tok: Tokenizer, info: TokenizerInfo) -> None:
    texts = run_constraint(tok, info, "choice", CHOICES, seed=2)
    assert set(texts) <= set(CHOICES) and len(set(texts)) > 1


def test_leading_space_only_as_word_start_marker(tok: Tokenizer, info: TokenizerInfo) -> None:
    """A first piece ``▁toxic``-style is allowed (decode drops the ▁), the byte piece <0x20> is not."""
    s = compile_constraint("choice", CHOICES, info).new_state()
    bm = allocate_bitmask(1, info)
    s.fill_mask(bm, 0)
    allowed = unpack_bitmask(bm, info.vocab_size)[0]
    assert not allowed[info.space_byte_id]
    first = tok.encode("toxic", bos=False)[0]  # "▁to" (SentencePiece's word start)
    assert tok.id_to_piece(first).startswith("\u2581") and allowed[first]
    for t in tok.encode("toxic", bos=False):
        assert s.accept(t)
    assert s.is_terminated() and s.is_complete() and completion_text(tok, tok.encode("toxic", bos=False)) == "toxic"


def test_uncompilable_constraints_are_refused_clearly(info: TokenizerInfo) -> None:
    with pytest.raises(ConstraintError, match=r"cannot compile the JSON schema: .*http://example\.com/s\.json"):
        compile_constraint("json_schema", {"$ref": "http://example.com/s.json"}, info)
    with pytest.raises(ConstraintError, match=r"look-around"):
        compile_constraint("json_schema", {"type": "string", "pattern": "(?=a)b"}, info)
    with pytest.raises(ConstraintError, match=r"Invalid type: strin"):
        compile_constraint("json_schema", {"type": "strin"}, info)
    with pytest.raises(ConstraintError, match=r"cannot compile the JSON schema: Unknown format: colour"):
        compile_constraint("json_schema", {"type": "string", "format": "colour"}, info)
    with pytest.raises(ConstraintError, match=r"(?s)cannot compile the regex: .*unclosed group"):
        compile_constraint("regex", "(ab", info)
    with pytest.raises(ConstraintError, match=r"json_schema is not valid JSON"):
        compile_constraint("json_schema", "{nope", info)
    with pytest.raises(ConstraintError, match=r"choice\[1\] must be a non-empty string"):
        compile_constraint("choice", ["a", ""], info)
    with pytest.raises(ConstraintError, match=r"unknown constraint kind 'grammar'"):
        compile_constraint("grammar", "x", info)  # type: ignore[arg-type]
    # The tokenizer-free check (for `validate`) gives the same verdicts.
    with pytest.raises(ConstraintError, match=r"cannot compile the JSON schema: .*http://example\.com/s\.json"):
        check_constraint("json_schema", {"$ref": "http://example.com/s.json"})
    with pytest.raises(ConstraintError, match=r"(?s)cannot compile the regex: .*unclosed group"):
        check_constraint("regex", "(ab")
    check_constraint("json_schema", SCHEMA)
    check_constraint("regex", REGEX)
    check_constraint("choice", CHOICES)


def test_compiled_once_per_content(info: TokenizerInfo) -> None:
    a = compile_constraint("json_schema", SCHEMA, info)
    b = compile_constraint("json_schema", json.loads(json.dumps(SCHEMA)), info)
    assert a is b and compile_constraint("json_schema", json.dumps(SCHEMA), info) is a
    assert compile_constraint("regex", REGEX, info) is not compile_constraint("regex", REGEX + "x", info)


def test_unconstrained_rows_keep_identical_logits_and_padding_is_masked(info: TokenizerInfo) -> None:
    g = torch.Generator().manual_seed(3)
    V = info.vocab_size + 5  # a padded output layer, wider than the tokenizer
    logits = torch.randn(5, V, generator=g)
    before = logits.clone()
    c = compile_constraint("json_schema", SCHEMA, info)
    states = [None, c.new_state(), None, compile_constraint("regex", REGEX, info).new_state(), None]
    apply_masks(logits, states)
    for i in (0, 2, 4):
        assert torch.equal(logits[i], before[i])
    for i in (1, 3):
        finite = torch.isfinite(logits[i])
        assert 0 < int(finite.sum()) < 200 and not finite[info.vocab_size:].any()
        assert torch.equal(logits[i][finite], before[i][finite])  # allowed tokens keep their logits


def test_executor_masks_equal_serial_masks(tok: Tokenizer, info: TokenizerInfo) -> None:
    c = compile_constraint("json_schema", SCHEMA, info)
    states = [c.new_state() for _ in range(4)]
    for i, s in enumerate(states):  # at different points of the document
        sample_loop([s], info.vocab_size, steps=4 * i, seed=i)
    logits = torch.randn(4, info.vocab_size, generator=torch.Generator().manual_seed(4))
    a, b = logits.clone(), logits.clone()
    apply_masks(a, states)
    apply_masks(b, states, executor=llguidance.LLExecutor(num_threads=2))
    assert torch.equal(a, b)


def test_seeded_sampling_under_a_constraint_is_reproducible(info: TokenizerInfo) -> None:
    c = compile_constraint("json_schema", SCHEMA, info)
    runs = [sample_loop([c.new_state() for _ in range(3)], info.vocab_size, 15, seed=7, sample=True)[0]
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]


def test_forbidden_token_and_cut_document(tok: Tokenizer, info: TokenizerInfo) -> None:
    c = compile_constraint("json_schema", SCHEMA, info)
    s = c.new_state()
    ids, _ = sample_loop([s], info.vocab_size, steps=3, seed=5)
    assert completion_text(tok, ids[0]).startswith("{")
    assert not s.is_complete() and not s.is_terminated()
    assert s.length_error() == incomplete_message("json_schema") and "incomplete" in s.length_error()
    bm = allocate_bitmask(1, info)
    s.fill_mask(bm, 0)
    forbidden = int((~unpack_bitmask(bm, info.vocab_size)[0]).nonzero()[0])
    assert not s.accept(forbidden)
    assert s.error and s.is_terminated()
    s.fill_mask(bm, 0)
    assert unpack_bitmask(bm, info.vocab_size)[0].nonzero().flatten().tolist() == [info.eos_id]


def test_open_ended_regex_ends_by_eos(tok: Tokenizer, info: TokenizerInfo) -> None:
    """``\\d+`` is complete after a digit but can go on: EOS is allowed, and taking it terminates."""
    s = compile_constraint("regex", r"\d+", info).new_state()
    for t in tok.encode("7", bos=False):  # "▁", "7": the leading word-start marker, then the digit
        assert s.accept(t)
    assert s.is_complete() and not s.is_terminated() and s.length_error() is None
    bm = allocate_bitmask(1, info)
    s.fill_mask(bm, 0)
    assert unpack_bitmask(bm, info.vocab_size)[0, info.eos_id]
    assert s.accept(info.eos_id) and s.is_terminated()


def test_demo_model_greedy_json(model_dir: Path) -> None:
    """The bundled trained model, through ``logits_full`` in a loop, writes a valid document."""
    from batchgen.checkpoint import load_model

    tok = Tokenizer(model_dir / "tokenizer.model")
    model = load_model(model_dir, dtype="float32", device="cpu")
    info = tokenizer_info(tok)
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "ok": {"type": "boolean"}},
              "required": ["answer", "ok"], "additionalProperties": False}
    c = compile_constraint("json_schema", schema, info)
    prompts = ["12+30=", "reverse: abc ->", "sort: 3 1 2 ->"]
    for p in prompts:
        seq = tok.encode(p)
        s = c.new_state()
        out: list[int] = []
        with torch.no_grad():
            for _ in range(40):
                logits = model.logits_full(torch.tensor([seq + out]))[:, -1].clone()
                apply_masks(logits, [s])
                t = int(logits.argmax())
                assert s.accept(t)
                out.append(t)
                if s.is_terminated():
                    break
        assert s.is_terminated(), f"{p!r}: no document within 40 tokens: {completion_text(tok, out)!r}"
        jsonschema.validate(json.loads(completion_text(tok, out)), schema)
