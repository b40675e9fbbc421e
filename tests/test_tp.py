"""Tensor parallelism: two ranks (gloo on CPU) give exactly the tokens of one, and failures surface.

Every rank is a spawned process; the reference (one rank, plain ``LLM``) runs in the test process.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from batchgen.checkpoint_save import save_hf, save_meta
from batchgen.engine import LLM, SamplingParams
from batchgen.engine.tp import TPError, TPLeaderLLM, destroy_tp_group, follower_loop, init_tp_group
from batchgen.model import ModelArgs, Transformer
from reference import sharp_model

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
DEMO_DIR = Path(__file__).resolve().parents[1] / "batchgen" / "demo"
# Greedy continuation of [BOS] by stories260K, checked against llama2.c and transformers.
STORIES_FIRST_TEN = [461, 461, 401, 401, 401, 461, 378, 455, 473, 456]
SETUP_TIMEOUT_S = 120.0  # process start and model loading on a busy 2-core machine

_ctx = multiprocessing.get_context("spawn")


# ---------------------------------------------------------------------------------------------
# Helpers (module level: spawned processes import them)
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    """A free loopback port outside 10002-19999 (kept for other services)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def _random_state_dict(n_kv_heads: int, seed: int) -> tuple[dict, ModelArgs]:
    model = sharp_model(n_kv_heads=n_kv_heads, seed=seed)
    return model.state_dict(), model.args


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    lengths = [1, 17, 5, 30, 2, 9, 23]
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


_MAX_TOKENS = [12, 3, 20, 7, 1, 15, 9]


def _greedy() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=m, ignore_eos=True) for m in _MAX_TOKENS]


def _sampled() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=m, temperature=0.9, top_p=0.9, seed=100 + i, ignore_eos=True, logprobs=True)
            for i, m in enumerate(_MAX_TOKENS)]


# max_num_seqs < number of prompts: finished rows are refilled from the queue.
_ENGINE = {"max_num_seqs": 3}


def _prefix_prompts() -> list[list[int]]:
    """_prompts() behind a common 21-token prefix (2 full blocks of 8 and 5 tokens)."""
    prefix = torch.randint(3, 300, (21,), generator=torch.Generator().manual_seed(5)).tolist()
    return [prefix + p for p in _prompts()]


# Small blocks and a cache of 12: rows share the prefix and some get preempted.
_PREFIX_ENGINE = {"max_num_seqs": 4, "block_size": 8, "kv_cache_bytes": 12 * 8 * 2 * 2 * 1 * 16 * 4}


def _crowded_rows() -> tuple[list[str], list[SamplingParams]]:
    """The demo task's prompts on the base model and on its ``desc`` adapter: free and
    regex-constrained generation, and classification with single- and multi-token choices."""
    import random

    from batchgen.demo import task

    rng = random.Random(3)
    prompts = [task.random_prompt(rng) for _ in range(18)]
    params = []
    for i, p in enumerate(prompts):
        adapter = "desc" if i % 2 else None
        if i % 3 == 0:  # long enough to outgrow the small cache
            params.append(SamplingParams(max_tokens=24, ignore_eos=True, adapter=adapter))
        elif i % 5 == 0:
            params.append(SamplingParams(max_tokens=8, constraint=("regex", r"\d \d( \d)*"), adapter=adapter))
        else:
            ans = task.answer(p)
            params.append(SamplingParams(choices=[ans, " ".join(reversed(ans.split())), "sun cat frog dog", "5"],
                                         adapter=adapter))
    return prompts, params


# The demo model (2 KV heads: one per rank), its adapter on each rank, and a cache of 16 blocks
# of 4 tokens (4 layers x K and V x 1 KV head x head_dim 32 x fp32 per token and rank): crowded.
_ADAPTERS = {"desc": str(DEMO_DIR / "adapters" / "desc")}
_CROWDED_ENGINE = {"max_num_seqs": 6, "block_size": 4, "kv_cache_bytes": 16 * 4 * 4 * 2 * 32 * 4, "adapters": _ADAPTERS}


def _warm_imports() -> None:
    # Building on the meta device imports a lot of torch lazily (seconds on a busy machine); do
    # it before the group exists so that no rank's first collective waits on another's imports.
    with torch.device("meta"):
        Transformer(ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=8))


