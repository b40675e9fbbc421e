"""No row lost or duplicated: replica kills, driver kills, SIGTERM, poison rows, bad jobs.

Most tests run the real CLI (``python -m batchgen run``) as a subprocess on a local Ray bound
to 127.0.0.1, and kill its processes: replicas (``ray::Replica``, found among the driver's
descendants only, so nothing else on the machine is touched) and the driver itself. Failures
that must happen at an exact point (a crashing row, a crash during model load or while a
file is being published) come from the replicas' test hook, ``BATCHGEN_FAULTS``
(:class:`batchgen.pipeline.faults.Faults`). Every check ends with ``verify``.

``BATCHGEN_SOAK=1`` adds a longer chaos run.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.pipeline import verify
from batchgen.pipeline.driver import run_job
from batchgen.pipeline.faults import Faults
from batchgen.pipeline.worker import ShardWorker
from batchgen.pipeline.shards import plan_shards
from batchgen.pipeline.spec import SpecError, validate_spec

REPO = Path(__file__).resolve().parents[1]
SOAK = os.environ.get("BATCHGEN_SOAK") == "1"


# --------------------------------------------------------------------------------------- fixtures

#: Poison rows of :func:`write_input`: id -> text their ``error`` must contain.
def poison_rows(max_attempts: int) -> dict[int, str]:
    return {
        3: "column 'prompt' is null",
        8: "column 'prompt' is empty",
        14: "prompt_too_long",
        27: "override from column 'mt'",
        44: "generation failed: RuntimeError: injected fault",
        61: f"failed {max_attempts} attempts",  # kills its replica every time
        1005: "not valid UTF-8",
        1011: "column 'prompt' is empty",
        1022: "generation failed: RuntimeError: injected fault",
    }


def write_input(root: Path, rows_a: int = 150, rows_b: int = 60, group: int = 5) -> list[int]:
    """Two Parquet files of demo prompts with the poison rows of :func:`poison_rows`; row groups
    of ``group`` rows, so ``shard_rows: group`` gives one shard per row group. File b's prompt
    column is binary (it may hold invalid UTF-8); ``mt`` is a per-row max_tokens override."""
    from batchgen.demo.task import make_examples

    root.mkdir(parents=True, exist_ok=True)
    prompts = [p for p, _ in make_examples(rows_a + rows_b, seed=5, split="heldout")]
    a: list[Optional[str]] = prompts[:rows_a]
    a[3], a[8], a[14] = None, "", "reverse: " + "cat dog " * 60 + "="
    a[44], a[61] = "XRAISE " + a[44], "XKILL " + a[61]
    mt_a: list[Optional[int]] = [None] * rows_a
    mt_a[27] = -3
    b: list[Optional[bytes]] = [p.encode() for p in prompts[rows_a:]]
    b[5], b[11], b[22] = b"caf\xe9 \xff=", b"   ", b"XRAISE " + b[22]
    pq.write_table(pa.table({"id": list(range(rows_a)), "prompt": a, "mt": pa.array(mt_a, pa.int64())}),
                   root / "a.parquet", row_group_size=group)
    pq.write_table(pa.table({"id": [1000 + i for i in range(rows_b)], "prompt": pa.array(b, pa.binary()),
                             "mt": pa.array([None] * rows_b, pa.int64())}), root / "b.parquet", row_group_size=group)
    return list(range(rows_a)) + [1000 + i for i in range(rows_b)]


def simple_input(root: Path, rows: int = 10) -> None:
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(rows)), "prompt": [f"{i}+1=" for i in range(rows)],
                             "mt": pa.array([None] * rows, pa.int64())}), root / "x.parquet")


def job_spec(model: Path, inp: Path, out: Path, **execution: Any) -> dict:
    return {
        "name": "reliability",
        "model": {"path": str(model), "dtype": "float32"},
        "input": {"path": str(inp), "id_column": "id", "prompt_column": "prompt"},
        "sampling": {"max_tokens": 6, "overrides": {"max_tokens": "mt"}},
        "output": {"path": str(out)},
        "execution": {"replicas": 2, "shard_rows": 5, "max_attempts": 3, "heartbeat_s": 1,
                      "lease_timeout_s": 30, **execution},
    }


def faults(tmp: Path, step_delay_s: float = 0.0) -> str:
    """The test hook: rows that raise or crash, and one crash during model load and one while a
    shard is being published (each in whichever replica gets there first)."""
    return json.dumps({"raise_on": "XRAISE", "exit_on": "XKILL", "step_delay_s": step_delay_s,
                       "exit_once_at": {"load": str(tmp / "crashed-at-load"),
                                        "publish": str(tmp / "crashed-at-publish")}})


# --------------------------------------------------------------------------------------- processes

def descendants(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found: dict[int, str] = {}
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            try:
                found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            stack.append(child)
    return found


def replica_pids(driver: subprocess.Popen) -> list[int]:
    return sorted(pid for pid, cmd in descendants(driver.pid).items() if cmd.startswith("ray::Replica"))


def alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def reap_tree(pids: dict[int, str], wait_s: float = 20.0) -> list[str]:
    """Wait up to ``wait_s`` for the Ray workers of a killed driver to exit (a local Ray shares
    its fate with the driver), then SIGKILL (by pid) whatever of ``pids`` is left: Ray's node
    agents outlive a killed driver. Returns the command lines of the workers that had to be
    killed."""
    workers = [p for p, cmd in pids.items() if cmd.startswith(("ray::Replica", "ray::ShardQueue"))]
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(alive(p) for p in workers):
        time.sleep(0.5)
    stuck = [pids[p] for p in workers if alive(p)]
    for p in pids:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return stuck


class ReplicaKiller(threading.Thread):
    """SIGKILLs one of the driver's ``ray::Replica`` processes every 4-7 s (seeded)."""

    def __init__(self, driver: subprocess.Popen, seed: int, max_kills: int) -> None:
        super().__init__(daemon=True)
        self.driver, self.rng, self.max_kills = driver, random.Random(seed), max_kills
        self.kills = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while self.kills < self.max_kills and not self.stopped.wait(self.rng.uniform(4, 7)):
            pids = replica_pids(self.driver)
            if pids:
                try:
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return self.kills


