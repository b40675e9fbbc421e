"""The job pipeline end to end on a real local Ray: shards, replicas, Parquet out, resume modes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from batchgen.pipeline.driver import replica_layout, run_job
from batchgen.pipeline.faults import FAULTS_ENV
from batchgen.pipeline.spec import SpecError, load_spec
from batchgen.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "batchgen" / "demo" / "model"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


def write_input(root: Path, files: int = 3, rows: int = 80, poison: bool = False) -> list[int]:
    """Parquet files of demo-task prompts; returns all ids."""
    from batchgen.demo.task import make_examples

    root.mkdir(parents=True, exist_ok=True)
    examples = make_examples(files * rows, seed=3, split="heldout")
    ids = []
    for f in range(files):
        part = examples[f * rows:(f + 1) * rows]
        fid = [f * 1000 + i for i in range(rows)]
        prompts = [p for p, _ in part]
        if poison:
            prompts[3] = None
            prompts[7] = ""
        pq.write_table(pa.table({"id": fid, "prompt": prompts, "answer": [a for _, a in part]}),
                       root / f"part-{f}.parquet", row_group_size=20)
        ids += fid
    return ids


def write_spec(path: Path, inp: Path, out: Path, **extra) -> Path:
    spec = {
        "name": "pipeline-test",
        "model": {"path": str(DEMO_MODEL), "dtype": "float32"},
        "input": {"path": str(inp), "id_column": "id", "prompt_column": "prompt", "keep_columns": ["answer"]},
        "sampling": {"max_tokens": 12},
        "output": {"path": str(out), "mode": "resume"},
        "execution": {"replicas": 2, "shard_rows": 20, "heartbeat_s": 1, "lease_timeout_s": 60},
    }
    for key, value in extra.items():
        section, field = key.split("__")
        spec[section][field] = value
    path.write_text(yaml.safe_dump(spec))
    return path


def read_output(out: Path) -> pa.Table:
    return pq.ParquetDataset(out / "shards").read()


def test_job_end_to_end_every_row_exactly_once(local_ray, tmp_path: Path) -> None:
    ids = write_input(tmp_path / "in", poison=True)
    spec = load_spec(write_spec(tmp_path / "job.yaml", tmp_path / "in", tmp_path / "out", output__token_ids=True))
    summary = run_job(spec, progress_every_s=1)

    table = read_output(tmp_path / "out")
    got = table.column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))  # every row exactly once
    assert set(table.column_names) >= {"id", "answer", "completion", "finish_reason", "prompt_tokens",
                                        "completion_tokens", "error"}
    rows = {r["id"]: r for r in table.to_pylist()}
    for poisoned in (3, 7, 1003, 2007):
        assert rows[poisoned]["finish_reason"] == "error" and rows[poisoned]["error"]
    ok = [r for r in rows.values() if r["error"] is None]
    assert len(ok) == len(ids) - 6
    # The trained demo model really answers (a weak bar here; the demo test holds the 95% bar).
    assert sum(r["completion"].strip() == r["answer"] for r in ok) >= 0.8 * len(ok)
    # output.token_ids: the ids behind each completion (EOS, a stop token, is not in the text).
    tok = Tokenizer(str(DEMO_MODEL / "tokenizer.model"))
    for r in ok:
        assert len(r["token_ids"]) == r["completion_tokens"]
        assert tok.decode([t for t in r["token_ids"] if t != tok.eos_id]) == r["completion"]
    assert all(rows[p]["token_ids"] is None for p in (3, 7))

    shard_summary = pq.read_table(tmp_path / "out" / "summary.parquet").to_pylist()
    assert len(shard_summary) == summary["shards"] == 12
    assert sum(s["rows"] for s in shard_summary) == len(ids)
    assert sum(s["rows_error"] for s in shard_summary) == 6
    assert sum(s["completion_tokens"] for s in shard_summary) == sum(r["completion_tokens"] for r in rows.values())
    assert {s["replica"] for s in shard_summary} <= {"batchgen-pipeline-test-replica-0", "batchgen-pipeline-test-replica-1"}
    assert all(s["started"] <= s["finished"] for s in shard_summary)
    success = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert success["rows"] == len(ids) and success["rows_error"] == 6 and not success["failed_shards"]


def test_one_replica_runs_the_next_shard_beside_the_last_rows_of_the_current(local_ray, tmp_path: Path) -> None:
    """Overlap: a replica leases the next shard once its engine has admitted every row it holds,
    so a shard starts before the one leased before it has finished (one at a time, the engine's
    batch would drain to a few rows at the end of every shard)."""
    write_input(tmp_path / "in", files=1, rows=60)
    spec = load_spec(write_spec(tmp_path / "job.yaml", tmp_path / "in", tmp_path / "out", execution__replicas=1))
    run_job(spec)
    shards = sorted(pq.read_table(tmp_path / "out" / "summary.parquet").to_pylist(), key=lambda s: s["started"])
    assert len(shards) == 3 and {s["replica"] for s in shards} == {"batchgen-pipeline-test-replica-0"}
    for before, after in zip(shards, shards[1:]):
        assert after["started"] < before["finished"], (before, after)


def test_leases_are_heartbeated_while_their_shard_is_being_published(local_ray, tmp_path: Path, monkeypatch) -> None:
    """A publish slower than the lease timeout (a retrying object store) must not let the lease
    expire: the shard would be leased and generated again."""
    write_input(tmp_path / "in", files=1, rows=40)
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"publish_delay_s": 2.5}))
    spec = load_spec(write_spec(tmp_path / "job.yaml", tmp_path / "in", tmp_path / "out", execution__replicas=1,
                                execution__lease_timeout_s=1, execution__heartbeat_s=0.2))
    seen: list[dict] = []
    run_job(spec, progress_every_s=0.5, on_stats=seen.append)
    assert seen[-1]["attempts"] == 2  # one lease per shard: none expired and was granted again
    shards = pq.read_table(tmp_path / "out" / "summary.parquet").to_pylist()
    assert [s["attempts"] for s in shards] == [1, 1]


def test_progress_counts_rows_as_they_finish_before_their_shard_commits(local_ray, tmp_path: Path, monkeypatch,
                                                                        caplog) -> None:
    """One shard of 20 rows through an engine that holds 4 at a time: rows finish in waves, and
    the progress line counts them (from the replica's heartbeats) while no shard is committed."""
    write_input(tmp_path / "in", files=1, rows=20)
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"step_delay_s": 0.1}))
    spec = load_spec(write_spec(tmp_path / "job.yaml", tmp_path / "in", tmp_path / "out", execution__replicas=1,
                                execution__heartbeat_s=0.2, model__max_num_seqs=4))
    with caplog.at_level("INFO", logger="batchgen"):
        run_job(spec, progress_every_s=0.2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[batchgen] [")]
    counts = [tuple(map(int, m.groups())) for m in
              (re.search(r"rows (\d+)/20 \| shards (\d+)/1", ln) for ln in lines) if m]
    assert any(0 < rows < 20 and shards == 0 for rows, shards in counts), lines
    assert counts[-1] == (20, 1)
    assert all(a[0] <= b[0] for a, b in zip(counts, counts[1:])), counts  # never backwards here
    # The test hook was on: the driver says so, loudly.
    assert any(r.levelname == "WARNING" and "TEST HOOK ACTIVE in the driver" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_fault_hook_warns_loudly_in_every_replica_and_wraps_its_engine(local_ray, tmp_path: Path, caplog) -> None:
    """The test hook announces itself in each replica process it runs in (the driver's warning is
    checked above); without it nothing of the hook is there."""
    from batchgen.pipeline.faults import FaultyEngine
    from batchgen.pipeline.queue import create_queue
    from batchgen.pipeline.replica import Replica

    write_input(tmp_path / "in", files=1, rows=4)
    spec = load_spec(write_spec(tmp_path / "job.yaml", tmp_path / "in", tmp_path / "out"))
    queue = create_queue({}, 1, 10.0, name="hook-test-queue")
    try:
        spec_dict = spec.with_resolved_paths().model_dump(mode="json")
        with caplog.at_level("WARNING", logger="batchgen"):
            quiet = Replica(spec_dict, "hook-test-queue", "replica-7")
        assert quiet.faults is None and not caplog.records
        engine = object()
        assert quiet._engine(engine) is engine
        with caplog.at_level("WARNING", logger="batchgen"):
            hooked = Replica(spec_dict, "hook-test-queue", "replica-8", None, json.dumps({"step_delay_s": 0.01}))
        [record] = caplog.records
        assert record.levelname == "WARNING" and "TEST HOOK ACTIVE in replica replica-8" in record.getMessage()
        assert "step_delay_s" in record.getMessage()
        assert isinstance(hooked._engine(engine), FaultyEngine) and hooked._engine(engine).engine is engine
    finally:
        ray.kill(queue)


@pytest.mark.parametrize("replicas, layout", [
    (1, (1, {"num_cpus": 2}, 2)),  # one replica on a 2-core node uses both cores
    (2, (2, {"num_cpus": 1}, 1)),
    ("auto", (2, {"num_cpus": 1}, 1)),
    (3, (3, {"num_cpus": 1}, 1)),  # more than fit: the third waits for a core
])
def test_replica_layout_shares_the_cores(local_ray, tmp_path: Path, replicas, layout) -> None:
    spec = load_spec(write_spec(tmp_path / "job.yaml", tmp_path / "in", tmp_path / "out", execution__replicas=replicas))
    assert replica_layout(spec, num_shards=10) == layout
    assert replica_layout(spec, num_shards=1)[0] == 1


def test_resume_does_nothing_overwrite_redoes_error_if_exists_refuses(local_ray, tmp_path: Path) -> None:
    write_input(tmp_path / "in", files=1, rows=40)
    spec_path = write_spec(tmp_path / "job.yaml", tmp_path / "in", tmp_path / "out")
    run_job(load_spec(spec_path))
    shards = sorted((tmp_path / "out" / "shards").glob("*.parquet"))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    success_before = (tmp_path / "out" / "_SUCCESS").read_text()

    run_job(load_spec(spec_path))  # resume of a finished job
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((tmp_path / "out" / "shards").glob("*.parquet"))}
    assert after == before
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text())["rows"] == json.loads(success_before)["rows"]

    run_job(load_spec(spec_path, ["output.mode=overwrite"]))
    redone = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((tmp_path / "out" / "shards").glob("*.parquet"))}
    assert redone.keys() == before.keys()
    assert all(redone[k] != before[k] for k in before)

    with pytest.raises(SpecError, match="exists"):
        run_job(load_spec(spec_path, ["output.mode=error_if_exists"]))


