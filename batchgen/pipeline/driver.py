"""The driver: check the job, plan shards, start the queue and the replicas, watch, finish.

Everything that can be wrong with the spec or the input is found before Ray starts or a model
loads. Then the driver only coordinates: replicas pull shards from the queue and publish their
own output; the driver restarts the work of replicas that die, logs progress, and writes
``summary.parquet`` and ``_SUCCESS`` (last) at the end.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import ray

from batchgen.pipeline import writer
from batchgen.pipeline.metrics import JobMetrics, ProgressLogger
from batchgen.pipeline.queue import create_queue
from batchgen.pipeline.replica import Replica
from batchgen.pipeline.shards import (
    Shard, input_fingerprint, list_input_files, plan_shards, resolve_filesystem, validate_input,
)
from batchgen.pipeline.spec import JobSpec, spec_fingerprint

log = logging.getLogger("batchgen")


class JobFailed(Exception):
    """The job ran but could not complete (dead-lettered shards, a replica that cannot start)."""


@dataclass
class JobPlan:
    """What a run has to do: all shards of the input, and those not yet committed."""

    shards: list[Shard]
    todo: list[Shard]
    input_fp: str
    spec_fp: str
    rows_total: int
    dead: dict[str, list[str]] = field(default_factory=dict)


def plan_job(spec: JobSpec) -> JobPlan:
    """Validate the input, plan shards and prepare the output directory (no Ray, no model)."""
    files = list_input_files(spec.input)
    validate_input(spec, files)
    shards = plan_shards(spec.input, spec.execution.shard_rows, files)
    input_fp = input_fingerprint(files)
    committed = writer.prepare_output(spec, shards, input_fp)
    todo = [s for s in shards if s.shard_id not in committed]
    return JobPlan(shards, todo, input_fp, spec_fingerprint(spec), sum(s.num_rows for s in shards))


def init_ray(address: Optional[str] = None, dashboard: bool = True) -> None:
    """Join a cluster (``address``, or ``RAY_ADDRESS`` as ``ray job submit`` sets it), or start a
    local one bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or "auto")
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=dashboard, dashboard_host="127.0.0.1")


def replica_layout(spec: JobSpec, num_shards: int) -> tuple[int, dict[str, float], int]:
    """(number of replicas, Ray resources of one, torch threads of one) on this cluster."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    tp = spec.model.tensor_parallel
    if gpus:
        fit, resources, threads = max(1, gpus // tp), {"num_gpus": tp, "num_cpus": 1}, 0
    else:
        # On CPU a replica is worth one core per rank; torch gets exactly that many threads.
        fit, resources, threads = max(1, cpus // tp), {"num_cpus": tp}, tp
    wanted = fit if spec.execution.replicas == "auto" else spec.execution.replicas
    return max(1, min(wanted, num_shards)), resources, threads


def run_job(spec: JobSpec, *, address: Optional[str] = None, dashboard: bool = True,
            progress_every_s: float = 10.0, on_stats: Optional[Callable[[dict], None]] = None) -> dict:
    """Run a whole job; return the ``_SUCCESS`` summary. Raises ``JobFailed`` if it cannot finish."""
    started = time.time()
    plan = plan_job(spec)
    log.info("job %s: %d shards (%d rows), %d already committed", spec.name, len(plan.shards),
             plan.rows_total, len(plan.shards) - len(plan.todo))
    if plan.todo:
        init_ray(address, dashboard)
        _run_shards(spec, plan, progress_every_s, on_stats)
    return _finish(spec, plan, started)


def _run_shards(spec: JobSpec, plan: JobPlan, progress_every_s: float,
                on_stats: Optional[Callable[[dict], None]]) -> None:
    ex = spec.execution
    queue = create_queue({s.shard_id: s for s in plan.todo}, ex.max_attempts, ex.lease_timeout_s)
    n, resources, threads = replica_layout(spec, len(plan.todo))
    # max_restarts=-1: a dead replica comes back; the queue's attempt limit bounds the retries.
    actor_cls = ray.remote(Replica).options(max_restarts=-1, max_task_retries=0, **resources)
    # Replicas may run in another working directory: send them absolute local paths.
    spec_dict = spec.with_resolved_paths().model_dump(mode="json")
    names = [f"replica-{i}" for i in range(n)]
    replicas = [actor_cls.remote(spec_dict, queue, name, threads) for name in names]
    runs = {replicas[i].run.remote(): i for i in range(n)}
    metrics = JobMetrics(spec.name)
    progress = ProgressLogger(total_shards=len(plan.shards), done_before=len(plan.shards) - len(plan.todo),
                              every_s=progress_every_s, total_rows=sum(s.num_rows for s in plan.todo))
    log.info("started %d replicas, each %s", n, resources)
    try:
        while runs:
            ready, _ = ray.wait(list(runs), num_returns=1, timeout=1.0)
            for ref in ready:
                i = runs.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    # The process died (SIGKILL, OOM, CUDA fault). Ray restarts the actor; its
                    # leases go back now rather than after the lease timeout.
                    log.warning("%s died (%s); its shards go back to the queue", names[i], type(e).__name__)
                    ray.get(queue.release_replica.remote(names[i]))
                    runs[replicas[i].run.remote()] = i
                except ray.exceptions.RayTaskError as e:
                    raise JobFailed(f"{names[i]} failed: {e}") from None
            stats = ray.get(queue.stats.remote())
            metrics.queue(stats)
            totals = ray.get(queue.result_totals.remote(["rows", "completion_tokens"]))
            line = progress.update(stats, int(totals["rows"]), int(totals["completion_tokens"]))
            if line:
                log.info(line)
            if on_stats:
                on_stats(stats)
        plan.dead = ray.get(queue.dead_letters.remote())
    finally:
        for r in replicas:
            ray.kill(r)
        ray.kill(queue)


def _finish(spec: JobSpec, plan: JobPlan, started: float) -> dict:
    fs, root = resolve_filesystem(spec.output.path)
    rows = writer.read_shard_summaries(fs, root, [s.shard_id for s in plan.shards])
    writer.write_summary(fs, root, rows)
    finished = time.time()

    def total(key: str) -> int:
        return sum(int(r.get(key, 0) or 0) for r in rows)

    summary: dict[str, Any] = {
        "name": spec.name,
        "spec_fingerprint": plan.spec_fp,
        "input_fingerprint": plan.input_fp,
        "shards": len(plan.shards),
        "shards_committed": len(rows),
        "rows": total("rows"),
        "rows_ok": total("rows_ok"),
        "rows_error": total("rows_error"),
        "prompt_tokens": total("prompt_tokens"),
        "completion_tokens": total("completion_tokens"),
        "started": started,
        "finished": finished,
        "seconds": finished - started,
        "failed_shards": plan.dead,
    }
    summary["completion_tokens_per_s"] = summary["completion_tokens"] / max(summary["seconds"], 1e-9)
    if plan.dead or len(rows) != len(plan.shards):
        raise JobFailed(f"{len(plan.shards) - len(rows)} of {len(plan.shards)} shards did not complete: "
                        + "; ".join(f"{k}: {v[-1] if v else '?'}" for k, v in list(plan.dead.items())[:5]))
    writer.write_success(fs, root, summary)
    return summary