def start_run(spec_path: Path, log: Path, env_extra: Optional[dict[str, str]] = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    with open(log, "ab") as f:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "batchgen", "run", str(spec_path), "--no-dashboard",
                                 "--progress-every", "2"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def stop_tree(proc: subprocess.Popen) -> None:
    """Test cleanup: SIGKILL a driver we started and everything below it, by pid."""
    tree = descendants(proc.pid)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    reap_tree(tree, wait_s=5)


def committed(out: Path) -> int:
    shards = out / "shards"
    return len([p for p in shards.iterdir() if p.suffix == ".parquet" and not p.name.startswith(".")]) \
        if shards.is_dir() else 0


def wait_for(cond: Any, timeout_s: float, proc: Optional[subprocess.Popen] = None, log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"the driver exited early ({proc.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(0.3)


def check_output(inp: Path, out: Path, ids: list[int], poison: dict[int, str]) -> None:
    """verify says complete and duplicate-free; exactly the poison rows are errors, each with its
    reason; summary.parquet and _SUCCESS count every row."""
    report = verify.verify_output(str(inp), "id", str(out), examples=20)
    assert report.ok, verify.format_report(report)
    assert (report.input_rows, report.output_rows, report.missing, report.duplicate_rows) == (len(ids), len(ids), 0, 0)
    table = pq.ParquetDataset(out / "shards").read()
    rows = {r["id"]: r for r in table.to_pylist()}
    errors = {i: r["error"] for i, r in rows.items() if r["finish_reason"] == "error"}
    assert errors.keys() == poison.keys(), errors
    for i, expected in poison.items():
        assert expected in errors[i], (i, errors[i])
    assert all(r["error"] is None and r["completion"] is not None for i, r in rows.items() if i not in poison)
    summary = pq.read_table(out / "summary.parquet")
    assert sum(summary["rows"].to_pylist()) == len(ids)
    assert sum(summary["rows_error"].to_pylist()) == len(poison)
    assert sum(summary["rows_ok"].to_pylist()) == len(ids) - len(poison)
    assert sum(summary["completion_tokens"].to_pylist()) == sum(table["completion_tokens"].to_pylist())
    # Every shard has a timeline, split ones too (their pieces' earliest start, latest finish).
    assert all(s["started"] is not None and s["started"] <= s["finished"] for s in summary.to_pylist())
    success = json.loads((out / "_SUCCESS").read_text())
    assert (success["rows"], success["rows_error"]) == (len(ids), len(poison))
    assert not (out / "parts").exists()
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------------------- in-process

def test_a_raising_row_is_cornered_in_process_and_the_rest_completes(model_dir: Path, tmp_path: Path) -> None:
    from batchgen.engine import LLM

    inp = tmp_path / "in"
    inp.mkdir()
    prompts = [f"{i}+{i}=" for i in range(9)]
    prompts[2], prompts[6] = "XRAISE 1+1=", "XRAISE 2+2="
    pq.write_table(pa.table({"id": list(range(9)), "prompt": prompts}), inp / "x.parquet")
    spec = validate_spec(job_spec(model_dir, inp, tmp_path / "out", shard_rows=100))
    spec = spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"overrides": {}})})
    worker = ShardWorker(spec, Faults.parse(faults(tmp_path)).wrap(LLM(str(model_dir), dtype="float32", device="cpu")))
    [shard] = plan_shards(spec.input, 100)
    table, counts = worker.process(shard)
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(range(9))
    assert [i for i, r in enumerate(rows) if r["finish_reason"] == "error"] == [2, 6]
    assert "injected fault" in rows[2]["error"]
    assert rows[0]["finish_reason"] in ("stop", "length") and rows[0]["completion_tokens"] > 0
    assert (counts["rows"], counts["rows_ok"], counts["rows_error"]) == (9, 7, 2)

    # When no row at all can be generated, the attempt fails (the engine is suspect), so the
    # queue retries the shard instead of turning every row into an error.
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["XRAISE a", "XRAISE b"]}), only_bad / "x.parquet")
    spec_bad = spec.model_copy(update={"input": spec.input.model_copy(update={"path": str(only_bad)})})
    worker.spec = spec_bad
    with pytest.raises(RuntimeError, match="injected fault"):
        worker.process(plan_shards(spec_bad.input, 100)[0])
    assert not worker.llm.has_unfinished()


