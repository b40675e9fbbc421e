"""Jobs run the way users run them: ``python -m batchgen run`` in a subprocess on a local Ray
(bound to 127.0.0.1), then ``status`` and ``verify`` on what it wrote.

One seeded, sampled job (temperature > 0) is run four ways, and every row's text must be the
same each time: as is; with ``model.tensor_parallel: 2`` (two gloo ranks on the CPU); interrupted
by SIGINT (twice: the second stops at once) and resumed by running the same command again; and
in-process through the engine with each row's seed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.engine import LLM, SamplingParams
from batchgen.pipeline.spec import row_seed

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "batchgen" / "demo" / "model"
ROWS, SHARD_ROWS = 30, 5
SHARDS = ROWS // SHARD_ROWS
# Sampled, not greedy: the same text every time comes from each row's (seed, id) stream.
# ignore_eos: every row takes exactly max_tokens steps, so a shard's rows start and end together
# and the next shard needs max_tokens more steps (the SIGINT check below relies on it).
SAMPLING = {"max_tokens": 8, "temperature": 3.0, "top_p": 0.95, "seed": 7, "ignore_eos": True}
COMPARED = ["completion", "finish_reason", "token_ids", "prompt_tokens", "completion_tokens", "error"]


def _env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **(extra or {})}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchgen", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def start_run(spec: Path, log: Path, *sets: str, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    """``batchgen run SPEC --set ...`` in the background, its output in ``log``."""
    argv = [sys.executable, "-m", "batchgen", "run", str(spec), "--no-dashboard", "--progress-every", "1"]
    for s in sets:
        argv += ["--set", s]
    with open(log, "ab") as f:  # the child keeps its own descriptor
        return subprocess.Popen(argv, cwd=REPO, env=_env(env), stdout=f, stderr=subprocess.STDOUT)


def run_to_end(spec: Path, log: Path, *sets: str, timeout: float = 300) -> str:
    proc = start_run(spec, log, *sets)
    try:
        proc.wait(timeout=timeout)
    finally:
        kill(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def kill(proc: subprocess.Popen) -> None:
    """Test cleanup: a driver still running is SIGKILLed (by pid); its local Ray dies with it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def committed(out: Path) -> int:
    shards = out / "shards"
    return len([p for p in shards.iterdir() if p.suffix == ".parquet" and not p.name.startswith(".")]) \
        if shards.is_dir() else 0


