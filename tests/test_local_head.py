"""Beside a head started by cluster/start-local-head.sh: a local run starts its own loopback Ray
instead of joining the head (and joins it, on loopback, when RAY_ADDRESS says so); `ray job stop` lets in-flight shards commit and the job resumes;
replica actors carry their names in Ray's state API; a cluster that is not there is reported as
such, fast, not as a storage error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from ray_head import REPO, START, STOP, free_port, http_get

DEMO_MODEL = REPO / "batchgen" / "demo" / "model"


def _write_job(tmp: Path, name: str, rows: int, shard_rows: int, max_num_seqs: int = 64) -> Path:
    ids = list(range(rows))
    (tmp / "in").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": ids, "q": [f"{i % 50}+{(i * 7) % 50}" for i in ids]}), tmp / "in" / "part-0.parquet")
    spec = {
        "name": name,
        "model": {"path": str(DEMO_MODEL), "dtype": "float32", "max_num_seqs": max_num_seqs},
        "input": {"path": str(tmp / "in"), "id_column": "id", "template": "{q}="},
        "sampling": {"max_tokens": 8},
        "output": {"path": str(tmp / "out")},
        "execution": {"replicas": 1, "shard_rows": shard_rows},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _committed(out: Path) -> int:
    return len(list((out / "shards").glob("*.parquet"))) if (out / "shards").is_dir() else 0


def test_an_unreachable_ray_address_fails_fast_and_is_not_a_storage_error(tmp_path: Path) -> None:
    job = _write_job(tmp_path, "nowhere", rows=4, shard_rows=2)
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "batchgen", "run", str(job)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    assert f"cannot connect to the Ray cluster at {env['RAY_ADDRESS']}" in res.stderr
    assert "storage error" not in res.stderr
    assert time.monotonic() - started < 45  # Ray alone waits 60 s before it gives up


def test_beside_a_local_head_runs_start_their_own_ray_and_ray_job_stop_drains(
        head_env: dict[str, str], tmp_path: Path) -> None:
    env = {**head_env, "NUM_CPUS": "2"}
    ray_bin = Path(sys.prefix) / "bin" / "ray"
    if not ray_bin.exists():
        pytest.skip(f"no ray CLI at {ray_bin}")
    started = subprocess.run(["bash", str(START), "--dashboard-agent-listen-port", env["AGENT_PORT"]],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        exports = dict(re.findall(r"^export (\w+)=(.*)$", (Path(env["RAY_TMPDIR"]) / "env.sh").read_text(), re.M))
        client_env = {**env, **exports}

        # 1. A library caller with no RAY_ADDRESS, ray imported before batchgen, and not even Ray's
        # loopback switch set: run_job starts a private Ray on 127.0.0.1 (Ray's default would have
        # joined the head from the host's routable address and hung).
        local = tmp_path / "local"
        local.mkdir()
        job = _write_job(local, "beside", rows=6, shard_rows=3)
        probe = ("import sys, ray\n"
                 "from batchgen.pipeline.driver import run_job\n"
                 "from batchgen.pipeline.spec import load_spec\n"
                 "summary = run_job(load_spec(sys.argv[1]), dashboard=False)\n"
                 "print('RESULT', summary['rows'], ray.util.get_node_ip_address(),\n"
                 "      ray.get_runtime_context().gcs_address)\n")
        lib_env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        res = subprocess.run([sys.executable, "-c", probe, str(job)], cwd=REPO, env=lib_env,
                             capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
        rows, node_ip, gcs = res.stdout.split("RESULT", 1)[1].split()
        assert rows == "6" and node_ip == "127.0.0.1"
        assert gcs.startswith("127.0.0.1:") and gcs != f"127.0.0.1:{env['RAY_PORT']}"  # not the head

        # ... and with the head's RAY_ADDRESS (127.0.0.1) it joins the head, from loopback too.
        joined = tmp_path / "joined"
        joined.mkdir()
        job = _write_job(joined, "joined", rows=4, shard_rows=2)
        join_env = {k: v for k, v in client_env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        res = subprocess.run([sys.executable, "-c", probe, str(job)], cwd=REPO, env=join_env,
                             capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
        rows, node_ip, gcs = res.stdout.split("RESULT", 1)[1].split()
        assert (rows, node_ip, gcs) == ("4", "127.0.0.1", f"127.0.0.1:{env['RAY_PORT']}")

        # 2. `ray job stop` on a running job: SIGTERM, then (RAY_JOB_STOP_WAIT_TIME_S later) SIGKILL.
        # Each shard takes seconds (a delay per engine step) and the engine holds one shard's rows
        # (so at most two shards are leased): shards are in flight when it stops, others wait.
        stop_dir = tmp_path / "stop"
        stop_dir.mkdir()
        job = _write_job(stop_dir, "stopme", rows=24, shard_rows=4, max_num_seqs=4)
        out = stop_dir / "out"
        faults = {"env_vars": {"BATCHGEN_FAULTS": json.dumps({"step_delay_s": 0.6})}}
        submit = subprocess.run(
            [str(ray_bin), "job", "submit", "--no-wait", "--runtime-env-json", json.dumps(faults), "--",
             "python", "-m", "batchgen", "run", str(job), "--progress-every", "1"],
            cwd=REPO, env=client_env, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        job_id = re.search(r"(raysubmit_\w+)", submit.stdout + submit.stderr).group(1)
        deadline = time.monotonic() + 180
        while _committed(out) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        at_stop = _committed(out)
        assert at_stop >= 1, "no shard committed within 180 s"
        stop = subprocess.run([str(ray_bin), "job", "stop", job_id], cwd=REPO, env=client_env,
                              capture_output=True, text=True, timeout=150)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
        code, body = http_get(f"http://127.0.0.1:{env['DASHBOARD_PORT']}/api/jobs/{job_id}", token)
        assert code == 200 and json.loads(body)["status"] == "STOPPED"
        logs = subprocess.run([str(ray_bin), "job", "logs", job_id], cwd=REPO, env=client_env,
                              capture_output=True, text=True, timeout=60).stdout
        assert "leasing stopped; waiting up to" in logs, logs[-3000:]
        stopped = re.search(r"stopped by SIGTERM: (\d+) of 6 shards are committed", logs)
        assert stopped, logs[-3000:]  # the driver got to the end of its drain: not SIGKILLed
        # The shard in flight at the SIGTERM committed during the drain; the rest waits.
        assert at_stop < int(stopped.group(1)) == _committed(out) < 6
        assert not (out / "_SUCCESS").exists()

        # Replica actors carry their names in Ray's state API (dead ones are still listed).
        listed = subprocess.run([str(ray_bin), "list", "actors", "--format", "json", "--limit", "1000",
                                 "--address", exports["RAY_API_SERVER_ADDRESS"]],
                                cwd=REPO, env=client_env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr[-2000:]
        names = {a.get("name") for a in json.loads(listed.stdout)}
        assert "batchgen-stopme-replica-0" in names, names

        # 3. Resumable: the same job again finishes the rest, and its progress starts from the
        # rows committed before.
        resume = subprocess.run(
            [str(ray_bin), "job", "submit", "--", "python", "-m", "batchgen", "run", str(job), "--progress-every", "1"],
            cwd=REPO, env=client_env, capture_output=True, text=True, timeout=300)
        assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
        lines = re.findall(r"\[batchgen\] \[[#-]+\] \d+% rows (\d+)/24 \| shards (\d+)/6", resume.stdout)
        before = int(stopped.group(1))
        assert lines and int(lines[0][0]) >= 4 * before and int(lines[0][1]) >= before, lines[:3]
        assert lines[-1] == ("24", "6")
        assert sorted(pq.ParquetDataset(out / "shards").read().column("id").to_pylist()) == list(range(24))
        assert (out / "_SUCCESS").exists()
    finally:
        subprocess.run(["bash", str(STOP)], env=env, capture_output=True, text=True, timeout=90)