def _three_shards(model_dir: Path, tmp_path: Path, raise_row: Optional[int] = None) -> tuple[Any, list]:
    inp = tmp_path / "in3"
    inp.mkdir()
    prompts = [f"{i}+{i % 7}=" for i in range(24)]
    if raise_row is not None:
        prompts[raise_row] = "XRAISE " + prompts[raise_row]
    pq.write_table(pa.table({"id": list(range(24)), "prompt": prompts}), inp / "x.parquet", row_group_size=8)
    spec = validate_spec(job_spec(model_dir, inp, tmp_path / "out", shard_rows=8))
    spec = spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"overrides": {}})})
    return spec, plan_shards(spec.input, 8)


def test_shards_in_flight_together_give_what_each_gives_alone(model_dir: Path, tmp_path: Path) -> None:
    from batchgen.engine import LLM

    spec, shards = _three_shards(model_dir, tmp_path)
    worker = ShardWorker(spec, LLM(str(model_dir), dtype="float32", device="cpu", max_num_seqs=4))
    alone = [worker.process(s)[0].to_pylist() for s in shards]
    runs = [worker.start(shards[0])]
    assert not worker.wants_more()  # 8 rows queued for 4 slots: no need for more yet
    done, steps, drop_at = [], 0, -1
    while worker.inflight:
        if worker.wants_more() and len(runs) < 3:
            runs.append(worker.start(shards[len(runs)]))
            assert len(worker.inflight) <= 2  # never more than the engine needs
            drop_at = steps + 1 if len(runs) == 3 else -1
        done += worker.step()
        steps += 1
        if steps == drop_at:
            worker.drop(runs[2])  # its lease was lost: its rows go, the others stay
            assert runs[2] not in worker.inflight
    assert len(runs) == 3 and sorted(map(id, done)) == sorted(map(id, runs[:2]))
    for run, expected in zip(runs[:2], alone[:2]):
        assert run.error is None and worker.finish(run)[0].to_pylist() == expected
    assert not worker.llm.has_unfinished() and worker.llm.blocks.num_free == worker.llm.blocks.num_blocks