def _rank_main(rank: int, world: int, port: int, device: str, jobs: list[dict], out: Any) -> None:
    """Run every job as one replica: rank 0 generates, the others follow."""
    try:
        torch.set_num_threads(1)
        _warm_imports()
        dev = init_tp_group(rank, world, "127.0.0.1", port, device=device, timeout_s=60,
                            setup_timeout_s=SETUP_TIMEOUT_S)
        results: dict[str, Any] = {}
        for job in jobs:
            if rank == 0:
                with TPLeaderLLM(job["dir"], dtype="float32", device=dev, **job["engine"]) as llm:
                    outs = llm.generate(job["prompts"], job["params"])
                    results[job["name"]] = {"outs": [(o.token_ids, o.finish_reason, o.logprobs) for o in outs],
                                            "labels": [(o.label, o.label_logprobs) for o in outs],
                                            "preemptions": llm.scheduler.num_preemptions,
                                            "prefill_computed": llm.scheduler.num_prefill_tokens_computed,
                                            "prefill_submitted": llm.scheduler.num_prefill_tokens_submitted}
            else:
                results[job["name"]] = follower_loop(job["dir"], dtype="float32", device=dev, **job.get("follower", {}))
        destroy_tp_group()
        out.send((rank, "ok", results))
    except BaseException as e:  # report, so the test fails with the reason instead of a timeout
        out.send((rank, "error", f"{type(e).__name__}: {e}"))


def _leader_until_failure(port: int, model_dir: str, timeout_s: float, idle_s: float, out: Any) -> None:
    """Generate (idling once for ``idle_s``), announce "running", then step until an error."""
    try:
        torch.set_num_threads(1)
        _warm_imports()
        dev = init_tp_group(0, 2, "127.0.0.1", port, timeout_s=timeout_s, setup_timeout_s=SETUP_TIMEOUT_S)
        llm = TPLeaderLLM(model_dir, dtype="float32", device=dev, max_num_seqs=4)
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        first = llm.generate([[5, 6, 7]], params)[0].token_ids
        if idle_s:
            time.sleep(idle_s)  # longer than the collective timeout: keep-alives must cover it
            out.send((0, "idle-ok", llm.generate([[5, 6, 7]], params)[0].token_ids == first))
        out.send((0, "running", None))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not llm.has_unfinished():
                llm.add_request([1, 2, 3, 4], SamplingParams(max_tokens=100, ignore_eos=True))
            llm.step()
        out.send((0, "no-error", None))
    except TPError as e:
        out.send((0, "error", str(e)))
    except BaseException as e:
        out.send((0, "unexpected", f"{type(e).__name__}: {e}"))


def _follower(rank: int, port: int, model_dir: str, timeout_s: float, out: Any) -> None:
    try:
        torch.set_num_threads(1)
        _warm_imports()
        dev = init_tp_group(rank, 2, "127.0.0.1", port, timeout_s=timeout_s, setup_timeout_s=SETUP_TIMEOUT_S)
        out.send((rank, "done", follower_loop(model_dir, dtype="float32", device=dev)))
    except TPError as e:
        out.send((rank, "error", str(e)))
    except BaseException as e:
        out.send((rank, "unexpected", f"{type(e).__name__}: {e}"))


class _Ranks:
    """Spawned rank processes, each reporting on its own pipe; killed on exit whatever happened.

    One pipe per process, not a shared queue: a queue's shared lock can be left held by a
    process that the test kills, which would block the survivors' reports.
    """

    def __init__(self, targets: list[tuple[Any, tuple]]) -> None:
        self.readers, self.writers, self.procs = [], [], []
        for target, args in targets:
            reader, writer = _ctx.Pipe(duplex=False)
            self.readers.append(reader)
            self.writers.append(writer)
            self.procs.append(_ctx.Process(target=target, args=(*args, writer), daemon=True))

    def __enter__(self) -> "_Ranks":
        for p, w in zip(self.procs, self.writers):
            p.start()
            w.close()  # the child holds the only write end now, so its death reads as EOF
        return self

    def get(self, timeout: float) -> tuple:
        """The next report from any rank: ``(rank, status, payload)``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready = multiprocessing.connection.wait(self.readers, timeout=max(0.0, left))
            for r in ready:
                try:
                    return r.recv()
                except EOFError:  # that process ended (or was killed) without a report
                    self.readers.remove(r)
            if left <= 0 or not self.readers:
                alive = [i for i, p in enumerate(self.procs) if p.is_alive()]
                raise AssertionError(f"no report from any rank within {timeout} s (alive: {alive})")

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(10)


def _run_replica(world: int, jobs: list[dict], device: str = "cpu", timeout: float = 240) -> dict[str, Any]:
    """Rank 0's results of ``jobs`` run on a ``world``-rank replica."""
    port = _free_port()
    devices = [f"cuda:{r}" if device == "cuda" else "cpu" for r in range(world)]
    with _Ranks([(_rank_main, (r, world, port, devices[r], jobs)) for r in range(world)]) as ranks:
        reports = {}
        for _ in range(world):
            rank, status, payload = ranks.get(timeout)
            assert status == "ok", f"rank {rank} failed: {payload}"
            reports[rank] = payload
    for r in range(1, world):
        assert all(n > 0 for n in reports[r].values()), f"follower {r} ran no steps: {reports[r]}"
    return reports[0]


