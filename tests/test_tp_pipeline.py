"""Tensor-parallel replicas on a real local Ray: 2 gloo ranks per replica give TP=1's output.

The pipeline tests drive the queue with a small loop of their own (:func:`_drive`), doing what
the driver does for a replica: watch rank 0's run and the followers' loops, and on a failure
hand the replica's leases back and restart the whole replica.
"""

from __future__ import annotations

import json

import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from batchgen.checkpoint_save import save_hf
from batchgen.engine import LLM, SamplingParams
from batchgen.model import ModelArgs, Transformer
from reference import random_adapter, sharp_model
from batchgen.pipeline.driver import plan_job
from batchgen.pipeline.queue import create_queue
from batchgen.pipeline.replica import Task
from batchgen.pipeline.worker import ShardWorker, build_llm
from batchgen.pipeline.shards import Shard, plan_shards
from batchgen.pipeline.spec import JobSpec
from batchgen.pipeline.tp_replica import (
    TPReplicaError, TPReplicaGroup, generate_tensor_parallel, replicas_that_fit,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED_DIR / "tokenizers" / "llama" / "tokenizer.model"
TP_TIMEOUT_S = 20.0  # a dead rank is noticed at once (closed socket); this bounds a frozen one
RESULT_COLUMNS = ["id", "completion", "finish_reason", "prompt_tokens", "completion_tokens", "error"]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # 4 logical CPUs: room for two 2-rank replicas (one {"CPU": 1} bundle per rank).
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GQA model (2 KV heads: one per rank) with the real LLaMA tokenizer."""
    if not TOKENIZER.is_file():
        pytest.skip(f"the LLaMA tokenizer is not at {TOKENIZER} (shared test data, see its README)")
    model = sharp_model(vocab_size=32000)
    out = tmp_path_factory.mktemp("tp_model") / "model"
    save_hf(model.state_dict(), model.args, out)
    shutil.copy(TOKENIZER, out / "tokenizer.model")
    return out


def _job(tmp: Path, model_dir: Path, rows: int = 24, shard_rows: int = 6, max_tokens: int = 8,
         tp: int = 2, adapters: Optional[dict[str, Path]] = None, classify: Optional[dict] = None) -> JobSpec:
    """A job over one Parquet file of ``rows`` short text prompts (a fresh output dir); with
    ``adapters``, a ``client`` column spreads the rows over them and the base model."""
    inp = tmp / "in"
    inp.mkdir(parents=True, exist_ok=True)
    words = ["river", "castle", "robot", "winter", "garden", "dragon", "violin", "harbor"]
    prompts = [f"Once upon a time a {words[i % 8]} number {i} said" for i in range(rows)]
    cols: dict[str, list] = {"id": list(range(rows)), "prompt": prompts}
    model: dict[str, Any] = {"path": str(model_dir), "dtype": "float32", "tensor_parallel": tp, "max_num_seqs": 4}
    source: dict[str, Any] = {"path": str(inp), "id_column": "id", "prompt_column": "prompt"}
    if adapters:
        names = [None, *adapters]
        cols["client"] = [names[i % len(names)] for i in range(rows)]
        model["adapters"] = {k: str(v) for k, v in adapters.items()}
        source["adapter_column"] = "client"
    pq.write_table(pa.table(cols), inp / "part-0.parquet", row_group_size=shard_rows)
    spec = JobSpec.model_validate({
        "name": "tp-test",
        "model": model,
        "input": source,
        **({"classify": classify} if classify else {"sampling": {"max_tokens": max_tokens}}),
        "output": {"path": str(tmp / f"out-tp{tp}-{uuid.uuid4().hex[:6]}")},
        "execution": {"replicas": 1, "shard_rows": shard_rows, "heartbeat_s": 1, "lease_timeout_s": 60},
    })
    return spec.with_resolved_paths()


def _reference(spec: JobSpec, shards: list[Shard], columns: list[str] = RESULT_COLUMNS) -> list[dict]:
    """The rows a one-process (TP=1) engine writes for these shards, sorted by id."""
    one = JobSpec.model_validate({**spec.model_dump(mode="json"),
                                  "model": {**spec.model.model_dump(mode="json"), "tensor_parallel": 1}})
    worker = ShardWorker(one, build_llm(one, device="cpu"))
    rows = [r for s in shards for r in worker.process(s)[0].select(columns).to_pylist()]
    return sorted(rows, key=lambda r: r["id"])


def _written(spec: JobSpec, columns: list[str] = RESULT_COLUMNS) -> list[dict]:
    table = pq.ParquetDataset(Path(spec.output.path) / "shards").read()
    return sorted(table.select(columns).to_pylist(), key=lambda r: r["id"])


def _drive(group: TPReplicaGroup, queue: Any, timeout_s: float = 150.0,
           on_tick: Callable[[dict], None] = lambda stats: None) -> list[float]:
    """Run ``group`` until the queue is finished, restarting it whenever a rank fails, as the
    driver does. Before each restart, checks that every other rank of the broken incarnation
    fails on its own (none hangs); returns how long each of those waits took."""
    watch: dict[Any, bool] = {}  # pending ref -> is it rank 0's run

    def submit() -> None:
        watch[group.run()] = True
        watch.update(dict.fromkeys(group.alive_refs(), False))

    group.start(wait=False)
    submit()
    waits: list[float] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            stats = ray.get(queue.stats.remote())
            on_tick(stats)
            if stats["pending"] + stats["leased"] == 0 and not any(watch.values()):
                assert stats["dead"] == 0, ray.get(queue.dead_letters.remote())
                return waits
            ready, _ = ray.wait(list(watch), num_returns=1, timeout=0.5)
            if not ready:
                continue
            is_run = watch.pop(ready[0])
            try:
                ray.get(ready[0])
                if is_run:
                    continue  # rank 0 found the queue finished
                raise AssertionError("a follower stopped serving while rank 0 was alive")
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                print(f"{group.name}: a rank failed: {type(e).__name__}: {str(e)[:200]}")
            t0 = time.monotonic()
            survivors = list(watch)
            done, _ = ray.wait(survivors, num_returns=len(survivors), timeout=TP_TIMEOUT_S + 15)
            waits.append(time.monotonic() - t0)
            assert len(done) == len(survivors), "a rank of the broken replica hangs"
            # The whole replica goes; its leases go back to the queue now, not at their timeout.
            group.kill()
            ray.get(queue.release_replica.remote(group.name))
            watch.clear()
            group.start(wait=False)
            submit()
        raise AssertionError(f"the job did not finish within {timeout_s} s: {ray.get(queue.stats.remote())}")
    finally:
        group.kill()


def _run_tp_job(spec: JobSpec, on_tick: Callable[[TPReplicaGroup, dict], None] = lambda group, stats: None
                ) -> tuple[list[Shard], list[float], dict]:
    """Plan ``spec`` and run it on one TP replica; returns (shards, :func:`_drive`'s waits, the
    committed results)."""
    plan = plan_job(spec)
    name = f"tp-queue-{uuid.uuid4().hex[:8]}"
    queue = create_queue({s.shard_id: Task(s, s.shard_id) for s in plan.todo}, spec.execution.max_attempts,
                         spec.execution.lease_timeout_s, name=name)
    try:
        group = TPReplicaGroup(spec.model_dump(mode="json"), name, "replica-0", timeout_s=TP_TIMEOUT_S)
        waits = _drive(group, queue, on_tick=lambda stats: on_tick(group, stats))
        return plan.todo, waits, ray.get(queue.results.remote())
    finally:
        ray.kill(queue)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def test_tp2_job_writes_the_same_completions_as_tp1(local_ray, model_dir: Path, tmp_path: Path) -> None:
    spec = _job(tmp_path, model_dir)
    shards, waits, results = _run_tp_job(spec)
    assert waits == []  # no rank failed
    assert len(shards) == 4 and set(results) == {s.shard_id for s in shards}
    assert {r["replica"] for r in results.values()} == {"replica-0"}
    assert all(r["attempts"] == 1 for r in results.values())
    got = _written(spec)
    assert [r["id"] for r in got] == list(range(24))  # every row exactly once
    assert all(r["error"] is None and r["completion_tokens"] > 0 for r in got)
    assert got == _reference(spec, shards)


def test_run_job_with_tensor_parallel_2_writes_the_same_completions_as_tp1(local_ray, model_dir: Path,
                                                                          tmp_path: Path) -> None:
    """The user's command: the driver supervises the TP replica (start, run, its followers' refs)
    through the same interface as a one-process one."""
    from batchgen.pipeline.driver import run_job

    spec = _job(tmp_path, model_dir, rows=12)
    summary = run_job(spec, progress_every_s=60)
    assert (summary["rows"], summary["rows_error"], summary["shards_committed"]) == (12, 0, 2)
    got = _written(spec)
    assert [r["id"] for r in got] == list(range(12))
    assert got == _reference(spec, plan_shards(spec.input, spec.execution.shard_rows))


def test_run_job_with_tensor_parallel_2_and_adapters_writes_what_one_rank_writes(local_ray, model_dir: Path,
                                                                                tmp_path: Path) -> None:
    """Rows on two unmerged adapters and on the base, in a TP=2 job: each rank holds its slices of
    the adapters, and the rows equal a one-process engine's; the adapters change the answers."""
    from batchgen.checkpoint import load_args
    from batchgen.lora import save_adapter
    from batchgen.pipeline.driver import run_job

    args = load_args(model_dir)
    adapters = {"a": save_adapter(random_adapter(args, 8, ("wq", "wk", "wv", "wo", "w1", "w3", "w2"), 1), args,
                                  tmp_path / "a"),
                "b": save_adapter(random_adapter(args, 4, ("wq", "wv"), 2), args, tmp_path / "b")}
    spec = _job(tmp_path, model_dir, rows=12, adapters=adapters)
    summary = run_job(spec, progress_every_s=60)
    assert (summary["rows"], summary["rows_error"], summary["shards_committed"]) == (12, 0, 2)
    got = _written(spec)
    assert [r["id"] for r in got] == list(range(12))
    assert got == _reference(spec, plan_shards(spec.input, spec.execution.shard_rows))
    base = _job(tmp_path / "base", model_dir, rows=12, tp=1)
    plain = {r["id"]: r["completion"] for r in _reference(base, plan_shards(base.input, base.execution.shard_rows))}
    assert any(r["completion"] != plain[r["id"]] for r in got if r["id"] % 3)  # rows on an adapter
    assert all(r["completion"] == plain[r["id"]] for r in got if r["id"] % 3 == 0)  # base rows


