"""The engine on a GPU: the same tokens as on the CPU (fp32), and bf16 against transformers.

Skipped where CUDA is absent, which includes CI: these run on a lent GPU machine (see the
runbook in bench/NOTES.md). ``BATCHGEN_TEST_DEVICE=cpu`` runs them on the CPU, which checks
the tests themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from batchgen.bench import Workload, compare_tokens
from batchgen.bench import main as bench_main
from batchgen.engine import LLM, SamplingParams
from reference import reference_logits, sharp_model, stand_in_graphs

DEVICE = os.environ.get("BATCHGEN_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (BATCHGEN_TEST_DEVICE=cpu runs these on the CPU)")]

# Mixed lengths, so one step holds prefills and decodes and the paged tables have padding.
PROMPTS = [[1], [1, 461, 401], [1] + list(range(300, 340)), [1, 5, 7, 9, 11, 13], [1, 378, 455, 473]]


def device_llm(graphs: bool, *args, compile_decode: bool = False, **kwargs) -> LLM:
    """An engine on DEVICE; with ``graphs``, decode steps replay from CUDA graphs (on the CPU from
    the stand-in that keeps a graph's contract, see tests/test_graphs.py), compiled with
    ``compile_decode``."""
    if DEVICE == "cuda":
        return LLM(*args, device=DEVICE, cuda_graphs=graphs, compile_decode=compile_decode, **kwargs)
    llm = LLM(*args, device=DEVICE, **kwargs)
    if graphs:
        stand_in_graphs(llm, compile_decode=compile_decode, flex=llm.runner.flex)
    return llm


@pytest.mark.parametrize("layout, graphs", [("hf", False), ("meta", False), ("hf", True)])
def test_fp32_engine_on_the_device_gives_the_cpu_engines_tokens(shared_dir: Path, layout: str, graphs: bool) -> None:
    """The trained GQA checkpoint: every request's greedy tokens as on the CPU, up to near-ties,
    also when decode steps replay from CUDA graphs."""
    path = shared_dir / "models" / f"stories260K-{layout}"
    wl = Workload(PROMPTS, [40, 25, 60, 33, 48])
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in wl.max_tokens]
    cpu = LLM(path, dtype="float32", device="cpu", max_num_seqs=4)
    dev = device_llm(graphs, path, dtype="float32", max_num_seqs=4)
    want = [o.token_ids for o in cpu.generate(PROMPTS, params)]
    got = [o.token_ids for o in dev.generate(PROMPTS, params)]
    # The bench's rule: at a first divergence the two tokens' fp32 logits are within 1e-3.
    check = compare_tokens(cpu.model, None, wl, got, want, 1e-3)
    assert check["ok"], check["divergences"]
    assert bool(graphs) == bool(dev.runner.graphs and dev.runner.graphs.graphs)  # graphs were recorded


@pytest.mark.parametrize("graphs, compiled", [(False, False), (True, False), (True, True)])
def test_bf16_engine_on_the_device_picks_the_top_token_at_every_step(graphs: bool, compiled: bool) -> None:
    """bf16 end to end (weights, KV cache, activations): at every step of every request the
    chosen token is the fp32 reference's top one, up to bf16 rounding. A broken cache or mask
    misses by whole units of logit, rounding by hundredths."""
    prompts = [[1], [1, 5, 7, 9], [1] + list(range(100, 140)), [1, 17, 42, 9, 200, 33], [1, 250, 251]]
    llm = device_llm(graphs, model=sharp_model().to(device=DEVICE, dtype=torch.bfloat16), max_num_seqs=3,
                     compile_decode=compiled)
    assert llm.kv_cache.dtype == torch.bfloat16
    assert llm.kv_cache.device.type == torch.device(DEVICE).type
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    reference = sharp_model()  # fp32 on the CPU: the same weights before the cast
    for prompt, out in zip(prompts, outs):
        assert len(out.token_ids) == 20
        for t, token in enumerate(out.token_ids):
            with torch.inference_mode():
                logits = reference_logits(reference, prompt + out.token_ids[:t])[-1]
            assert float(logits.max() - logits[token]) <= 0.25, (prompt, t, token)


def test_bf16_bench_against_transformers_on_the_device(capsys: pytest.CaptureFixture[str]) -> None:
    """The bench's own check (every first divergence a near-tie within 5e-2) on the device."""
    pytest.importorskip("transformers", reason="the baseline is transformers' generate")
    rc = bench_main(["--quick", "--json", "--device", DEVICE, "--dtype", "bfloat16", "--prompts", "12",
                     "--hf-batch", "4"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"] is True, report["divergences"]
    assert report["dtype"] == "bfloat16" and report["device"].startswith(DEVICE)
    if DEVICE.startswith("cuda"):  # single-stream decode comes by default on CUDA (here the --quick shape)
        assert report["gpu_extras"]["cuda_graphs_decode_tokens_per_s"] > 0, report["gpu_extras"]
        assert report["peak_gpu_mib"] > report["kv_cache_bytes"] / 2**20
    else:
        assert "gpu_extras" not in report and report["peak_gpu_mib"] is None


@pytest.mark.parametrize("graphs", [False, True])
def test_flex_backend_on_the_device_gives_the_cpu_engines_tokens(shared_dir: Path, graphs: bool) -> None:
    """``attention_backend="flex"`` (engine/flex.py), fp32, eager and replayed (reading the pool
    in place inside the graphs): the CPU default engine's tokens, up to near-ties."""
    path = shared_dir / "models" / "stories260K-hf"
    wl = Workload(PROMPTS, [40, 25, 60, 33, 48])
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in wl.max_tokens]
    cpu = LLM(path, dtype="float32", device="cpu", max_num_seqs=4)
    dev = device_llm(graphs, path, dtype="float32", max_num_seqs=4, attention_backend="flex")
    want = [o.token_ids for o in cpu.generate(PROMPTS, params)]
    got = [o.token_ids for o in dev.generate(PROMPTS, params)]
    check = compare_tokens(cpu.model, None, wl, got, want, 1e-3)
    assert check["ok"], check["divergences"]
    assert bool(graphs) == bool(dev.runner.graphs and dev.runner.graphs.graphs)


def test_bf16_flex_backend_replayed_picks_the_top_token_at_every_step() -> None:
    """bf16, flex, replayed: at every step the fp32 reference's top token, up to bf16 rounding."""
    prompts = [[1], [1, 5, 7, 9], [1] + list(range(100, 140)), [1, 17, 42, 9, 200, 33], [1, 250, 251]]
    llm = device_llm(True, model=sharp_model().to(device=DEVICE, dtype=torch.bfloat16), max_num_seqs=3,
                     attention_backend="flex")
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    reference = sharp_model()
    for prompt, out in zip(prompts, outs):
        for t, token in enumerate(out.token_ids):
            with torch.inference_mode():
                logits = reference_logits(reference, prompt + out.token_ids[:t])[-1]
            assert float(logits.max() - logits[token]) <= 0.25, (prompt, t, token)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_classification_on_the_device_scores_as_on_the_cpu(model_dir: Path, dtype: str) -> None:
    """Classification rows (multi-token choices as branches in each row's own prefill, per-row
    choices) beside generation rows, with decode steps replayed: fp32 scores equal the CPU
    engine's within 1e-4; bf16 ones within bf16's rounding, with the same label wherever the CPU's
    best choice leads by more than that."""
    import random

    from batchgen.demo import task

    rng = random.Random(11)
    prompts = [task.random_prompt(rng) for _ in range(12)]
    params = []
    for i, p in enumerate(prompts):
        ans = task.answer(p)
        params.append(SamplingParams(max_tokens=12, ignore_eos=True) if i % 4 == 3 else
                      SamplingParams(choices=[ans, " ".join(reversed(ans.split())) + " 1", "sun cat", "7"]))
    cpu = LLM(model_dir, dtype="float32", device="cpu", max_num_seqs=8)
    dev = device_llm(True, model_dir, dtype=dtype, max_num_seqs=8)
    want, got = cpu.generate(prompts, params), dev.generate(prompts, params)
    tol = 1e-4 if dtype == "float32" else 0.25
    for w, g in zip(want, got):
        assert g.finish_reason == w.finish_reason and g.error is None
        if w.label_logprobs is None:
            continue
        assert g.label_logprobs == pytest.approx(w.label_logprobs, abs=tol)
        runner_up = sorted(w.label_logprobs)[-2]
        if max(w.label_logprobs) - runner_up > 2 * tol:
            assert g.label == w.label