def _reference(model_dir: Path, params: list[SamplingParams]) -> dict[str, Any]:
    """One rank, plain LLM, same prompts and engine settings."""
    outs = LLM(model_dir, dtype="float32", device="cpu", **_ENGINE).generate(_prompts(), params)
    return {"outs": [(o.token_ids, o.finish_reason, o.logprobs) for o in outs]}


# ---------------------------------------------------------------------------------------------
# Checkpoints and the one two-rank run that all equality tests read
# ---------------------------------------------------------------------------------------------

# name -> (n_kv_heads, layouts): GQA, MHA, and MQA (1 KV head, replicated on both ranks).
_CONFIGS = {"gqa": (2, ("hf", "meta2")), "mha": (4, ("hf", "meta2")), "mqa": (1, ("hf",))}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp_ckpt")
    dirs = {}
    for i, (name, (kv, layouts)) in enumerate(_CONFIGS.items()):
        sd, args = _random_state_dict(kv, seed=i)
        save_hf(sd, args, root / f"{name}-hf")
        dirs[f"{name}-hf"] = root / f"{name}-hf"
        if "meta2" in layouts:
            save_meta(sd, args, root / f"{name}-meta2", num_shards=2)  # Meta's 2-file MP layout
            dirs[f"{name}-meta2"] = root / f"{name}-meta2"
    return dirs


def _jobs(checkpoints: dict[str, Path]) -> list[dict]:
    jobs = [{"name": name, "dir": str(d), "prompts": _prompts(), "params": _greedy(), "engine": _ENGINE}
            for name, d in checkpoints.items()]
    # Seeded sampling: rank 0's draws see the same logits as with one rank.
    jobs.append({"name": "gqa-hf-sampled", "dir": str(checkpoints["gqa-hf"]), "prompts": _prompts(),
                 "params": _sampled(), "engine": _ENGINE})
    # A cache of 6 blocks of 8 tokens for 7 prompts: preemption and recompute across ranks.
    jobs.append({"name": "gqa-meta2-preempt", "dir": str(checkpoints["gqa-meta2"]), "prompts": _prompts(),
                 "params": _greedy(), "engine": {"max_num_seqs": 7, "block_size": 8,
                                                 "kv_cache_bytes": 6 * 8 * _kv_bytes_per_token_tp2()}})
    # Prefix caching (on by default): rows sharing a prefix, shared blocks under preemption.
    jobs.append({"name": "gqa-hf-prefix", "dir": str(checkpoints["gqa-hf"]), "prompts": _prefix_prompts(),
                 "params": _greedy(), "engine": _PREFIX_ENGINE})
    # Adapters, classification (choices as branches after the prompt), constraints, preemption: all on two ranks.
    prompts, params = _crowded_rows()
    jobs.append({"name": "demo-crowded", "dir": str(DEMO_DIR / "model"), "prompts": prompts, "params": params,
                 "engine": _CROWDED_ENGINE, "follower": {"adapters": _ADAPTERS,
                                                         "kv_cache_bytes": _CROWDED_ENGINE["kv_cache_bytes"]}})
    if SHARED_DIR.is_dir():
        for layout in ("meta", "hf"):
            d = SHARED_DIR / "models" / f"stories260K-{layout}"
            jobs.append({"name": f"stories-{layout}", "dir": str(d), "prompts": [[1]],
                         "params": [SamplingParams(max_tokens=10, ignore_eos=True)], "engine": {}})
    return jobs


