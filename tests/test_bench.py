"""``batchgen bench`` (quick mode) and the engine paths its speed relies on.

No timing is asserted anywhere: timings are never pass/fail. What is checked is that the bench
runs end to end, reports every field, that batchgen and transformers agree token for token,
that a real divergence fails the check, and that the engine's fast paths (mixed prefill + decode
steps, padded batched prefill, in-place paged decode attention, block compaction, fused
projections) give the tokens of the cache-free reference.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from batchgen.bench import (QUICK_ARGS, Workload, compare_tokens, linear_flops_per_token, main,
                            min_traffic_bytes, request_flops)
from batchgen.bench.core import print_report as _print_report
from batchgen.bench.gpu import single_stream_decode
from batchgen import ops
from batchgen.checkpoint_save import save_hf
from batchgen.model import Transformer
from reference import reference_greedy, sharp_model

REPO = Path(__file__).resolve().parents[1]

FIELDS = {"tokens_per_s", "hf_tokens_per_s", "speedup_vs_hf", "peak_gflops", "achieved_gflops",
          "roofline_fraction", "memory_gbps", "min_memory_gb", "memory_roofline_fraction", "peak_rss_mib",
          "kv_cache_bytes", "device", "torch_threads", "tokens_match_fraction", "divergences", "ok"}


def test_quick_bench_reports_every_field_and_tokens_match(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers", reason="the baseline is transformers' generate")
    rc = main(["--quick", "--json", "--prompts", "6", "--hf-batch", "4", "--seed", "1"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report
    assert FIELDS <= report.keys()
    for key in ("tokens_per_s", "hf_tokens_per_s", "speedup_vs_hf", "peak_gflops", "achieved_gflops",
                "roofline_fraction", "memory_gbps", "min_memory_gb", "memory_roofline_fraction", "peak_rss_mib",
                "kv_cache_bytes"):
        assert isinstance(report[key], float | int) and report[key] > 0, key
    assert report["device"] == "cpu" and report["torch_threads"] >= 1
    assert report["hf_attn_implementation"] == "sdpa"
    assert report["workload"]["prompts"] == 6 and report["workload"]["hf_batch"] == 4
    assert report["tokens_match_fraction"] == 1.0 and report["divergences"] == [] and report["ok"] is True
    # The useful FLOPs are a property of the workload, not of the run.
    assert report["achieved_gflops"] == pytest.approx(report["useful_gflop"] / report["batchgen_seconds"][0])


def test_cpu_matmul_switch_is_reported_and_put_back(capsys: pytest.CaptureFixture[str]) -> None:
    before = ops.current_cpu_matmul()
    assert main(["--quick", "--json", "--skip-hf", "--prompts", "3", "--cpu-matmul", "blas"]) == 0
    assert json.loads(capsys.readouterr().out)["cpu_matmul"] == "blas"
    assert ops.current_cpu_matmul() == before
    if ops.onednn_linear_available():
        assert main(["--quick", "--json", "--skip-hf", "--prompts", "3"]) == 0
        assert json.loads(capsys.readouterr().out)["cpu_matmul"] == "onednn"


def test_bf16_bench_checks_tokens_with_the_bf16_tie_tolerance(capsys: pytest.CaptureFixture[str]) -> None:
    """--dtype bfloat16 runs the GPU's precision on the CPU: both systems in bf16, ties up to 5e-2."""
    pytest.importorskip("transformers", reason="the baseline is transformers' generate")
    rc = main(["--quick", "--json", "--prompts", "6", "--hf-batch", "4", "--dtype", "bfloat16"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report
    assert report["dtype"] == "bfloat16" and report["tie_tolerance"] == 0.05 and report["ok"] is True
    assert report["tokens_match_fraction"] > 0.5  # bf16 rounding gives near-ties, not chaos


def test_single_stream_decode_reports_its_bandwidth_bound() -> None:
    """What --gpu-extras measures on a 7B shape, here on a tiny one on the CPU."""
    r = single_stream_decode(torch.device("cpu"), torch.float32, 0, QUICK_ARGS, steps=8)
    assert r["weight_bytes"] == 4 * sum(p.numel() for p in Transformer(QUICK_ARGS).parameters())
    assert r["decode_tokens_per_s"] > 0 and r["copy_gbps"] > 0
    assert r["bandwidth_bound_tokens_per_s"] == pytest.approx(r["copy_gbps"] * 1e9 / r["weight_bytes"])
    assert r["fraction_of_bound"] == pytest.approx(r["decode_tokens_per_s"] / r["bandwidth_bound_tokens_per_s"])
    assert r["cuda_graphs_decode_tokens_per_s"] is None and r["compiled_decode_tokens_per_s"] is None  # CUDA only


def test_module_entry_point_without_hf() -> None:
    out = subprocess.run([sys.executable, "-m", "batchgen.bench", "--quick", "--json", "--skip-hf", "--prompts", "3"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["tokens_per_s"] > 0 and report["hf_tokens_per_s"] is None and report["speedup_vs_hf"] is None
    assert report["tokens_match_fraction"] is None and report["ok"] is True
    assert ("gpu_extras" in report) == torch.cuda.is_available()  # single-stream decode: CUDA only


def test_text_report_says_why_single_stream_was_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    """A GPU without room for the 7B gets its batch numbers and a reason instead of a crash."""
    assert main(["--quick", "--json", "--skip-hf", "--prompts", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    report["gpu_extras"] = {"skipped": "the single-stream run needs 19.6 GiB of GPU memory, 7.5 GiB is free"}
    _print_report(report, as_json=False)
    out = capsys.readouterr().out
    assert "batchgen" in out and "single-stream decode skipped: the single-stream run needs 19.6 GiB" in out


def test_pipeline_mode_runs_real_jobs_with_the_engines_tokens() -> None:
    """--pipeline: the workload as Parquet through run_job on a local Ray, 1 and 2 replicas,
    in two rounds (the bare engine, then a fresh Ray for the jobs)."""
    before = set(Path(tempfile.gettempdir()).glob("batchgen-bench-pipeline-*"))
    out = subprocess.run([sys.executable, "-m", "batchgen.bench", "--quick", "--json", "--skip-hf", "--pipeline",
                          "--prompts", "30", "--shard-rows", "10", "--repeat", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["ok"] is True and report["workload"]["prompts"] == 30
    assert [p["replicas"] for p in report["pipeline"]] == [1, 2]
    for p in report["pipeline"]:
        assert p["shards"] == 3 and p["tokens_match_fraction"] == 1.0 and p["divergences"] == []
        # Each round: the bare engine once, Ray started afresh, each job once.
        assert len(p["seconds"]) == len(p["engine_seconds"]) == len(p["startup_seconds"]) == 2
        assert len(p["ray_start_seconds"]) == 2 and min(p["ray_start_seconds"]) > 0
        assert p["engine_seconds"] == report["batchgen_seconds"] and p["tokens_per_s"] > 0
        # The first shard starts inside the job, after its start-up.
        assert all(0 < up < job for up, job in zip(p["startup_seconds"], p["seconds"]))
        assert 1 <= len(p["replica_busy_seconds"]) <= p["replicas"]
    assert set(Path(tempfile.gettempdir()).glob("batchgen-bench-pipeline-*")) <= before, "job files are removed"


def test_word_tokenizer_round_trips_every_prompt_id(tmp_path: Path) -> None:
    from batchgen.bench import make_workload
    from batchgen.bench.pipeline import ANCHOR_ID, pipeline_workload, prompt_text, word_tokenizer
    from batchgen.tokenizer import IncrementalDecoder, Tokenizer

    (tmp_path / "tokenizer.model").write_bytes(word_tokenizer(32000))
    tok = Tokenizer(tmp_path / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    wl = pipeline_workload(make_workload(200, 32000, 0, (8, 128), (8, 128)))
    for p in wl.prompts:
        assert p[0] == 1 and ANCHOR_ID not in p
        assert tok.encode(prompt_text(p), bos=True) == p
    # Any generated ids (control tokens, the anchor included) stream to the text of a plain decode.
    ids = [5, 3, 31999, 2, 0, 4, 3, 3, 17]
    dec = IncrementalDecoder(tok)
    streamed = "".join(dec.add(t) for t in ids) + dec.finish()
    assert streamed == dec.text == tok.decode(ids)


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "0"], "--prompts must be >= 1"),
    (["--hf-batch", "0"], "--hf-batch must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--device", "meta"], "only cpu and cuda"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--shard-rows", "0"], "--shard-rows must be >= 1"),
    (["--pipeline", "--replicas", "1,0"], "--replicas must be a comma-separated list"),
    (["--pipeline", "--replicas", "two"], "--replicas must be a comma-separated list"),
])
def test_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_options_need_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--gpu-extras"]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert main(["--quick", "--compile-decode"]) == 2
    assert "--compile-decode needs a CUDA device" in capsys.readouterr().err
    assert main(["--quick", "--device", "cuda"]) == 2


def test_divergence_check_tells_near_ties_from_bugs() -> None:
    model = sharp_model()
    prompt = [5, 17, 42, 9]
    good = reference_greedy(model, prompt, 6)
    with torch.inference_mode():
        logits = model.logits_full(torch.tensor([prompt + good[:2]]))[0, -1]
    worst = int(logits.argmin())
    bad = good[:2] + [worst] + good[3:]
    wl = Workload([prompt], [6])
    same = compare_tokens(model, None, wl, [good], [good], tol=1e-3)
    assert same["ok"] and same["tokens_match_fraction"] == 1.0 and same["divergences"] == []
    wrong = compare_tokens(model, None, wl, [good], [bad], tol=1e-3)
    assert not wrong["ok"] and wrong["tokens_match_fraction"] == pytest.approx(2 / 6)
    (d,) = wrong["divergences"]
    assert (d["position"], d["batchgen_token"], d["hf_token"], d["tie"]) == (2, good[2], worst, False)
    assert d["logit_gap"] == pytest.approx(float(logits[good[2]] - logits[worst]), rel=1e-4)
    # The same gap under a tolerance that covers it is a tie.
    assert compare_tokens(model, None, wl, [good], [bad], tol=d["logit_gap"] * 2)["ok"]
    with pytest.raises(RuntimeError, match="asked for 6 tokens"):
        compare_tokens(model, None, wl, [good[:5]], [good], tol=1e-3)


def test_flop_count_matches_the_model() -> None:
    model = Transformer(QUICK_ARGS)
    linear = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert linear_flops_per_token(QUICK_ARGS) == 2 * linear
    a = QUICK_ARGS
    p, n = 7, 5
    by_token = sum(2 * linear + 4 * a.n_layers * a.dim * (i + 1) for i in range(p + n - 1))
    assert request_flops(a, p, n) == by_token + n * 2 * a.dim * a.vocab_size
    # Bytes: all weights but the embedding once per step (n steps), and each generated token but
    # the last reads the K and V of positions 0..p+j-1.
    weights = 4 * sum(t.numel() for name, t in model.state_dict().items() if not name.startswith("tok_emb")
                      and not name.endswith("norm.weight"))
    kv_token = 4 * 2 * a.n_layers * a.n_kv_heads * a.head_dim
    assert min_traffic_bytes(a, Workload([[1] * p], [n]), 4) == n * weights + sum(p + j for j in range(1, n)) * kv_token


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_bench_of_a_real_checkpoint(layout: str, shared_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--model``: the trained stories260K (GQA) in either layout, against transformers on its weights."""
    pytest.importorskip("transformers", reason="the baseline is transformers' generate")
    path = shared_dir / "models" / f"stories260K-{layout}"
    assert main(["--model", str(path), "--json", "--prompts", "6", "--hf-batch", "3", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["tokens_match_fraction"] > 0.9, report["divergences"]
    assert report["model"]["path"] == str(path)
    assert (report["model"]["dim"], report["model"]["n_kv_heads"], report["model"]["vocab_size"]) == (64, 4, 512)


def test_bench_model_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path / "nope"), "--json"]) == 2
    assert f"error: --model: {tmp_path / 'nope'}: not a directory" in capsys.readouterr().err
    short = tmp_path / "short"  # max_seq_len 128, and the full workload's requests reach 256 tokens
    save_hf(Transformer(QUICK_ARGS).state_dict(), QUICK_ARGS, short)
    assert main(["--model", str(short), "--json"]) == 2
    assert "past the model's max_seq_len 128" in capsys.readouterr().err