def test_a_raising_row_fails_only_its_own_row_among_shards_in_flight(model_dir: Path, tmp_path: Path) -> None:
    from batchgen.engine import LLM

    spec, shards = _three_shards(model_dir, tmp_path, raise_row=11)  # row 3 of the second shard
    llm = LLM(str(model_dir), dtype="float32", device="cpu", max_num_seqs=32)
    alone = [ShardWorker(spec, llm).process(s)[0].to_pylist() for s in shards]
    worker = ShardWorker(spec, Faults.parse(faults(tmp_path)).wrap(llm))
    runs = [worker.start(s) for s in shards]
    done = worker.step()  # the hook raises after the first step: every shard is re-run apart
    assert sorted(map(id, done)) == sorted(map(id, runs)) and all(run.error is None for run in runs)
    for i, (run, expected) in enumerate(zip(runs, alone)):
        rows = worker.finish(run)[0].to_pylist()
        if i == 1:
            assert "injected fault" in rows[3]["error"]
            rows[3], expected[3] = None, None
        assert rows == expected


def test_fault_hook_is_inert_unless_set_and_rejects_typos(monkeypatch) -> None:
    from batchgen.pipeline.faults import FAULTS_ENV
    from batchgen.pipeline.replica import fault_hook_env, load_test_hooks

    assert Faults.parse(None) is None and Faults.parse("") is None
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    assert fault_hook_env() is None and load_test_hooks(fault_hook_env(), "here") is None
    monkeypatch.setenv(FAULTS_ENV, '{"step_delay_s": 1}')
    assert fault_hook_env() == '{"step_delay_s": 1}'  # the seam reads the hook's own variable
    with pytest.raises(ValueError, match="unknown key"):
        load_test_hooks('{"raise_onn": "x"}', "here")
    with pytest.raises(ValueError, match="unknown key"):
        Faults.parse('{"raise_onn": "x"}')
    with pytest.raises(ValueError, match="exit_once_at"):
        Faults.parse('{"exit_once_at": {"lunch": "/tmp/x"}}')


def test_queue_close_settle_and_results_for() -> None:
    from batchgen.pipeline.queue import ShardQueue

    q = ShardQueue({"a": 1, "b": 2, "c": 3}, max_attempts=1, lease_timeout_s=10)
    la, lb = q.lease("r1"), q.lease("r2")
    assert q.nack(lb.lease_id, "poison")  # one attempt: b is dead-lettered
    q.settle_dead("b", {"rows": 1, "rows_error": 1})  # the driver wrote b's error row itself
    with pytest.raises(ValueError, match="not dead-lettered"):
        q.settle_dead("a", {})
    q.close()
    assert q.lease("r1") is None and q.is_finished()  # c stays pending: nothing more is leased
    assert q.heartbeat(la.lease_id) and q.ack(la.lease_id, {"rows": 1})  # in-flight work still lands
    assert q.results_for(["a", "b", "c", "zz"]) == {"a": {"rows": 1}, "b": {"rows": 1, "rows_error": 1}}