def test_resume_with_a_changed_spec_is_refused(local_ray, tmp_path: Path) -> None:
    write_input(tmp_path / "in", files=1, rows=20)
    spec_path = write_spec(tmp_path / "job.yaml", tmp_path / "in", tmp_path / "out")
    run_job(load_spec(spec_path))
    with pytest.raises(SpecError, match="max_tokens"):
        run_job(load_spec(spec_path, ["sampling.max_tokens=5"]))


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "batchgen", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_validate_reports_bad_specs_with_exit_2(tmp_path: Path) -> None:
    write_input(tmp_path / "in", files=1, rows=20)
    good = write_spec(tmp_path / "good.yaml", tmp_path / "in", tmp_path / "out")
    res = _cli("validate", str(good))
    assert res.returncode == 0, res.stderr
    assert "20 rows" in res.stdout and not (tmp_path / "out").exists()  # validate writes nothing

    bad = write_spec(tmp_path / "bad.yaml", tmp_path / "in", tmp_path / "out", input__template="Q: {nope}",
                     input__prompt_column=None)
    res = _cli("validate", str(bad))
    assert res.returncode == 2 and "nope" in res.stderr and "input.template" in res.stderr

    typo = yaml.safe_load(good.read_text())
    typo["sampling"]["max_token"] = 3
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    res = _cli("validate", str(tmp_path / "typo.yaml"))
    assert res.returncode == 2 and "sampling.max_token" in res.stderr

    res = _cli("run", str(bad))  # run checks the same before starting anything
    assert res.returncode == 2 and not (tmp_path / "out").exists()

    # validate is a quick check: it does not import Ray (torch: the weight files' headers are read).
    probe = ("import sys; from batchgen.cli import main; rc = main(['validate', sys.argv[1]]); "
             "print(rc, sorted(m for m in ('ray',) if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe, str(good)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.strip().splitlines()[-1] == "0 []", res.stdout + res.stderr


def test_cli_run_and_status(tmp_path: Path) -> None:
    write_input(tmp_path / "in", files=1, rows=20)
    spec = write_spec(tmp_path / "job.yaml", tmp_path / "in", tmp_path / "out")
    res = _cli("run", str(spec), "--no-dashboard", "--set", "execution.replicas=1", "--progress-every", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["rows"] == 20
    # Log lines carry ISO-8601 UTC times and name the absolute output location.
    started = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO job pipeline-test: output "
    assert re.search(started + re.escape(str(tmp_path / "out")) + "$", res.stderr, re.M), res.stderr[-3000:]
    assert f"complete, results in {tmp_path / 'out'}" in res.stderr
    # The last progress line: everything done, nothing running.
    assert re.search(r"\[batchgen\] \[#{20}\] 100% rows 20/20 \| shards (\d+)/\1, 0 running", res.stderr), res.stderr
    status = _cli("status", str(tmp_path / "out"))
    assert status.returncode == 0
    assert json.loads(status.stdout)["complete"] is True