def test_tp2_classify_job_scores_what_one_rank_scores(local_ray, model_dir: Path, tmp_path: Path) -> None:
    """Multi-token choices side by side after each prompt (one branched child per row) on two
    ranks: the branch positions and masks travel in the step broadcast."""
    from batchgen.pipeline.driver import run_job

    spec = _job(tmp_path, model_dir, rows=12, classify={"choices": ["river", "castle robot", "a dragon said so"]})
    summary = run_job(spec, progress_every_s=60)
    assert (summary["rows"], summary["rows_error"]) == (12, 0)
    cols = ["id", "label", "label_logprobs", "finish_reason", "error"]
    got = _written(spec, cols)
    want = _reference(spec, plan_shards(spec.input, spec.execution.shard_rows), cols)
    assert [r["id"] for r in got] == list(range(12))
    for g, w in zip(got, want):
        assert (g["label"], g["finish_reason"], g["error"]) == (w["label"], "stop", None)
        assert g["label_logprobs"] == pytest.approx(w["label_logprobs"], abs=1e-4)


def test_run_job_replaces_a_tp_replica_whose_follower_dies(local_ray, model_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the driver: a killed follower breaks its replica; every rank is replaced, the
    leases go back to the queue, and every row is still written once, as TP=1 writes it."""
    from batchgen.pipeline.driver import run_job
    from batchgen.pipeline.raynet import replica_name

    monkeypatch.setenv("BATCHGEN_FAULTS", json.dumps({"step_delay_s": 0.2}))
    spec = _job(tmp_path, model_dir, rows=12)
    killed: list[str] = []

    def kill_a_follower(stats: dict) -> None:
        if not killed and stats["leased"]:
            name = f"{replica_name(spec.name, 0)}-rank-1"
            ray.kill(ray.get_actor(name), no_restart=True)
            killed.append(name)

    summary = run_job(spec, progress_every_s=60, on_stats=kill_a_follower)
    assert killed and (summary["rows"], summary["rows_error"]) == (12, 0)
    got = _written(spec)
    assert [r["id"] for r in got] == list(range(12))
    assert got == _reference(spec, plan_shards(spec.input, spec.execution.shard_rows))
    attempts = pq.read_table(Path(spec.output.path) / "summary.parquet").column("attempts").to_pylist()
    assert max(attempts) == 2  # the shard the broken replica held ran again


def test_killed_ranks_mid_shard_restart_the_replica_without_loss(local_ray, model_dir: Path,
                                                                 tmp_path: Path) -> None:
    # First a follower dies (rank 0 must notice), then rank 0 of the new incarnation (the
    # follower must notice): each time mid-shard, each time the whole replica is replaced.
    spec = _job(tmp_path, model_dir, max_tokens=24)
    killed: list[list[int]] = []  # the pids of each broken incarnation, rank 0 first

    def kill_mid_shard(group: TPReplicaGroup, stats: dict) -> None:
        # Once as many shards are committed as ranks were killed, and the next one is leased.
        if len(killed) < 2 and group.starts == len(killed) + 1 and stats["done"] >= len(killed) + 1 \
                and stats["leased"]:
            pids = group.pids()
            killed.append(pids)
            os.kill(pids[1] if len(killed) == 1 else pids[0], signal.SIGKILL)

    shards, waits, results = _run_tp_job(spec, kill_mid_shard)
    print(f"other ranks failed on their own after {waits} s")
    assert len(killed) == 2 and len(waits) == 2, (killed, waits)
    # The other rank failed on its own, well within the collective timeout.
    assert max(waits) < TP_TIMEOUT_S + 5, waits
    # Each kill cost one attempt per shard in flight (a replica runs up to two side by side
    # here): they were handed back and done again.
    assert len(shards) + 2 <= sum(r["attempts"] for r in results.values()) <= len(shards) + 4
    got = _written(spec)
    assert [r["id"] for r in got] == list(range(24))
    assert got == _reference(spec, shards)
    for pid in (p for pids in killed for p in pids):
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), f"pid {pid} of a broken replica is still running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_replica_whose_model_cannot_be_split_fails_to_start_and_frees_its_cpus(
        local_ray, model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    args = ModelArgs(dim=48, n_layers=1, n_heads=3, vocab_size=32000, multiple_of=16, max_seq_len=64)
    bad = tmp_path / "three-heads"
    save_hf(Transformer(args).state_dict(), args, bad)
    shutil.copy(model_dir / "tokenizer.model", bad)
    spec = _job(tmp_path, bad)
    name = f"tp-queue-{uuid.uuid4().hex[:8]}"
    queue = create_queue({}, 1, 60, name=name)
    group = TPReplicaGroup(spec.model_dump(mode="json"), name, "replica-0", timeout_s=TP_TIMEOUT_S)
    try:
        with pytest.raises(TPReplicaError, match="n_heads=3 is not divisible by tensor-parallel world_size=2"):
            group.start(wait=True, timeout_s=60)
    finally:
        ray.kill(queue)
    deadline = time.monotonic() + 15  # the placement group's 2 CPUs come back
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 4


# ---------------------------------------------------------------------------------------------
# One-off generation
# ---------------------------------------------------------------------------------------------


def _prompts() -> list:
    return ["The quick brown fox", "In a hole in the ground there lived", [1, 450, 4996, 17354], "Hello"]


def _params() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=10, ignore_eos=True),
            SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=5, logprobs=True),
            SamplingParams(max_tokens=12, ignore_eos=True),
            SamplingParams(max_tokens=3, stop=["the"])]


def _as_rows(outs: list) -> list[tuple]:
    return [(o.token_ids, o.text, o.finish_reason, o.error) for o in outs]


def test_generate_tensor_parallel_equals_one_rank(local_ray, model_dir: Path) -> None:
    outs = generate_tensor_parallel(str(model_dir), _prompts(), _params(), n=2, dtype="float32", device="cpu",
                                    max_num_seqs=3)
    expected = LLM(model_dir, dtype="float32", device="cpu", max_num_seqs=3).generate(_prompts(), _params())
    assert _as_rows(outs) == _as_rows(expected)
    assert outs[1].logprobs == pytest.approx(expected[1].logprobs, abs=1e-4)


def test_placement_that_cannot_fit_fails_clearly(local_ray, model_dir: Path) -> None:
    assert replicas_that_fit(2, use_gpu=False) == 2  # 4 CPUs, one node
    with pytest.raises(TPReplicaError, match="8 ranks need 8 CPUs on one node"):
        generate_tensor_parallel(str(model_dir), ["x"], SamplingParams(max_tokens=1), n=8, device="cpu",
                                 placement_timeout_s=1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for a 2-rank NCCL replica")
def test_generate_tensor_parallel_nccl_equals_one_gpu(local_ray, model_dir: Path) -> None:
    outs = generate_tensor_parallel(str(model_dir), _prompts(), _params(), n=2, dtype="float32", device="cuda",
                                    max_num_seqs=3)
    expected = LLM(model_dir, dtype="float32", device="cuda:0", max_num_seqs=3).generate(_prompts(), _params())
    assert _as_rows(outs) == _as_rows(expected)