def test_parts_merge_into_one_atomic_shard_file_with_counts_from_the_rows(tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    from batchgen.pipeline import writer
    from batchgen.pipeline.worker import output_table

    spec = validate_spec(job_spec(tmp_path, tmp_path / "in", tmp_path / "out"))
    fs, out = pafs.LocalFileSystem(), str(tmp_path / "out")
    rows = pa.table({"id": [1, 2, 3]})
    part1 = output_table(spec, rows.slice(0, 2), ["failed 2 attempts: boom", "bad"])
    part2 = output_table(spec, rows.slice(2, 1), ["x"])
    writer.publish_part(fs, out, "s1", "s1@0-2", part1)
    writer.publish_part(fs, out, "s1", "s1@2-3", part2)
    writer.publish_part(fs, out, "s1", "s1@9-10", part2)  # a stray part: never named, never merged
    assert writer.committed_shards(fs, out) == set()  # parts are not output
    writer.merge_parts(fs, out, "s1", ["s1@0-2", "s1@2-3"], summary={"attempts": 5})
    assert writer.committed_shards(fs, out) == {"s1"} and not (tmp_path / "out" / "parts" / "s1").exists()
    assert pq.read_table(tmp_path / "out" / "shards" / "s1.parquet").column("id").to_pylist() == [1, 2, 3]
    [summary] = writer.read_shard_summaries(fs, out)
    assert (summary.rows, summary.rows_error, summary.rows_ok, summary.attempts) == (3, 3, 0, 5)
    (tmp_path / "out" / "shards" / ".tmp-123-s2.parquet.partial").write_bytes(b"half")
    assert writer.remove_leftovers(fs, out) == 1 and sorted(os.listdir(tmp_path / "out")) == ["shards"]


# --------------------------------------------------------------------------------------- chaos

def _chaos(model_dir: Path, tmp_path: Path, rows_a: int, rows_b: int, kills: tuple[int, int],
           commit_before_driver_kill: int, timeout_s: float) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    ids = write_input(inp, rows_a, rows_b)
    spec_path = tmp_path / "job.yaml"
    # Two attempts: the crashing row costs 2 + 2 replica restarts. A random kill can make a
    # shard run out of attempts too; it is then split, and its rows still complete.
    data = job_spec(model_dir, inp, out, max_attempts=2)
    spec_path.write_text(yaml.safe_dump(data))
    shards = len(plan_shards(validate_spec(data).input, 5))
    assert shards >= 40
    # Each engine step takes 0.1 s, as with a bigger model: the kills land mid-job.
    env = {"BATCHGEN_FAULTS": faults(tmp_path, step_delay_s=0.1)}
    log1, log2 = tmp_path / "run1.log", tmp_path / "run2.log"

    # Run 1: replicas are killed while it runs; then the driver itself is SIGKILLed.
    first = start_run(spec_path, log1, env)
    killer = ReplicaKiller(first, seed=1, max_kills=kills[0])
    try:
        killer.start()
        wait_for(lambda: committed(out) >= commit_before_driver_kill and killer.kills >= 1, timeout_s, first, log1)
        killer.stop()
        tree = descendants(first.pid)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert reap_tree(tree) == []  # its replicas and queue died with it
    finally:
        killer.stop()
        stop_tree(first)
    assert not (out / "_SUCCESS").exists()
    done_before = committed(out)
    assert done_before < shards - 10  # the driver died with plenty left to do

    # Run 2: the same command resumes, with replicas still being killed.
    second = start_run(spec_path, log2, env)
    killer = ReplicaKiller(second, seed=2, max_kills=kills[1])
    try:
        killer.start()
        second.wait(timeout=timeout_s)
    finally:
        killer.stop()
        stop_tree(second)
    text = log2.read_text()
    assert second.returncode == 0, text[-4000:]
    skipped = int(re.search(r"(\d+) already committed", text).group(1))
    assert skipped >= done_before - 2  # an orphan of run 1 may have published one more meanwhile
    assert "died" in log1.read_text() + text  # replicas really were killed, and recovered
    # A kill can use up the attempts of the shard that holds an XRAISE row too. The shard is then
    # split into single rows, and the row, alone in its piece, fails each attempt by itself: its
    # error is the dead letter's ("failed 2 attempts: ... RuntimeError: injected fault ...") rather
    # than the engine's ("generation failed: RuntimeError: ..."), which the SIGTERM test checks.
    poison = {**poison_rows(2), 44: "RuntimeError: injected fault", 1022: "RuntimeError: injected fault"}
    check_output(inp, out, ids, poison)
    assert (tmp_path / "crashed-at-load").exists() and (tmp_path / "crashed-at-publish").exists()
    assert verify.main([str(spec_path)]) == 0


def test_chaos_replica_and_driver_kills_poison_rows_every_row_exactly_once(model_dir: Path, tmp_path: Path) -> None:
    _chaos(model_dir, tmp_path, rows_a=200, rows_b=100, kills=(3, 3), commit_before_driver_kill=15, timeout_s=240)


@pytest.mark.skipif(not SOAK, reason="long soak: set BATCHGEN_SOAK=1")
def test_soak_many_shards_many_kills(model_dir: Path, tmp_path: Path) -> None:
    _chaos(model_dir, tmp_path, rows_a=800, rows_b=400, kills=(12, 12), commit_before_driver_kill=60,
           timeout_s=1200)


# --------------------------------------------------------------------------------------- SIGTERM

def test_sigterm_stops_cleanly_and_the_same_command_resumes(model_dir: Path, tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    ids = write_input(inp, rows_a=100, rows_b=30)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(job_spec(model_dir, inp, out, lease_timeout_s=20)))
    # No crashing row here; steps as slow as a bigger model's, so that there is work to stop.
    hook = {"BATCHGEN_FAULTS": json.dumps({"raise_on": "XRAISE", "step_delay_s": 0.05})}
    log1 = tmp_path / "run1.log"
    run = start_run(spec_path, log1, hook)
    try:
        wait_for(lambda: committed(out) >= 3, 120, run, log1)
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
    finally:
        stop_tree(run)
    text = log1.read_text()
    assert run.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "run the same command again" in text and "SIGTERM" in text
    assert not (out / "_SUCCESS").exists() and committed(out) < 26
    partial = verify.verify_output(str(inp), "id", str(out))
    assert partial.missing > 0 and partial.duplicate_rows == 0 and not partial.ok

    log2 = tmp_path / "run2.log"
    resume = start_run(spec_path, log2, hook)
    try:
        resume.wait(timeout=180)
    finally:
        stop_tree(resume)
    assert resume.returncode == 0, log2.read_text()[-3000:]
    poison = {k: v for k, v in poison_rows(3).items() if k != 61}  # row 61 only crashes with exit_on
    check_output(inp, out, ids, poison)


# --------------------------------------------------------------------------------------- bad jobs

def _bad_cases(tmp_path: Path, model: Path) -> list[tuple[str, dict, str]]:
    """(name, spec changes, text the error must contain) for specs/inputs that must be refused."""
    good_in = tmp_path / "in"
    (tmp_path / "nomodel").mkdir()
    (tmp_path / "notok").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "notok" / f).write_bytes((model / f).read_bytes())
    (tmp_path / "dupes").mkdir()
    pq.write_table(pa.table({"id": [1, 2, 2], "prompt": ["a", "b", "c"], "mt": [1, 1, 1]}),
                   tmp_path / "dupes" / "x.parquet")
    (tmp_path / "nullid").mkdir()
    pq.write_table(pa.table({"id": [1, None], "prompt": ["a", "b"], "mt": [1, 1]}), tmp_path / "nullid" / "x.parquet")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.parquet").write_bytes(b"this is not parquet")
    return [
        ("no model", {"model": {"path": str(tmp_path / "nomodel")}}, "model.path"),
        ("no tokenizer", {"model": {"path": str(tmp_path / "notok")}}, "model.tokenizer"),
        ("no input", {"input": {"path": str(tmp_path / "missing")}}, "input.path: no such file"),
        ("missing column", {"input": {"prompt_column": "text"}}, "input.prompt_column: column 'text' not in"),
        ("bad override column", {"sampling": {"overrides": {"max_tokens": "prompt"}}}, "needs an integer column"),
        ("duplicate ids", {"input": {"path": str(tmp_path / "dupes")}}, "duplicate ids: 2"),
        ("null ids", {"input": {"path": str(tmp_path / "nullid")}}, "null id(s)"),
        ("not parquet", {"input": {"path": str(tmp_path / "junk")}}, "not a readable Parquet file"),
        ("good input", {"input": {"path": str(good_in)}}, ""),
    ]