def _kv_bytes_per_token_tp2() -> int:
    # 2 layers x K and V x 1 local KV head (2 KV heads over 2 ranks) x head_dim 16 x fp32.
    return 2 * 2 * 1 * 16 * 4


@pytest.fixture(scope="module")
def tp2_results(checkpoints: dict[str, Path]) -> dict[str, Any]:
    return _run_replica(2, _jobs(checkpoints))


@pytest.mark.parametrize("name", ["gqa-hf", "gqa-meta2", "mha-hf", "mha-meta2", "mqa-hf"])
def test_tp2_greedy_tokens_equal_tp1(name: str, checkpoints: dict[str, Path], tp2_results: dict) -> None:
    config = name.split("-")[0]
    expected = _reference(checkpoints[f"{config}-hf"], _greedy())["outs"]
    got = tp2_results[name]["outs"]
    for i, ((tok, reason, _), (ref_tok, ref_reason, _)) in enumerate(zip(got, expected)):
        assert reason == ref_reason == "length", f"prompt {i}"
        assert len(tok) == _MAX_TOKENS[i]
        assert tok == ref_tok, f"{name}: prompt {i} (length {len(_prompts()[i])}) differs from TP=1"


def test_meta_mp_checkpoint_resliced_to_one_rank_equals_hf(checkpoints: dict[str, Path]) -> None:
    # The 2-file Meta checkpoint loaded by a single rank (its two halves re-joined).
    for config in ("gqa", "mha"):
        assert _reference(checkpoints[f"{config}-meta2"], _greedy()) == _reference(checkpoints[f"{config}-hf"], _greedy())


def test_tp2_seeded_sampling_equals_tp1(checkpoints: dict[str, Path], tp2_results: dict) -> None:
    expected = _reference(checkpoints["gqa-hf"], _sampled())["outs"]
    for (tok, _, lp), (ref_tok, _, ref_lp) in zip(tp2_results["gqa-hf-sampled"]["outs"], expected):
        assert tok == ref_tok
        assert lp == pytest.approx(ref_lp, abs=1e-4)


def test_tp2_preemption_keeps_tokens_exact(checkpoints: dict[str, Path], tp2_results: dict) -> None:
    result = tp2_results["gqa-meta2-preempt"]
    assert result["preemptions"] > 0, "the small cache was meant to force preemption"
    expected = _reference(checkpoints["gqa-hf"], _greedy())["outs"]
    assert [o[0] for o in result["outs"]] == [o[0] for o in expected]


def test_tp2_prefix_caching_shares_blocks_and_keeps_tokens_exact(checkpoints: dict[str, Path],
                                                               tp2_results: dict) -> None:
    result = tp2_results["gqa-hf-prefix"]
    # One rank without prefix caching (with the same 2-rank cache size in blocks).
    engine = {**_PREFIX_ENGINE, "kv_cache_bytes": 2 * _PREFIX_ENGINE["kv_cache_bytes"]}
    llm = LLM(checkpoints["gqa-hf"], dtype="float32", device="cpu", prefix_caching=False, **engine)
    expected = [o.token_ids for o in llm.generate(_prefix_prompts(), _greedy())]
    assert [o[0] for o in result["outs"]] == expected
    assert result["prefill_computed"] < result["prefill_submitted"]


def test_tp2_crowded_engine_with_adapters_choices_and_constraints_equals_one_rank(tp2_results: dict) -> None:
    result = tp2_results["demo-crowded"]
    assert result["preemptions"] > 0, "the small cache was meant to force preemption"
    prompts, params = _crowded_rows()
    one = LLM(DEMO_DIR / "model", dtype="float32", device="cpu", adapters=_ADAPTERS)
    want = one.generate(prompts, params)
    for i, ((tok, reason, _), (label, scores), w) in enumerate(zip(result["outs"], result["labels"], want)):
        assert (tok, reason, label) == (w.token_ids, w.finish_reason, w.label), f"row {i}"
        if w.label_logprobs is not None:
            assert scores == pytest.approx(w.label_logprobs, abs=1e-4), f"row {i}"


