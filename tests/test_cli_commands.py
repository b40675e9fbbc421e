"""Every ``python -m batchgen`` subcommand that needs no Ray, run as a user runs it: a subprocess.

``validate`` (a good spec, a bad one, hostile nesting), ``plan`` (a preset and a spec), ``bench
--quick`` and ``generate`` with its sampling, chat and output flags, each checked against what
the engine gives in-process for the same request. The commands that run jobs (``run``,
``status``, ``verify``) are in ``test_user_paths.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.engine import LLM, SamplingParams

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "batchgen" / "demo" / "model"


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m batchgen ARGS`` from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "batchgen", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def llm() -> LLM:
    """The demo model in-process: the reference for what ``generate`` must print."""
    return LLM(DEMO_MODEL, dtype="float32", device="cpu")


def small_job(tmp: Path) -> Path:
    """A valid spec over a 12-row Parquet file, and the file."""
    (tmp / "in").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": list(range(12)), "prompt": [f"{i}+1=" for i in range(12)]}),
                   tmp / "in" / "x.parquet")
    spec = {
        "model": {"path": str(DEMO_MODEL), "dtype": "float32"},
        "input": {"path": str(tmp / "in"), "id_column": "id", "prompt_column": "prompt"},
        "sampling": {"max_tokens": 4},
        "output": {"path": str(tmp / "out")},
        "execution": {"shard_rows": 5},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# --------------------------------------------------------------------------------------- validate

def test_validate_good_bad_and_deeply_nested_specs(tmp_path: Path) -> None:
    good = small_job(tmp_path)
    res = cli("validate", str(good))
    assert res.returncode == 0, res.stderr
    assert "12 rows, 3 shards" in res.stdout and not (tmp_path / "out").exists()

    res = cli("validate", str(good), "--set", "sampling.top_p=1.5")
    assert res.returncode == 2 and "sampling.top_p" in res.stderr and "Traceback" not in res.stderr

    # 10**5 levels of nesting: both parsers recurse per level. A spec error (exit 2), not a
    # RecursionError traceback (exit 1).
    depth = 100_000
    hostile = {
        "deep.json": '{"name": ' + "[" * depth + "]" * depth + "}",
        "deep.yaml": "model: " + "{a: " * depth + "1" + "}" * depth + "\n",
        "deep-flow.yaml": "[" * depth + "]" * depth + "\n",
    }
    for name, text in hostile.items():
        (tmp_path / name).write_text(text)
        res = cli("validate", str(tmp_path / name))
        assert res.returncode == 2, (name, res.stderr[-2000:])
        assert "nested too deeply" in res.stderr and "Traceback" not in res.stderr, (name, res.stderr[-2000:])
        assert name in res.stderr  # names the file

    # Shallower than the parsers' limit but nested where a value belongs: an ordinary field error.
    res = cli("validate", str(good), "--set", "sampling.max_tokens=" + "[" * 50 + "]" * 50)
    assert res.returncode == 2 and "sampling.max_tokens" in res.stderr and "Traceback" not in res.stderr


# --------------------------------------------------------------------------------------- plan

def test_plan_a_preset_and_a_spec(tmp_path: Path) -> None:
    res = cli("plan", "--preset", "llama-2-70b", "--gpus", "8", "--gpu-memory", "80", "--json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["tensor_parallel"] >= 2  # 70B does not fit one 80 GB GPU in bf16
    res = cli("plan", "--preset", "llama-65b", "--gpus", "1", "--gpu-memory", "80")
    assert res.returncode == 2 and "per GPU" in res.stderr and "Traceback" not in res.stderr

    spec = small_job(tmp_path)
    res = cli("plan", str(spec), "--gpu-memory", "1", "--json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    # The demo model's own shape, read through the spec: fp32, 4 layers x 2 KV heads x 32 dims.
    assert (plan["dtype"], plan["tensor_parallel"], plan["max_seq_len"]) == ("float32", 1, 64)
    assert plan["kv_bytes_per_token"] == 2 * 4 * 2 * 32 * 4
    res = cli("plan", str(spec), "--gpu-memory", "1", "--set", "model.tensor_parallel=3", "--gpus", "3")
    assert res.returncode == 2 and "not divisible by tensor_parallel=3" in res.stderr


# --------------------------------------------------------------------------------------- bench

def test_bench_quick_through_the_cli() -> None:
    res = cli("bench", "--quick", "--skip-hf", "--prompts", "3", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["ok"] is True and report["tokens_per_s"] > 0 and report["workload"]["prompts"] == 3
    assert cli("bench", "--quick", "--prompts", "0").returncode == 2


# --------------------------------------------------------------------------------------- generate

SYSTEM = "Be brief."
# Values at which each one changes what the demo model samples from these prompts.
SAMPLED = dict(max_tokens=10, temperature=2.0, top_p=0.8, top_k=2, seed=5)


def _flags(**params: object) -> list[str]:
    return [x for k, v in params.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_generate_sampling_chat_and_json_flags_equal_the_engine(llm: LLM) -> None:
    """``--chat --system``, ``--temperature --top-p --top-k --seed``, ``--logprobs``, ``--json`` and
    ``--prompt-ids`` in one batch: exactly what the engine gives for the same request, and the
    same text again for the same seed."""
    texts, ids = ["1+5=", "reverse: cat dog =", "sort: 3 1 2 ="], [1, 5, 6, 7]
    argv = ["generate", "--model", str(DEMO_MODEL), "--dtype", "float32", "--device", "cpu", "--chat",
            "--system", SYSTEM, *(x for t in texts for x in ("--prompt", t)), "--prompt-ids", ",".join(map(str, ids)),
            "--logprobs", "--ignore-eos", "--json", *_flags(**SAMPLED)]
    first = cli(*argv)
    assert first.returncode == 0, first.stderr[-3000:]
    outs = [json.loads(line) for line in first.stdout.splitlines()]
    assert [o["prompt"] for o in outs] == [*texts, ids]

    tok = llm.tokenizer
    prompts = [tok.encode_chat_prompt(t, system=SYSTEM) for t in texts] + [ids]  # --chat leaves ids alone
    ref = llm.generate(prompts, SamplingParams(**SAMPLED, ignore_eos=True, logprobs=True))
    for o, r, p in zip(outs, ref, prompts):
        assert o["prompt_tokens"] == len(p)
        assert (o["token_ids"], o["text"], o["finish_reason"]) == (r.token_ids, r.text, r.finish_reason)
        assert o["completion_tokens"] == SAMPLED["max_tokens"]  # --ignore-eos: never stops early
        assert o["logprobs"] == pytest.approx(r.logprobs, abs=1e-5)

    # Each flag reached the sampler: without it (or with another seed) the draws differ.
    for field, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("seed", 6)):
        other = llm.generate(prompts, SamplingParams(**{**SAMPLED, field: default}, ignore_eos=True))
        assert [o.token_ids for o in other] != [r.token_ids for r in ref], field
    plain = llm.generate([tok.encode(t, bos=True) for t in texts], SamplingParams(**SAMPLED, ignore_eos=True))
    assert [o.token_ids for o in plain] != [r.token_ids for r in ref[:3]]  # --chat changed the prompts

    again = cli(*argv)
    assert again.returncode == 0 and again.stdout == first.stdout  # same seed, same text


def test_generate_stop_strings_stop_token_ids_and_plain_text_output(llm: LLM) -> None:
    prompts = ["sort: 3 1 2 =", "reverse: sun moon ="]
    free = llm.generate(prompts, SamplingParams(max_tokens=8))  # greedy, no stops
    assert len(free[0].text) > 2 and len(free[1].token_ids) > 2
    stop = free[0].text.strip()[1:3]  # a string only the first completion contains
    stop_id = free[1].token_ids[1]  # a token only the second one contains
    assert stop not in free[1].text and stop_id not in free[0].token_ids
    flags = ["generate", "--model", str(DEMO_MODEL), "--dtype", "float32", "--device", "cpu", "--max-tokens", "8"]
    res = cli(*flags, "--prompt", prompts[0], "--prompt", prompts[1], "--stop", stop, "--stop", "never-generated",
              "--stop-token-ids", f"{stop_id},{llm.tokenizer.vocab_size - 1}", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    by_string, by_token = [json.loads(line) for line in res.stdout.splitlines()]
    assert by_string["finish_reason"] == "stop" and by_string["text"] == free[0].text[:free[0].text.find(stop)]
    assert by_token["finish_reason"] == "stop" and by_token["token_ids"] == free[1].token_ids[:2]
    assert free[1].text.startswith(by_token["text"]) and len(by_token["text"]) < len(free[1].text)

    res = cli(*flags, "--prompt", prompts[0])
    assert res.returncode == 0 and res.stdout == free[0].text + "\n"