def test_bad_specs_and_inputs_are_refused_before_anything_is_written(model_dir: Path, tmp_path: Path) -> None:
    simple_input(tmp_path / "in")
    for name, changes, expected in _bad_cases(tmp_path, model_dir):
        if not expected:
            continue
        data = job_spec(model_dir, tmp_path / "in", tmp_path / "out")
        for section, values in changes.items():
            data[section] = {**data[section], **values}
        with pytest.raises(SpecError) as err:
            run_job(validate_spec(data))  # fails before Ray starts
        assert expected in str(err.value), (name, str(err.value))
        assert not (tmp_path / "out").exists(), name

    # The output location: a file in the way, or a non-empty directory with error_if_exists.
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(SpecError, match="output.path: .* not a directory"):
        run_job(validate_spec(job_spec(model_dir, tmp_path / "in", tmp_path / "out")))
    assert (tmp_path / "out").read_text() == "not a directory"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    data = job_spec(model_dir, tmp_path / "in", taken)
    data["output"]["mode"] = "error_if_exists"
    with pytest.raises(SpecError, match="error_if_exists"):
        run_job(validate_spec(data))
    data["output"]["mode"] = "overwrite"
    with pytest.raises(SpecError, match="did not write"):
        run_job(validate_spec(data))
    assert sorted(p.name for p in taken.iterdir()) == ["mine.txt"]


