"""cluster/: the deployment files say what matters, and the local head scripts really work."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_head import LOOPBACK, START, STOP, WORKER_PORTS, http_get, listening_addresses

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def script_default_ports(text: str) -> dict[str, int]:
    return {name: int(port) for name, port in re.findall(r'(\w+_PORT)="\$\{\1:-(\d+)\}"', text)}


# -- static checks -----------------------------------------------------------------------------


def test_start_script_binds_loopback_with_token_auth_and_safe_ports() -> None:
    text = START.read_text()
    assert "--node-ip-address 127.0.0.1" in text
    assert "--dashboard-host 127.0.0.1" in text
    assert "export RAY_AUTH_MODE=token" in text
    assert "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in text
    ports = script_default_ports(text)
    assert set(ports) == {"RAY_PORT", "DASHBOARD_PORT", "METRICS_PORT", "CLIENT_PORT"}
    for name, port in ports.items():
        assert 1024 <= port <= 65535 and port not in WORKER_PORTS, (name, port)
    for flag in ("--port", "--dashboard-port", "--metrics-export-port", "--ray-client-server-port"):
        assert f'{flag} "$' in text, f"{flag} should come from a fixed, overridable port"
    assert os.access(START, os.X_OK) and os.access(STOP, os.X_OK)


def test_start_script_refuses_a_port_in_the_worker_range() -> None:
    result = subprocess.run(
        ["bash", str(START)], env={**os.environ, "RAY_PORT": "15000"},
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "RAY_PORT=15000 is inside Ray's worker port range 10002-19999" in result.stderr


def test_launcher_yaml_has_a_head_and_gpu_workers_running_batchgen_with_auth() -> None:
    cfg = load(CLUSTER / "gpu-cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types and types[head]["resources"].get("GPU", 0) == 0
    gpu_workers = {name: t for name, t in types.items() if name != head and t["resources"].get("GPU", 0) > 0}
    assert gpu_workers, "expected at least one GPU worker node type"
    instance_types = {t["node_config"]["InstanceType"] for t in gpu_workers.values()}
    assert {"g5.12xlarge", "p4d.24xlarge"} <= instance_types
    assert all(t["max_workers"] >= 1 for t in gpu_workers.values())
    assert types["gpu_a100_x8"]["resources"]["GPU"] == 8  # room for tensor_parallel: 8 (70B)
    assert any("pip install" in c and "batchgen" in c for c in cfg["setup_commands"])
    head_cmds, worker_cmds = " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_cmds
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379" in worker_cmds
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # same token everywhere


def gpu_limit(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["rayStartParams"]["num-cpus"] == "0"
    assert all(gpu_limit(c) == 0 for c in head["template"]["spec"]["containers"])
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        (container,) = group["template"]["spec"]["containers"]
        assert gpu_limit(container) >= 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]


def test_kuberay_raycluster_has_token_auth_and_a_gpu_worker_group() -> None:
    doc = load(CLUSTER / "kuberay" / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    check_ray_cluster_spec(doc["spec"])
    (group,) = doc["spec"]["workerGroupSpecs"]
    assert gpu_limit(group["template"]["spec"]["containers"][0]) == 8


def test_kuberay_rayjob_runs_batchgen_and_shuts_down() -> None:
    doc = load(CLUSTER / "kuberay" / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["entrypoint"] == "python -m batchgen run jobs/summarize-reviews.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": "/app"}
    check_ray_cluster_spec(spec["rayClusterSpec"])


def test_dockerfile_matches_the_ray_version_of_the_manifests() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in text
    assert "WORKDIR /app" in text and "COPY --chown=ray:users jobs ./jobs" in text


# -- the local head, for real ------------------------------------------------------------------



def test_local_head_starts_on_loopback_with_auth_and_stops(head_env: dict[str, str]) -> None:
    ray_bin = Path(sys.prefix) / "bin" / "ray"
    if not ray_bin.exists():
        pytest.skip(f"no ray CLI at {ray_bin}")
    env = head_env
    started = subprocess.run(
        ["bash", str(START), "--dashboard-agent-listen-port", env["AGENT_PORT"]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        dashboard = f"http://127.0.0.1:{env['DASHBOARD_PORT']}"
        assert f"Dashboard / Jobs API: {dashboard}" in started.stdout
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
        assert re.fullmatch(r"[0-9a-f]{64}", token)
        assert Path(env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o077 == 0  # a secret

        # Clients need exactly what env.sh says.
        exports = dict(re.findall(r"^export (\w+)=(.*)$", (Path(env["RAY_TMPDIR"]) / "env.sh").read_text(), re.M))
        assert exports["RAY_ADDRESS"] == f"127.0.0.1:{env['RAY_PORT']}"
        client_env = {**env, **exports}
        deadline = time.monotonic() + 30
        while True:  # the autoscaler monitor publishes the first status a few seconds after start
            status = subprocess.run([str(ray_bin), "status"], env=client_env, capture_output=True, text=True, timeout=60)
            assert status.returncode == 0, status.stderr[-2000:]
            if "Active:" in status.stdout or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert "Active:" in status.stdout and "1.0 CPU" in status.stdout, status.stdout

        # A wrong token is refused by the GCS and by the dashboard.
        wrong = subprocess.run(
            [str(ray_bin), "status"], env={**client_env, "RAY_AUTH_TOKEN": secrets.token_hex(32)},
            capture_output=True, text=True, timeout=60,
        )
        assert wrong.returncode != 0 and "Authentication" in wrong.stderr
        code, body = http_get(f"{dashboard}/api/version", token)
        assert code == 200 and json.loads(body)["ray_version"]
        assert http_get(f"{dashboard}/api/jobs/", token)[0] == 200
        assert http_get(f"{dashboard}/api/jobs/")[0] == 401  # no token
        assert http_get(f"{dashboard}/api/jobs/", secrets.token_hex(32))[0] == 403  # wrong token

        # A job submitted as the script says runs the venv's python (batchgen importable) and its
        # driver joins the cluster on loopback.
        probe = "import batchgen, ray; ray.init(); print('probe', ray.util.get_node_ip_address())"
        job = subprocess.run(
            [str(ray_bin), "job", "submit", "--", "python", "-c", probe],
            env=client_env, capture_output=True, text=True, timeout=120,
        )
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "probe 127.0.0.1" in job.stdout

        for name in ("RAY_PORT", "DASHBOARD_PORT", "METRICS_PORT", "CLIENT_PORT"):
            addresses = listening_addresses(int(env[name]))
            assert addresses and addresses <= LOOPBACK, (name, addresses)
    finally:
        stopped = subprocess.run(["bash", str(STOP)], env=env, capture_output=True, text=True, timeout=90)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopping" in stopped.stdout
    assert not listening_addresses(int(env["RAY_PORT"]))
    leftovers = subprocess.run(["pgrep", "-f", f"={env['RAY_TMPDIR']}/session_"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
    again = subprocess.run(["bash", str(STOP)], env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and "no Ray processes found" in again.stdout


# -- stop under `ray job stop`, Grafana -------------------------------------------------------


def test_every_cluster_setup_gives_the_driver_time_to_drain_under_ray_job_stop() -> None:
    from batchgen.pipeline.driver import STOP_GRACE_S

    # Ray's job supervisor SIGKILLs the driver RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM.
    texts = {p.name: p.read_text() for p in (START, CLUSTER / "gpu-cluster.yaml",
                                              CLUSTER / "kuberay" / "raycluster.yaml",
                                              CLUSTER / "kuberay" / "rayjob.yaml")}
    for name, text in texts.items():
        values = [int(v) for v in re.findall(r'RAY_JOB_STOP_WAIT_TIME_S(?:=|:-|, value: )"?(\d+)', text)]
        assert values and all(v >= STOP_GRACE_S + 15 for v in values), (name, values)
    launcher = load(CLUSTER / "gpu-cluster.yaml")
    for cmd in launcher["head_start_ray_commands"][1:] + launcher["worker_start_ray_commands"][1:]:
        assert "RAY_JOB_STOP_WAIT_TIME_S=90 RAY_AUTH_MODE=token ray start" in cmd
    for manifest in ("raycluster.yaml", "rayjob.yaml"):
        doc = load(CLUSTER / "kuberay" / manifest)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            env = {e["name"]: e["value"] for e in group["template"]["spec"]["containers"][0].get("env", [])}
            assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= STOP_GRACE_S + 15, (manifest, env)


def test_grafana_dashboard_queries_only_metrics_and_labels_batchgen_exports() -> None:
    from batchgen.pipeline.metrics import prometheus_series

    series = prometheus_series()
    dash = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs.append(dash["templating"]["list"][1]["query"])
    assert len(dash["panels"]) >= 5 and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\bray_batchgen_\w+", expr))
        assert names, f"no batchgen metric in {expr!r}"
        for name in names:
            assert name in series, f"{name} (in {expr!r}) is not exported; exported: {sorted(series)}"
            labels = set(re.findall(r"(\w+)\s*(?:=~|!=|=)\s*\"", expr))
            for group in re.findall(r"by \(([^)]*)\)", expr):
                labels |= {label.strip() for label in group.split(",")}
            assert labels <= set(series[name]), (expr, labels, series[name])
            used.add(name)
    # Every metric is on the dashboard somewhere.
    plain = {n for n in series if not n.endswith(("_sum", "_count", "_bucket"))}
    assert {n.rsplit("_bucket", 1)[0] for n in used} >= plain
    assert any("ray_batchgen_shard_seconds_bucket" in e for e in exprs)
