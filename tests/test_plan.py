"""``batchgen plan``: memory arithmetic checked against the model itself, refusals, the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from batchgen.checkpoint_save import save_hf
from batchgen.model import ModelArgs, Transformer, count_parameters
from batchgen.plan import GB, PlanError, add_plan_args, format_plan, params_per_rank, plan_layout, run_plan

BASE_PRESETS = ["llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama-2-7b", "llama-2-13b", "llama-2-70b"]


def _rank_params(args: ModelArgs, n: int) -> int:
    """Parameters of rank 0's slice as model.py builds it (on the meta device: no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(args, world_size=n, rank=0).parameters())


def _valid_splits(args: ModelArgs) -> list[int]:
    return [n for n in (1, 2, 4, 8, 16) if args.n_heads % n == 0 and args.hidden_dim % n == 0
            and (args.n_kv_heads % n == 0 or n % args.n_kv_heads == 0)]


@pytest.mark.parametrize("preset", BASE_PRESETS)
def test_weights_per_gpu_match_the_model_slices(preset: str) -> None:
    args = ModelArgs.from_preset(preset)
    assert params_per_rank(args, 1)[0] == count_parameters(args)
    for n in _valid_splits(args):
        assert params_per_rank(args, n)[0] == _rank_params(args, n), f"{preset} tensor_parallel={n}"


@pytest.mark.parametrize("preset", BASE_PRESETS)
def test_presets_fit_where_they_should(preset: str) -> None:
    args = ModelArgs.from_preset(preset)
    n = max(n for n in _valid_splits(args) if n <= 8)
    plan = plan_layout(args, "bfloat16", tensor_parallel=n, gpus=8, gpu_memory_gb=80)
    assert plan.weights_bytes_per_gpu == plan.params_per_gpu * 2
    assert plan.params_total == count_parameters(args)
    assert plan.max_batch >= 1
    assert plan.kv_tokens >= plan.max_batch * plan.max_seq_len


def test_llama2_70b_bf16_on_8x80gb() -> None:
    args = ModelArgs.from_preset("llama-2-70b")
    plan = plan_layout(args, "bfloat16", tensor_parallel=8, gpus=8, gpu_memory_gb=80)
    total = count_parameters(args)
    assert total == pytest.approx(68.98e9, rel=1e-3)
    whole = 2 * args.vocab_size * args.dim  # embeddings + output head, on every GPU
    assert plan.weights_bytes_per_gpu == pytest.approx((total - whole) / 8 * 2 + whole * 2, rel=1e-3)
    # Exactly: the RMSNorm weights (2 per layer + the final one) are whole on every GPU too.
    norms = (2 * 80 + 1) * 8192
    assert plan.weights_bytes_per_gpu == (total - whole - norms) // 8 * 2 + (whole + norms) * 2
    assert plan.weights_bytes_per_gpu / GB == pytest.approx(18.16, abs=0.01)
    # GQA: 8 KV heads on 8 ranks -> 1 head each: 2 (K,V) x 80 layers x 1 x 128 x 2 bytes.
    assert (plan.kv_heads_per_gpu, plan.kv_replicated) == (1, False)
    assert plan.kv_bytes_per_token == 2 * 80 * 1 * 128 * 2 == 40960
    budget = int((80 * GB - plan.weights_bytes_per_gpu) * 0.9)
    assert plan.kv_budget_bytes == budget
    assert plan.kv_tokens == budget // (40960 * 16) * 16
    assert plan.max_batch == plan.kv_tokens // 4096
    assert (plan.replicas, plan.total_batch) == (1, plan.max_batch)


def test_kv_heads_are_replicated_when_ranks_outnumber_them() -> None:
    args = ModelArgs.from_preset("llama-2-70b")
    plan = plan_layout(args, "bfloat16", tensor_parallel=16, gpus=16, gpu_memory_gb=80)
    assert (plan.kv_heads_per_gpu, plan.kv_replicated) == (1, True)
    assert plan.kv_bytes_per_token == 40960  # the same as with 8 ranks: one (copied) head each
    assert "replicated on 2 ranks" in format_plan(plan)
    assert plan.params_per_gpu == _rank_params(args, 16)