def wait_for(cond: Callable[[], bool], timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def rows(out: Path) -> dict[int, dict]:
    table = pq.ParquetDataset(out / "shards").read()
    return {r["id"]: {k: r[k] for k in COMPARED} for r in table.to_pylist()}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A spec over ``ROWS`` demo prompts (one file, ``SHARDS`` shards) and the prompts by id."""
    from batchgen.demo.task import make_examples

    tmp = tmp_path_factory.mktemp("user_paths")
    prompts = [p for p, _ in make_examples(ROWS, seed=11, split="heldout")]
    (tmp / "in").mkdir()
    pq.write_table(pa.table({"id": list(range(ROWS)), "prompt": prompts}), tmp / "in" / "part-0.parquet")
    spec = {
        "name": "user-paths",
        # max_num_seqs = shard_rows: a replica holds at most two shards, so they commit one by one.
        "model": {"path": str(DEMO_MODEL), "dtype": "float32", "max_num_seqs": SHARD_ROWS},
        "input": {"path": str(tmp / "in"), "id_column": "id", "prompt_column": "prompt"},
        "sampling": SAMPLING,
        "output": {"path": str(tmp / "out-ref"), "token_ids": True},
        "execution": {"replicas": 1, "shard_rows": SHARD_ROWS, "heartbeat_s": 1, "lease_timeout_s": 120},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, prompts


def test_row_seed_is_pinned() -> None:
    """Each row's draws come from ``row_seed(seed, id)``: a change to it changes every sampled
    completion of every resumed job, so its values are pinned here."""
    assert row_seed(0, 5) == 6297457310759352274
    assert row_seed(0, "5") == 2434273716597901194  # "5" and 5 are different ids
    assert row_seed(7, 12) == 5046980780917379729


def test_sampled_job_gives_the_same_text_with_tp2_after_sigint_and_resume_and_in_process(
        job: tuple[Path, list[str]]) -> None:
    spec, prompts = job
    tmp = spec.parent
    ref_out = tmp / "out-ref"

    # 1. The job as is; `status` and `verify` on the finished output.
    text = run_to_end(spec, tmp / "ref.log")
    assert f"{SHARDS} shards ({ROWS} rows)" in text
    ref = rows(ref_out)
    assert sorted(ref) == list(range(ROWS)) and all(r["error"] is None for r in ref.values())
    status = cli("status", str(ref_out))
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert (st["complete"], st["committed_shards"], st["total_shards"], st["committed_rows"]) == (True, SHARDS, SHARDS,
                                                                                                  ROWS)
    res = cli("verify", str(spec))
    assert res.returncode == 0 and "OK: every input row appears exactly once" in res.stdout, res.stdout + res.stderr

    # The engine in-process, each row with its own seed, samples exactly these tokens: the job's
    # draws depend on (seed, id) only, not on the batch, the process or the shard.
    llm = LLM(DEMO_MODEL, dtype="float32", device="cpu")
    params = [SamplingParams(**{**SAMPLING, "seed": row_seed(SAMPLING["seed"], i)})
              for i in range(ROWS)]
    for i, out in enumerate(llm.generate(prompts, params)):
        assert (ref[i]["token_ids"], ref[i]["completion"]) == (out.token_ids, out.text), i
    greedy = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    # Really sampled: the demo model is sure of its answers, but at this temperature most rows
    # draw something else than its greedy answer.
    assert sum(ref[i]["token_ids"] != g.token_ids for i, g in enumerate(greedy)) >= ROWS // 3

    # 2. Tensor parallel: the same job split over two gloo ranks writes the same rows.
    tp_out = tmp / "out-tp2"
    text = run_to_end(spec, tmp / "tp2.log", "model.tensor_parallel=2", f"output.path={tp_out}")
    assert "2 ranks in one placement group" in text
    assert rows(tp_out) == ref

    # 3. SIGINT once a shard has committed: leasing stops and the shard in flight gets time to
    # finish; a second SIGINT stops at once. Each step is slowed down (the test hook) so that the
    # next shard is still in flight (8 steps of 1 s) when the signals come.
    int_out, log = tmp / "out-int", tmp / "int.log"
    hook = {"BATCHGEN_FAULTS": json.dumps({"step_delay_s": 1.0})}
    proc = start_run(spec, log, f"output.path={int_out}", env=hook)
    try:
        wait_for(lambda: committed(int_out) >= 1, 240, proc, log)
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "leasing stopped" in log.read_text(), 60, proc, log)
        assert proc.poll() is None  # the first signal waits for the shard in flight ...
        before = committed(int_out)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)  # ... the second does not
    finally:
        kill(proc)
    text = log.read_text()
    assert proc.returncode == 130, text[-4000:]
    assert "stopped by SIGINT" in text and "run the same command again" in text
    assert committed(int_out) == before < SHARDS  # the shard in flight was dropped, not published
    assert not (int_out / "_SUCCESS").exists()
    res = cli("verify", str(spec), "--set", f"output.path={int_out}")
    assert res.returncode == 1 and "missing" in res.stdout

    # The same command again resumes: committed shards are skipped, the rest is redone. `status`
    # on the running job shows its progress.
    log = tmp / "resume.log"
    proc = start_run(spec, log, f"output.path={int_out}",
                     env={"BATCHGEN_FAULTS": json.dumps({"step_delay_s": 0.5})})  # time to run `status`
    try:
        wait_for(lambda: committed(int_out) > before, 240, proc, log)
        st = json.loads(cli("status", str(int_out)).stdout)
        assert st["complete"] is False and st["total_shards"] == SHARDS
        assert before < st["committed_shards"] <= SHARDS
        proc.wait(timeout=300)
    finally:
        kill(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert f"{before} already committed" in text
    assert rows(int_out) == ref
    assert cli("verify", str(spec), "--set", f"output.path={int_out}").returncode == 0


def test_verify_fails_on_tampered_output(job: tuple[Path, list[str]], tmp_path: Path) -> None:
    """A finished job's output with a row removed, or a shard file copied, fails ``verify``."""
    spec, _ = job
    ref_out = spec.parent / "out-ref"
    if not (ref_out / "_SUCCESS").exists():
        pytest.skip("needs the finished job of the test above")
    args = ["--input", str(spec.parent / "in"), "--id-column", "id"]
    lost = tmp_path / "lost"
    shutil.copytree(ref_out, lost)
    first = sorted((lost / "shards").glob("*.parquet"))[0]
    table = pq.read_table(first)
    pq.write_table(table.slice(1), first)
    res = cli("verify", *args, "--output", str(lost))
    assert res.returncode == 1 and "missing:    1" in res.stdout, res.stdout

    doubled = tmp_path / "doubled"
    shutil.copytree(ref_out, doubled)
    shutil.copy(ref_out / "shards" / first.name, doubled / "shards" / "copy.parquet")
    res = cli("verify", *args, "--output", str(doubled), "--json")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert report["duplicated_ids"] == len(table) and report["ok"] is False
