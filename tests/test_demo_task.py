"""The demo's synthetic task, its tokenizer trainer, and the bundled trained model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from batchgen.checkpoint import load_model
from batchgen.demo.task import answer, kind_of, make_examples, score, split_of
from batchgen.demo.train import (
    DEFAULT_OUT, EOS_ID, encode_example, greedy_complete, make_batch, model_args, train_model, train_tokenizer,
)
from batchgen.model import ModelArgs
from batchgen.tokenizer import Tokenizer

MODEL_DIR = DEFAULT_OUT


# --- the task ---------------------------------------------------------------------------------


def test_examples_are_deterministic_per_seed_and_split() -> None:
    assert make_examples(300, 7, "train") == make_examples(300, 7, "train")
    assert make_examples(300, 7, "heldout") == make_examples(300, 7, "heldout")
    assert make_examples(300, 7, "train") != make_examples(300, 8, "train")
    assert make_examples(0, 7, "train") == []


def test_kinds_are_mixed_evenly_or_as_asked() -> None:
    kinds = [kind_of(p) for p, _ in make_examples(3000, 0, "train")]
    for kind in ("add", "reverse", "sort"):
        assert 800 < kinds.count(kind) < 1200, f"{kind}: {kinds.count(kind)} of 3000; expected about a third"
    weighted = [kind_of(p) for p, _ in make_examples(3000, 0, "train", {"add": 2, "reverse": 1, "sort": 1})]
    assert 1300 < weighted.count("add") < 1700
    assert {kind_of(p) for p, _ in make_examples(200, 0, "heldout", {"sort": 1})} == {"sort"}
    assert kind_of("12+45=") == "add" and kind_of("reverse: cat dog =") == "reverse"


def test_heldout_never_in_training() -> None:
    train = {p for p, _ in make_examples(6000, 0, "train")} | {p for p, _ in make_examples(2000, 1, "train")}
    heldout = [p for p, _ in make_examples(2000, 0, "heldout")] + [p for p, _ in make_examples(500, 3, "heldout")]
    assert not train & set(heldout)
    # The split is a property of the problem itself, whatever the seed that drew it.
    assert {split_of(p) for p in train} == {"train"}
    assert {split_of(p) for p in heldout} == {"heldout"}
    # Held-out problems within one call are distinct, so each counts once in an accuracy.
    first = [p for p, _ in make_examples(2000, 0, "heldout")]
    assert len(set(first)) == len(first)
    # Problems a model can only answer by generalising: e.g. small sums are held out too.
    assert any("+" in p for p in heldout)


def test_answers_are_correct() -> None:
    assert answer("12+45=") == "57"
    assert answer("99+9=") == "108"
    assert answer("0+0=") == "0"
    assert answer("reverse: cat dog sun =") == "sun dog cat"
    assert answer("sort: 5 1 3 5 0 =") == "0 1 3 5 5"
    # Cross-check every generated answer against an independent computation.
    for p, a in make_examples(1000, 5, "train") + make_examples(300, 5, "heldout"):
        if "+" in p:
            x, y = p.rstrip("=").split("+")
            assert a == str(int(x) + int(y)), p
        else:
            items = p.split(":", 1)[1].rstrip("=").split()
            assert a.split() == (items[::-1] if p.startswith("reverse") else sorted(items)), p


def test_score_accepts_only_the_exact_answer() -> None:
    assert score("12+45=", "57")
    assert score("12+45=", "  57\n")  # surrounding whitespace is not part of the answer
    assert score("reverse: cat dog =", " dog cat")
    for wrong in ("58", "", "5 7", "057", "57.", "575", "57 57"):
        assert not score("12+45=", wrong), wrong
    assert not score("reverse: cat dog =", "dog  cat")
    assert not score("reverse: cat dog =", "cat dog")
    assert not score("sort: 3 1 2 =", "1 2")
    assert not score("sort: 3 1 2 =", "123")


@pytest.mark.parametrize("bad", ["", "12+345=", "1+2", "hello", "reverse: cat =", "reverse: cat zebra =",
                                 "sort: 1 2 =", "sort: 1 a 2 =", "12 + 45 ="])
def test_bad_prompts_are_rejected_clearly(bad: str) -> None:
    with pytest.raises(ValueError, match="demo prompt"):
        answer(bad)


def test_make_examples_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        make_examples(5, 0, "test")
    with pytest.raises(ValueError, match="n must be >= 0"):
        make_examples(-1, 0, "train")
    for mix in ({"mul": 1}, {"add": -1, "sort": 1}, {"add": 0}):
        with pytest.raises(ValueError, match="mix must give"):
            make_examples(5, 0, "train", mix)


# --- the trainer's pieces ---------------------------------------------------------------------


def _small_corpus() -> list[str]:
    return [s for pair in make_examples(2000, 0, "train") for s in pair]


def test_tokenizer_training_is_deterministic_and_llama_like(tmp_path) -> None:
    corpus = _small_corpus()
    first, second = train_tokenizer(corpus, vocab_size=320), train_tokenizer(corpus, vocab_size=320)
    assert first == second
    assert first != train_tokenizer(corpus[:2000], vocab_size=320)  # and it does depend on the corpus
    (tmp_path / "tokenizer.model").write_bytes(first)
    tok = Tokenizer(tmp_path / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (320, 1, 2, -1)
    assert tok.id_to_piece(0) == "<unk>" and tok.id_to_piece(3) == "<0x00>"  # byte fallback
    pieces = [tok.id_to_piece(i) for i in tok.encode("12+45=", bos=False)]
    assert [p for p in pieces if p.strip("▁")] == ["1", "2", "+", "4", "5", "="]  # digits split
    assert tok.decode(tok.encode("reverse: cat dog =")) == "reverse: cat dog ="


def test_loss_mask_covers_exactly_answer_and_eos(tmp_path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(train_tokenizer(_small_corpus(), vocab_size=320))
    tok = Tokenizer(tmp_path / "tokenizer.model")
    a = encode_example(tok, "12+45=", "57")
    b = encode_example(tok, "reverse: cat dog sun =", "sun dog cat")
    assert a[0] == tok.encode("12+45=") + tok.encode("57", bos=False) + [EOS_ID]
    inputs, targets, mask = make_batch([a, b])
    for row, (ids, n_head) in enumerate((a, b)):
        assert inputs[row, : len(ids) - 1].tolist() == ids[:-1]
        assert targets[row][mask[row]].tolist() == ids[n_head:]  # the answer's ids, then EOS
        assert int(mask[row].sum()) == len(ids) - n_head
    assert not mask[0, len(a[0]) - 1 :].any()  # padding of the shorter row is never a target


@contextmanager
def _single_thread() -> Iterator[None]:
    # Tiny models: on a busy CPU two intra-op threads wait on each other; measured under load,
    # one forward of the bundled model took 2 ms with one thread and 180 ms with two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    with _single_thread():
        yield


def test_training_is_deterministic_and_learns(tmp_path, one_thread) -> None:
    (tmp_path / "tokenizer.model").write_bytes(train_tokenizer(_small_corpus(), vocab_size=320))
    tok = Tokenizer(tmp_path / "tokenizer.model")
    encoded = [encode_example(tok, p, a) for p, a in make_examples(500, 0, "train")]
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=320, multiple_of=16, max_seq_len=64)
    runs = [train_model(args, encoded, steps=30, batch_size=16, seed=3, log_every=1000) for _ in range(2)]
    (m1, loss1), (m2, loss2) = runs
    assert loss1 == loss2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    # Mean over the 30 steps' losses: an untrained model scores ln(320) = 5.8 throughout.
    assert loss1 < 5.0
    other, _ = train_model(args, encoded, steps=30, batch_size=16, seed=4, log_every=1000)
    assert not torch.equal(other.output.weight, m1.output.weight)


# --- the bundled model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled() -> Iterator[tuple[torch.nn.Module, Tokenizer]]:
    with _single_thread():
        yield load_model(MODEL_DIR, dtype="float32", device="cpu"), Tokenizer(MODEL_DIR / "tokenizer.model")


def test_bundled_artifacts_are_small_and_consistent(bundled) -> None:
    model, tok = bundled
    files = sorted(p.name for p in MODEL_DIR.iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.model"]
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 8 * 2**20
    # What the trainer builds, read back from config.json (which has the FFN width, not multiple_of).
    assert replace(model.args, multiple_of=0) == replace(model_args(tok.vocab_size), multiple_of=0)
    assert json.loads((MODEL_DIR / "config.json").read_text())["vocab_size"] == tok.vocab_size
    assert model.args.n_kv_heads < model.args.n_heads  # GQA, like the larger LLaMAs
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _greedy_one(model: torch.nn.Module, ids: list[int], max_new_tokens: int = 16) -> tuple[list[int], bool]:
    """Plain greedy decoding of one prompt, re-running the whole sequence each step."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model.logits_full(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == EOS_ID:
                return out, True
            out.append(nxt)
    return out, False


def test_bundled_model_answers_heldout_problems(bundled) -> None:
    model, tok = bundled
    examples = make_examples(60, seed=12345, split="heldout")
    results = [_greedy_one(model, tok.encode(p)) for p, _ in examples]
    correct = sum(score(p, tok.decode(out)) for (p, _), (out, _) in zip(examples, results))
    stopped = sum(eos for _, eos in results)
    assert correct >= 0.95 * len(examples), f"{correct}/{len(examples)} held-out problems answered exactly"
    # The model ends its answer with EOS, so the engine stops with finish_reason "stop".
    assert stopped == len(examples)
    # The trainer's batched, right-padded greedy loop agrees with the plain one.
    batched = greedy_complete(model, [tok.encode(p) for p, _ in examples[:10]], EOS_ID, max_new_tokens=16)
    assert batched == [out for out, _ in results[:10]]