def test_cli_exit_codes_for_bad_jobs(model_dir: Path, tmp_path: Path) -> None:
    simple_input(tmp_path / "in")
    data = job_spec(model_dir, tmp_path / "in", tmp_path / "out")
    data["model"]["path"] = str(tmp_path / "nowhere")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "batchgen", "run", str(tmp_path / "bad.yaml"), "--no-dashboard"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "model.path" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- verify

def test_verify_reports_missing_duplicated_unexpected_and_reasonless_errors(tmp_path: Path) -> None:
    from batchgen.pipeline import writer
    import pyarrow.fs as pafs

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    pq.write_table(pa.table({"id": list(range(10)), "prompt": ["p"] * 10}), inp / "x.parquet")
    spec = validate_spec(job_spec(tmp_path, inp, out))

    def shard(name: str, ids: list[int], errors: Optional[dict[int, Optional[str]]] = None) -> None:
        errors, n = errors or {}, len(ids)
        table = pa.table({"id": ids, "completion": [None if i in errors else "c" for i in ids],
                          "finish_reason": ["error" if i in errors else "stop" for i in ids],
                          "prompt_tokens": [1] * n, "completion_tokens": [1] * n,
                          "error": [errors.get(i) for i in ids]},
                         schema=writer.output_schema(spec, pa.int64(), {}))
        writer.publish_shard(pafs.LocalFileSystem(), str(out), name, table)

    shard("a", [0, 1, 2, 3, 4], {2: "prompt_too_long: 99 tokens"})
    shard("b", [5, 6, 7, 8, 9])
    args = ["--input", str(inp), "--id-column", "id", "--output", str(out)]
    assert verify.main(args) == 0
    report = verify.verify_output(str(inp), "id", str(out))
    assert (report.error_rows, report.error_reasons) == (1, [("prompt_too_long", 1)])

    shard("c", [4, 42], {42: None})  # a duplicate, an id not in the input, an error without reason
    (out / "shards" / "b.parquet").unlink()  # five rows lost
    report = verify.verify_output(str(inp), "id", str(out))
    assert (report.missing, report.duplicated_ids, report.duplicate_rows, report.unexpected) == (5, 1, 1, 1)
    assert report.errors_without_reason == 1 and not report.ok
    assert report.missing_examples == [5, 6, 7, 8, 9] and report.duplicate_examples == [(4, 2)]
    assert verify.main(args) == 1
    assert verify.main(["--input", str(inp)]) == 2  # not enough to go on
    assert verify.main(["--input", str(tmp_path / "nope"), "--id-column", "id", "--output", str(out)]) == 2
