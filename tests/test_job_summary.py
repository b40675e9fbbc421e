"""Provenance and the job summary on a real local Ray: an interrupted run and its resume, a no-op
re-run, a resume refused after the weights under model.path were swapped, the shard files'
provenance metadata."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from batchgen import __version__
from batchgen.pipeline.driver import run_job
from batchgen.pipeline.faults import FAULTS_ENV
from batchgen.pipeline.spec import load_spec, spec_fingerprint
from batchgen.pipeline.writer import PROVENANCE_KEY

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "batchgen" / "demo" / "model"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


class _Interrupt(Exception):
    """Raised from the progress callback: the run ends midway, as a crash of the driver would."""


def _job(tmp_path: Path, model: Path, rows: int = 120) -> Path:
    (tmp_path / "in").mkdir()
    ids = list(range(rows))
    pq.write_table(pa.table({"id": ids, "q": [f"{i % 50}+{(i * 7) % 50}" for i in ids]}),
                   tmp_path / "in" / "part-0.parquet", row_group_size=20)
    spec = {
        "name": "summary-test",
        # Few rows at a time: a replica keeps its engine full across shards, and with room for
        # all 120 rows every shard could commit between two of the driver's polls.
        "model": {"path": str(model), "dtype": "float32", "max_num_seqs": 4},
        "input": {"path": str(tmp_path / "in"), "id_column": "id", "template": "{q}="},
        "sampling": {"max_tokens": 6},
        "output": {"path": str(tmp_path / "out"), "mode": "resume"},
        "execution": {"replicas": 1, "shard_rows": 20, "heartbeat_s": 1, "lease_timeout_s": 60},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "job.yaml"


def _interrupted_run(spec_path: Path) -> None:
    """Run until at least one shard is committed, then stop the driver with an exception."""
    def stop_after_first(stats: dict) -> None:
        if stats["done"] >= 1:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        run_job(load_spec(spec_path), progress_every_s=0.2, on_stats=stop_after_first)


def _is_iso_utc(text: str) -> bool:
    return text.endswith("Z") and dt.datetime.fromisoformat(text.replace("Z", "+00:00")).utcoffset() == dt.timedelta(0)


def test_interrupt_resume_and_noop_rerun_give_honest_runs_and_totals(local_ray, tmp_path: Path, monkeypatch) -> None:
    spec_path = _job(tmp_path, DEMO_MODEL)
    out = tmp_path / "out"
    # Slow steps (the test hook): the demo model finishes a 20-row shard in a fraction of a
    # second, so on a busy machine every shard could commit before the driver's first poll.
    with monkeypatch.context() as m:
        m.setenv(FAULTS_ENV, json.dumps({"step_delay_s": 0.05}))
        _interrupted_run(spec_path)
    assert not (out / "_SUCCESS").exists()
    first = json.loads((out / "runs.json").read_text())["runs"]
    assert len(first) == 1 and first[0]["status"] == "failed" and 1 <= first[0]["shards"] < 6

    summary = run_job(load_spec(spec_path))  # the resume does the rest
    success = json.loads((out / "_SUCCESS").read_text())
    assert success == json.loads(json.dumps(summary))
    runs = success["runs"]
    assert [r["status"] for r in runs] == ["failed", "done"]
    assert runs[0] == first[0]  # the first run's figures are kept as recorded
    assert success["rows"] == 120 and success["shards_committed"] == 6
    # Each shard is counted in the run that committed it; none is counted twice.
    assert runs[0]["shards"] + runs[1]["shards"] == 6
    assert sum(r["rows"] for r in runs) + success["runs_unrecorded_rows"] == 120
    assert success["runs_unrecorded_rows"] == 0
    assert sum(r["completion_tokens"] for r in runs) == success["completion_tokens"]
    assert success["seconds"] == pytest.approx(sum(r["seconds"] for r in runs), abs=0.01)
    for r in runs:
        assert r["completion_tokens_per_s"] == pytest.approx(r["completion_tokens"] / r["seconds"], rel=0.01)
    assert success["completion_tokens_per_s"] == pytest.approx(success["completion_tokens"] / success["seconds"],
                                                               rel=0.01)
    assert success["started"] == runs[0]["started"] and success["finished"] == runs[1]["finished"]
    assert all(_is_iso_utc(r[k]) for r in runs for k in ("started", "finished"))
    assert success["output"] == str(out)
    assert success["batchgen_version"] == __version__

    # A no-op re-run of the finished job adds no run and changes no figure.
    before = (out / "_SUCCESS").read_text()
    again = run_job(load_spec(spec_path))
    assert again["runs"] == runs and (out / "_SUCCESS").read_text() == before

    # summary.parquet: UTC timestamps and the row groups of every shard.
    shards = pq.read_table(out / "summary.parquet")
    assert str(shards.schema.field("started").type) == "timestamp[ms, tz=UTC]"
    assert [r["row_groups"] for r in shards.to_pylist()] == [[g] for g in range(6)]

    # Every shard file carries what reproduces its rows.
    manifest = json.loads((out / "manifest.json").read_text())
    model_fp = manifest["model_fingerprint"]
    assert [w["name"] for w in model_fp["weights"]] == ["model.safetensors"]
    assert model_fp["tokenizer"]["name"] == "tokenizer.model" and "config.json" in model_fp["configs"]
    assert success["model_fingerprint"] == model_fp["digest"]
    for path in sorted((out / "shards").glob("*.parquet")):
        prov = json.loads(pq.read_schema(path).metadata[PROVENANCE_KEY])
        assert prov["model_fingerprint"] == model_fp["digest"]
        assert prov["spec_fingerprint"] == spec_fingerprint(load_spec(spec_path))
        assert prov["sampling"]["max_tokens"] == 6 and prov["sampling"]["temperature"] == 0.0
        assert prov["batchgen_version"] == __version__


def test_resume_after_the_weights_were_swapped_is_refused_with_exit_2(local_ray, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    spec_path = _job(tmp_path, model)
    _interrupted_run(spec_path)
    committed = sorted(p.name for p in (tmp_path / "out" / "shards").glob("*.parquet"))

    # Other weights of the same shapes under the same path (a fine-tune, a re-download of another
    # revision): every size and the safetensors header stay the same.
    tensors = load_file(model / "model.safetensors")
    save_file({k: v * 1.01 for k, v in tensors.items()}, model / "model.safetensors", metadata={"format": "pt"})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["validate", str(spec_path)], ["run", str(spec_path), "--no-dashboard"]):
        res = subprocess.run([sys.executable, "-m", "batchgen", *args], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        assert "resume refused" in res.stderr and "model.safetensors changed content" in res.stderr, res.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "shards").glob("*.parquet")) == committed
