"""The user's real path: a head started by cluster/start-local-head.sh, `ray job submit --working-dir .
-- python -m batchgen run ...`, outputs checked, and batchgen metrics scraped from the metrics port."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from ray_head import REPO, START, STOP, http_get

DEMO_MODEL = REPO / "batchgen" / "demo" / "model"


def _metric_total(text: str, name: str) -> float:
    """Sum of a Prometheus series over all its label sets."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M))


def test_ray_job_submit_runs_a_job_and_exports_metrics(head_env: dict[str, str], tmp_path: Path) -> None:
    env = {**head_env, "NUM_CPUS": "2"}
    ray_bin = Path(sys.prefix) / "bin" / "ray"
    if not ray_bin.exists():
        pytest.skip(f"no ray CLI at {ray_bin}")
    ids = list(range(120))
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ids, "q": [f"{i % 50}+{(i * 7) % 50}" for i in ids]}),
                   tmp_path / "in" / "part-0.parquet", row_group_size=20)
    spec = {
        "name": "submitted",
        "model": {"path": str(DEMO_MODEL), "dtype": "float32"},
        "input": {"path": str(tmp_path / "in"), "id_column": "id", "template": "{q}="},
        "sampling": {"max_tokens": 8},
        "output": {"path": str(tmp_path / "out")},
        "execution": {"replicas": 2, "shard_rows": 20},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))

    # Metrics are pushed every second instead of every ten, so a short job shows up in time.
    started = subprocess.run(
        ["bash", str(START), "--dashboard-agent-listen-port", env["AGENT_PORT"],
         "--system-config", '{"metrics_report_interval_ms": 1000}'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        # The suggested submit command names absolute paths (the working dir copy is temporary).
        assert "--set output.path=$PWD/demo-out/results/" in started.stdout
        exports = dict(re.findall(r"^export (\w+)=(.*)$", (Path(env["RAY_TMPDIR"]) / "env.sh").read_text(), re.M))
        client_env = {**env, **exports}
        # A short delay per engine step (a test hook) keeps the replicas busy for some seconds.
        faults = {"env_vars": {"BATCHGEN_FAULTS": json.dumps({"step_delay_s": 0.1})}}
        job = subprocess.Popen(
            [str(ray_bin), "job", "submit", "--working-dir", ".", "--runtime-env-json", json.dumps(faults), "--",
             "python", "-m", "batchgen", "run", str(tmp_path / "job.yaml"), "--progress-every", "2"],
            cwd=REPO, env=client_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        # Per-replica gauges vanish from the scrape once the job's workers are gone: read them
        # while it runs. Labelled with the actor's name; a rate over at least a second of work.
        rates: dict[str, float] = {}
        while job.poll() is None and len(rates) < 2:
            code, body = http_get(f"http://127.0.0.1:{env['METRICS_PORT']}/metrics")
            rates.update({m[0]: float(m[1]) for m in re.findall(
                r'^ray_batchgen_replica_tokens_per_second\{[^}]*batchgen_job="submitted"[^}]*replica="([^"]+)"[^}]*\}'
                r' ([0-9.e+-]+)$', body.decode(), re.M) if float(m[1]) > 0})
            time.sleep(0.3)
        logs, _ = job.communicate(timeout=300)
        assert job.returncode == 0, logs[-4000:]
        job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", logs).group(1)
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
        code, body = http_get(f"http://127.0.0.1:{env['DASHBOARD_PORT']}/api/jobs/{job_id}", token)
        assert code == 200 and json.loads(body)["status"] == "SUCCEEDED"
        assert re.search(r"\[batchgen\] \[#{20}\] 100% rows 120/120 \| shards 6/6, 0 running", logs)  # progress

        out = pq.ParquetDataset(tmp_path / "out" / "shards").read()
        assert sorted(out.column("id").to_pylist()) == ids
        success = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
        assert success["output"] == str(tmp_path / "out")
        assert f"output {tmp_path / 'out'}" in logs  # the driver names where the results go

        # A relative output.path under Ray Jobs would land in Ray's temporary copy of the working
        # dir, which Ray deletes: refused before any work (exit 2), saying what to write instead.
        refused = subprocess.run(
            [str(ray_bin), "job", "submit", "--working-dir", ".", "--",
             "python", "-m", "batchgen", "run", str(tmp_path / "job.yaml"), "--set", "output.path=out/relative"],
            cwd=REPO, env=client_env, capture_output=True, text=True, timeout=300,
        )
        text = refused.stdout + refused.stderr
        assert refused.returncode != 0 and re.search(r"Job 'raysubmit_\w+' failed", text), text[-3000:]
        assert "output.path: 'out/relative' would be written inside Ray's temporary copy" in text, text[-3000:]
        assert "--set output.path=$PWD/out/relative" in text and "exit code 2" in text, text[-3000:]
        leaked = [p for p in Path(env["RAY_TMPDIR"]).rglob("relative") if "working_dir_files" in str(p)]
        assert not leaked and not (REPO / "out" / "relative").exists()

        tokens_out = 0.0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code, body = http_get(f"http://127.0.0.1:{env['METRICS_PORT']}/metrics")
            assert code == 200
            text = body.decode()
            tokens_out = _metric_total(text, "ray_batchgen_tokens_out_total")
            if tokens_out > 0:
                break
            time.sleep(2)
        assert tokens_out > 0, [ln for ln in text.splitlines() if "batchgen" in ln][:20]
        assert _metric_total(text, "ray_batchgen_rows_done_total") > 0
        # Never more than the job's tokens in a second (the old per-commit rate read 335,389 tok/s
        # on 2 cores, when the whole job made ~1,000 tokens).
        assert set(rates) == {"batchgen-submitted-replica-0", "batchgen-submitted-replica-1"}, rates
        assert all(0 < r <= tokens_out for r in rates.values()), (rates, tokens_out)
    finally:
        subprocess.run(["bash", str(STOP)], env=env, capture_output=True, text=True, timeout=90)
