"""Every job-spec field that changes how rows are generated, through a real job (``run_job`` on a
local Ray bound to 127.0.0.1), with a check that the field had its effect.

Three small jobs share the bundled demo model:

- sampling: ``chat``/``system``, ``model.tokenizer``, ``temperature``, ``top_p``, ``top_k``,
  ``seed``, ``max_tokens``, ``logprobs`` (values against transformers' log-softmax),
  ``output.token_ids``, ``overrides`` and ``max_num_seqs``;
- stopping and memory: ``stop``, ``stop_token_ids``, ``ignore_eos``, ``kv_cache_memory_gb`` and a
  prompt longer than the context;
- context: ``max_seq_len``, ``truncate_prompt`` and ``max_num_batched_tokens``.

Each job's rows are compared with the engine run in-process on the same prompts (``batchgen.engine.LLM``,
each row's seed from ``row_seed``), and each field is shown to matter: the in-process result
without it differs.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from batchgen.engine import LLM, SamplingParams
from batchgen.pipeline.driver import run_job
from batchgen.pipeline.spec import SpecError, row_seed, validate_spec

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "batchgen" / "demo" / "model"
SHARD_ROWS = 4


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(DEMO_MODEL, dtype="float32", device="cpu")


def run(tmp: Path, name: str, table: pa.Table, model: dict, sampling: dict, **input_: Any) -> dict[int, dict]:
    """Run a job over ``table`` (columns id, prompt, ...) and return its rows by id."""
    (tmp / name).mkdir()
    pq.write_table(table, tmp / name / "in.parquet")
    spec = validate_spec({
        "name": name,
        "model": {"path": str(DEMO_MODEL), "dtype": "float32", **model},
        "input": {"path": str(tmp / name / "in.parquet"), "id_column": "id", "prompt_column": "prompt", **input_},
        "sampling": sampling,
        "output": {"path": str(tmp / name / "out"), "token_ids": True},
        "execution": {"replicas": 1, "shard_rows": SHARD_ROWS, "heartbeat_s": 1, "lease_timeout_s": 60},
    })
    summary = run_job(spec)
    assert summary["rows"] == table.num_rows
    out = pq.ParquetDataset(tmp / name / "out" / "shards").read()
    return {r["id"]: r for r in out.to_pylist()}


def shards_one_after_another(out: Path) -> bool:
    """Whether each shard started only after the shard two before it had finished: the replica
    never held more than two shards, because its engine admitted one row at a time. With the
    default knobs a replica leases the next shard as soon as its rows are admitted and several
    shards run side by side (see test_pipeline's overlap test)."""
    shards = sorted(pq.read_table(out / "summary.parquet").to_pylist(), key=lambda s: s["started"])
    assert len(shards) >= 3
    return all(later["started"] >= earlier["finished"] for earlier, later in zip(shards, shards[2:]))


def same(row: dict, out: Any) -> bool:
    return (row["token_ids"], row["completion"], row["finish_reason"]) == (out.token_ids, out.text,
                                                                           out.finish_reason)


# --------------------------------------------------------------------------------------- sampling

SYSTEM = "Be brief."
# The demo model is sure of itself: at these values each of temperature, top_p, top_k and seed
# changes some of its draws on these prompts.
SAMPLING = dict(max_tokens=6, temperature=3.0, top_p=0.9, top_k=3, seed=3)


def test_sampling_chat_tokenizer_logprobs_token_ids_overrides_max_num_seqs(local_ray, llm: LLM,
                                                                          tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="logprobs are checked against transformers")
    # model.tokenizer: a checkpoint directory without tokenizer.model, the tokenizer elsewhere.
    bare, tok_file = tmp_path / "bare-model", tmp_path / "tokenizers" / "demo.model"
    bare.mkdir()
    tok_file.parent.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(DEMO_MODEL / f, bare / f)
    shutil.copy(DEMO_MODEL / "tokenizer.model", tok_file)

    n = 12
    prompts = [f"{i % 7}+{i % 5}=" for i in range(n)]
    # Per-row overrides (null: the spec's value): row 1 stops after 2 tokens, row 2 is greedy,
    # rows 8-11 are hotter, rows 3-7 draw from seeds of their own.
    mt: list[Any] = [None] * n
    temp: list[Any] = [None] * 8 + [6.0] * 4
    sd: list[Any] = [None] * 3 + [99 + k for k in range(5)] + [None] * 4
    mt[1], temp[2] = 2, 0.0
    table = pa.table({"id": list(range(n)), "prompt": prompts, "mt": pa.array(mt, pa.int64()),
                      "temp": pa.array(temp, pa.float64()), "sd": pa.array(sd, pa.int64())})
    model = {"path": str(bare), "tokenizer": str(tok_file), "max_num_seqs": 1}
    sampling = {**SAMPLING, "logprobs": True, "overrides": {"max_tokens": "mt", "temperature": "temp", "seed": "sd"}}

    # Without model.tokenizer, text prompts cannot be encoded: refused before anything runs.
    with pytest.raises(SpecError, match="model.tokenizer"):
        run(tmp_path, "no-tokenizer", table, {**model, "tokenizer": None}, sampling, chat=True, system=SYSTEM)
    rows = run(tmp_path, "sampling", table, model, sampling, chat=True, system=SYSTEM)

    tok = llm.tokenizer
    chat = [tok.encode_chat_prompt(p, system=SYSTEM) for p in prompts]

    def params(i: int, **change: Any) -> SamplingParams:
        """Row i's sampling as the job should derive it: the spec's, the row's overrides, and a
        seed from (seed or its override, id); ``change`` replaces fields after that."""
        p: dict[str, Any] = {**SAMPLING, "logprobs": True}
        if mt[i] is not None:
            p["max_tokens"] = mt[i]
        if temp[i] is not None:
            p["temperature"] = temp[i]
        p["seed"] = row_seed(sd[i] if sd[i] is not None else SAMPLING["seed"], i)
        return SamplingParams(**{**p, **change})

    ref = llm.generate(chat, [params(i) for i in range(n)])
    for i in range(n):
        assert rows[i]["error"] is None, rows[i]
        assert rows[i]["prompt_tokens"] == len(chat[i])  # chat + system shaped the prompt
        assert same(rows[i], ref[i]), (i, rows[i], ref[i])
        assert len(rows[i]["token_ids"]) == rows[i]["completion_tokens"] == len(rows[i]["logprobs"])
    assert rows[1]["completion_tokens"] <= 2 < max(r["completion_tokens"] for r in rows.values())

    # Each field changed what was drawn: the engine without it gives other tokens.
    tokens = [r.token_ids for r in ref]
    changes = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    for field, default in changes.items():
        other = llm.generate(chat, [params(i, **{field: default}) for i in range(n)])
        assert [o.token_ids for o in other] != tokens, field
    shifted = llm.generate(chat, [params(i, seed=row_seed(SAMPLING["seed"] + 1, i)) for i in range(n)])
    assert [o.token_ids for o in shifted] != tokens  # sampling.seed
    plain = llm.generate([tok.encode(p, bos=True) for p in prompts], [params(i) for i in range(n)])
    assert [o.token_ids for o in plain] != tokens  # chat
    # The overrides: row 2 is greedy; without them rows 3-11 draw otherwise.
    greedy = llm.generate([chat[2]], SamplingParams(max_tokens=SAMPLING["max_tokens"]))[0]
    assert rows[2]["token_ids"] == greedy.token_ids
    spec_seeds = llm.generate(chat[3:8], [params(i, seed=row_seed(SAMPLING["seed"], i)) for i in range(3, 8)])
    assert [o.token_ids for o in spec_seeds] != tokens[3:8]
    spec_temp = llm.generate(chat[8:], [params(i, temperature=SAMPLING["temperature"]) for i in range(8, n)])
    assert [o.token_ids for o in spec_temp] != tokens[8:]

    # logprobs: log-softmax of the model's logits at each chosen token (transformers' forward).
    hf = transformers.LlamaForCausalLM.from_pretrained(DEMO_MODEL, torch_dtype=torch.float32).eval()
    for i in range(n):
        ids = chat[i] + rows[i]["token_ids"]
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        want = [lp[len(chat[i]) - 1 + k, t].item() for k, t in enumerate(rows[i]["token_ids"])]
        assert rows[i]["logprobs"] == pytest.approx(want, abs=1e-4), i
        assert all(v <= 0 and math.isfinite(v) for v in rows[i]["logprobs"])

    # model.max_num_seqs: 1 sequence at a time, so the replica never ran three shards at once.
    assert shards_one_after_another(tmp_path / "sampling" / "out")


# --------------------------------------------------------------------------------------- stopping

def _sort_prompt(digits: int) -> str:
    return "sort: " + " ".join(str((7 * k + 3) % 10) for k in range(digits)) + " ="


def test_stop_stop_token_ids_ignore_eos_and_kv_cache_memory(local_ray, llm: LLM, tmp_path: Path) -> None:
    tok = llm.tokenizer
    max_tokens = 12
    prompts = ["1+2=", "3+4=", "reverse: sun moon =", _sort_prompt(3), _sort_prompt(4), "5+5=",
               _sort_prompt(9), _sort_prompt(31)]
    lengths = [len(tok.encode(p, bos=True)) for p in prompts]
    # The KV cache budget: 2 blocks of 16 tokens (4 layers x K,V x 2 heads x 32 dims x fp32 each).
    block_bytes = 16 * 2 * 4 * 2 * 32 * 4
    cache_tokens = 32
    fits = [n + max_tokens <= cache_tokens for n in lengths]
    assert fits[:6] == [True] * 6 and fits[6:] == [False, False] and lengths[7] >= 64  # the last: over the context

    base = SamplingParams(max_tokens=max_tokens)
    free = llm.generate(prompts[:6], base)  # greedy, no stops
    assert all(o.finish_reason == "stop" and len(o.token_ids) < max_tokens for o in free)  # EOS ends each
    eos_free = llm.generate(prompts[:6], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    # A stop string and a stop token that occur in some continuations (after EOS is ignored).
    stop = "1"
    stop_id = tok.encode("4", bos=False)[-1]
    assert any(stop in (o.text or "") for o in eos_free) and any(stop_id in o.token_ids for o in eos_free)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, stop=[stop], stop_token_ids=[stop_id])
    ref = llm.generate(prompts[:6], params)

    table = pa.table({"id": list(range(len(prompts))), "prompt": prompts})
    rows = run(tmp_path, "stops", table, {"kv_cache_memory_gb": 2.5 * block_bytes / 2**30},
               {"max_tokens": max_tokens, "ignore_eos": True, "stop": stop, "stop_token_ids": [stop_id]})
    for i in range(6):
        assert rows[i]["error"] is None and same(rows[i], ref[i]), (i, rows[i], ref[i])
    assert rows[6]["error"] == (f"prompt_too_long: {lengths[6] + max_tokens} tokens do not fit the KV cache "
                                f"({cache_tokens} tokens)")
    assert rows[7]["error"] == (f"prompt_too_long: {lengths[7]} tokens, the context holds 64 "
                                "(set input.truncate_prompt: true to keep the last tokens)")

    # Each field had its effect on some row.
    by_string = [i for i in range(6) if stop in (eos_free[i].text or "")]
    by_token = [i for i in range(6) if stop_id in eos_free[i].token_ids]
    for i in by_string + by_token:
        assert rows[i]["finish_reason"] == "stop" and len(rows[i]["token_ids"]) < len(eos_free[i].token_ids)
    for i in by_string:
        cut = eos_free[i].text.find(stop)
        assert rows[i]["completion"].startswith(eos_free[i].text[:cut]) and stop not in rows[i]["completion"]
    for i in by_token:
        assert rows[i]["token_ids"][-1] == stop_id or stop in (eos_free[i].text or "")
    # ignore_eos: rows not stopped by the stops ran to max_tokens, where EOS had ended them early.
    unstopped = [i for i in range(6) if i not in by_string + by_token]
    assert unstopped and all(rows[i]["completion_tokens"] == max_tokens > len(free[i].token_ids) for i in unstopped)


# --------------------------------------------------------------------------------------- context

def test_max_seq_len_truncate_prompt_and_max_num_batched_tokens(local_ray, tmp_path: Path) -> None:
    max_seq_len, max_tokens = 24, 4
    prompts = ["1+2=", _sort_prompt(9), _sort_prompt(15), "3+3=", _sort_prompt(5), _sort_prompt(12),
               "reverse: cat dog =", _sort_prompt(20), "7+1="]
    short = LLM(DEMO_MODEL, dtype="float32", device="cpu", max_model_len=max_seq_len)
    lengths = [len(short.tokenizer.encode(p, bos=True)) for p in prompts]
    cut = [i for i, n in enumerate(lengths) if n >= max_seq_len]  # too long for 24, not for 64
    assert cut and all(lengths[i] < 64 for i in cut)
    capped = [i for i, n in enumerate(lengths) if max_seq_len - max_tokens < n < max_seq_len]
    assert capped  # fit the context, but not with max_tokens more

    table = pa.table({"id": list(range(len(prompts))), "prompt": prompts})
    rows = run(tmp_path, "context", table, {"max_seq_len": max_seq_len, "max_num_batched_tokens": 1},
               {"max_tokens": max_tokens, "ignore_eos": True}, truncate_prompt=True)
    ref = short.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True, truncate_prompt=True))
    for i, out in enumerate(ref):
        assert rows[i]["error"] is None and same(rows[i], out), (i, rows[i], out)
        assert rows[i]["prompt_tokens"] + rows[i]["completion_tokens"] <= max_seq_len
    for i in cut:  # truncate_prompt kept the prompt's last tokens, leaving room for max_tokens
        assert rows[i]["prompt_tokens"] == max_seq_len - max_tokens < lengths[i]
    for i in capped:  # max_seq_len ended the completion early
        assert rows[i]["finish_reason"] == "length" and rows[i]["completion_tokens"] < max_tokens

    # max_num_batched_tokens: 1 admits a prompt only when nothing else runs: one row at a time.
    assert shards_one_after_another(tmp_path / "context" / "out")

    # Without truncate_prompt the same rows are errors that name the context; and with the
    # default max_num_batched_tokens the replica runs its shards side by side.
    rows = run(tmp_path, "no-truncate", table, {"max_seq_len": max_seq_len},
               {"max_tokens": max_tokens, "ignore_eos": True})
    for i, out in enumerate(ref):
        if i in cut:
            assert rows[i]["error"] == (f"prompt_too_long: {lengths[i]} tokens, the context holds {max_seq_len} "
                                        "(set input.truncate_prompt: true to keep the last tokens)")
        else:
            assert same(rows[i], out)
    assert not shards_one_after_another(tmp_path / "no-truncate" / "out")