def test_65b_does_not_fit_one_80gb_gpu() -> None:
    with pytest.raises(PlanError, match=r"weights need 130\.6 GB per GPU, more than the 80 GB") as e:
        plan_layout(ModelArgs.from_preset("llama-65b"), "bfloat16", tensor_parallel=1, gpus=1,
                    gpu_memory_gb=80, label="llama-65b")
    assert "smallest tensor_parallel that fits is 2" in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"tensor_parallel": 8, "gpus": 8}, r"n_heads=52 is not divisible by tensor_parallel=8; valid tensor_parallel values: 1, 2, 4"),
    ({"tensor_parallel": 4, "gpus": 2}, r"tensor_parallel=4 needs 4 GPUs per replica, but only 2"),
    ({"tensor_parallel": 4, "gpus": 4, "max_seq_len": 10**7}, r"less than one sequence of max_seq_len=10000000"),
    ({"tensor_parallel": 4, "gpus": 4, "kv_cache_bytes": 100 * GB}, r"KV cache of 100\.0 GB per GPU does not fit"),
    ({"tensor_parallel": 4, "gpus": 4, "dtype": "int4"}, r"dtype 'int4' is not supported"),
    ({"tensor_parallel": 4, "gpus": 4, "kv_fraction": 0}, r"kv_fraction must be in \(0, 1\]"),
])
def test_impossible_layouts_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan_layout(ModelArgs.from_preset("llama-33b"), **{"gpu_memory_gb": 80, **kwargs})


def test_auto_tensor_parallel_takes_the_smallest_that_fits() -> None:
    args = ModelArgs.from_preset("llama-65b")
    plan = plan_layout(args, "bfloat16", tensor_parallel=None, gpus=8, gpu_memory_gb=80)
    assert (plan.tensor_parallel, plan.replicas) == (2, 4)
    assert plan_layout(args, "float32", tensor_parallel=None, gpus=8, gpu_memory_gb=80).tensor_parallel == 4


def test_dtypes_scale_weights_and_kv() -> None:
    args = ModelArgs.from_preset("llama-2-7b")
    bf16 = plan_layout(args, "auto", tensor_parallel=1, gpu_memory_gb=80)
    fp32 = plan_layout(args, torch.float32, tensor_parallel=1, gpu_memory_gb=80)
    assert bf16.dtype == "bfloat16"
    assert fp32.weights_bytes_per_gpu == 2 * bf16.weights_bytes_per_gpu
    assert fp32.kv_bytes_per_token == 2 * bf16.kv_bytes_per_token == 2 * 2 * 32 * 32 * 128 * 2


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="batchgen plan")
    add_plan_args(parser)
    return run_plan(parser.parse_args(list(argv)))


def test_cli_preset(capsys: pytest.CaptureFixture) -> None:
    assert _cli("--preset", "llama-65b", "--gpus", "8", "--gpu-memory", "80", "--tensor-parallel", "8") == 0
    out = capsys.readouterr().out
    assert "1 replica(s) of tensor_parallel=8" in out and "17.24 GB" in out
    assert _cli("--preset", "llama-65b", "--gpus", "1", "--gpu-memory", "80") == 2
    assert "weights need 130.6 GB per GPU" in capsys.readouterr().err
    assert _cli("--preset", "llama-99b", "--gpu-memory", "80") == 2
    assert "unknown preset 'llama-99b'" in capsys.readouterr().err
    assert _cli("--gpu-memory", "80") == 2  # no model at all


def test_cli_reads_model_dtype_and_tp_from_a_job_spec(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, max_seq_len=256)
    torch.manual_seed(0)
    save_hf(Transformer(args).state_dict(), args, tmp_path / "model")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "model: {path: model, dtype: float32, tensor_parallel: 2}\n"
        f"input: {{path: {tmp_path}/in.parquet, id_column: id, prompt_column: text}}\n"
        f"output: {{path: {tmp_path}/out}}\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)  # the spec's relative model path is resolved against the CWD
        assert _cli(str(spec), "--gpu-memory", "1", "--json") == 0
        plan = json.loads(capsys.readouterr().out)
        assert (plan["dtype"], plan["tensor_parallel"], plan["max_seq_len"]) == ("float32", 2, 256)
        assert plan["kv_bytes_per_token"] == 2 * 2 * 1 * 16 * 4  # 1 of 2 KV heads per rank, fp32
        # The command line wins over the spec (and 4 heads do not split 3 ways).
        assert _cli(str(spec), "--gpu-memory", "1", "--tensor-parallel", "3", "--gpus", "3") == 2
        assert "n_heads=4 is not divisible by tensor_parallel=3" in capsys.readouterr().err
        assert _cli(str(spec), "--gpu-memory", "1", "--set", "model.path=missing") == 2
        assert "missing" in capsys.readouterr().err