def test_tp2_real_checkpoint_from_both_layouts(tp2_results: dict) -> None:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DIR} (stories260K checkpoints live there)")
    for layout in ("meta", "hf"):
        assert tp2_results[f"stories-{layout}"]["outs"][0][0] == STORIES_FIRST_TEN, layout


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for a 2-rank NCCL replica")
def test_tp2_nccl_greedy_tokens_equal_tp1(checkpoints: dict[str, Path]) -> None:
    job = {"name": "gqa-meta2", "dir": str(checkpoints["gqa-meta2"]), "prompts": _prompts(),
           "params": _greedy(), "engine": _ENGINE}
    got = _run_replica(2, [job], device="cuda")["gqa-meta2"]["outs"]
    llm = LLM(checkpoints["gqa-hf"], dtype="float32", device="cuda:0", **_ENGINE)
    expected = llm.generate(_prompts(), _greedy())
    assert [o[0] for o in got] == [o.token_ids for o in expected]


# ---------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------


def _until(ranks: _Ranks, kind: str, timeout: float) -> tuple:
    rank, status, payload = ranks.get(timeout)
    assert status == kind, f"rank {rank}: expected {kind!r}, got {status!r}: {payload}"
    return rank, payload


def test_killed_follower_fails_the_leader_fast(checkpoints: dict[str, Path]) -> None:
    timeout_s = 10.0
    port, d = _free_port(), str(checkpoints["gqa-hf"])
    with _Ranks([(_leader_until_failure, (port, d, timeout_s, 0.0)), (_follower, (1, port, d, timeout_s))]) as ranks:
        _until(ranks, "running", SETUP_TIMEOUT_S)
        ranks.procs[1].kill()
        t0 = time.monotonic()
        _, message = _until(ranks, "error", timeout_s + 30)
        assert time.monotonic() - t0 < timeout_s + 5
        assert "recreated" in message


def test_idle_leader_keeps_followers_then_frozen_follower_times_out(checkpoints: dict[str, Path]) -> None:
    timeout_s = 4.0
    port, d = _free_port(), str(checkpoints["gqa-hf"])
    with _Ranks([(_leader_until_failure, (port, d, timeout_s, 1.5 * timeout_s)),
                 (_follower, (1, port, d, timeout_s))]) as ranks:
        _, same = _until(ranks, "idle-ok", SETUP_TIMEOUT_S)
        assert same, "the replica gave other tokens after idling"
        _until(ranks, "running", 30)
        # A frozen peer keeps its sockets open: only the collective timeout can end the wait.
        os.kill(ranks.procs[1].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        _, message = _until(ranks, "error", timeout_s + 30)
        assert time.monotonic() - t0 < timeout_s + 10
        assert "recreated" in message


def test_killed_leader_fails_the_follower(checkpoints: dict[str, Path]) -> None:
    timeout_s = 10.0
    port, d = _free_port(), str(checkpoints["gqa-hf"])
    with _Ranks([(_leader_until_failure, (port, d, timeout_s, 0.0)), (_follower, (1, port, d, timeout_s))]) as ranks:
        _until(ranks, "running", SETUP_TIMEOUT_S)
        ranks.procs[0].kill()
        t0 = time.monotonic()
        rank, message = _until(ranks, "error", timeout_s + 30)
        assert rank == 1 and message.startswith("rank 1:")
        assert time.monotonic() - t0 < timeout_s + 5


def test_mismatched_follower_is_refused_at_setup(checkpoints: dict[str, Path]) -> None:
    # Rank 1 loads another model's slice: the set-up must fail on both ranks, naming the field.
    port = _free_port()
    jobs0 = [{"name": "x", "dir": str(checkpoints["gqa-hf"]), "prompts": [[1]], "params": _greedy()[:1],
              "engine": {}}]
    jobs1 = [dict(jobs0[0], dir=str(checkpoints["mha-hf"]))]
    with _Ranks([(_rank_main, (0, 2, port, "cpu", jobs0)), (_rank_main, (1, 2, port, "cpu", jobs1))]) as ranks:
        reports = {r: (s, p) for r, s, p in (ranks.get(SETUP_TIMEOUT_S) for _ in range(2))}
    assert reports[0][0] == "error" and "n_kv_heads: rank 0 has 2, rank 1 has 4" in reports[0][1]
    assert reports[1][0] == "error" and "n_kv_heads" in reports[1][1]


def test_without_a_group_the_api_says_so() -> None:
    with pytest.raises(TPError, match="init_tp_group"):
        follower_loop("/nonexistent")
    with pytest.raises(TPError, match="init_tp_group"):
        TPLeaderLLM("/nonexistent")
