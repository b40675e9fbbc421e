"""The driver: check the job, plan shards, start the queue and the replicas, watch, finish.

Everything that can be wrong with the spec, the model directory or the input is found before
Ray starts, a model loads or the output location is touched (:mod:`planning`; under ``ray job
submit`` also the paths, :mod:`paths`). Then the driver only coordinates: replicas pull shards
from the queue and publish their own output; the driver logs the absolute output location at the
start and the end, records each run in ``runs.json`` however it ends, and writes
``summary.parquet`` and ``_SUCCESS`` (last) at the end (:mod:`jobsummary`).

What the driver does when things go wrong:

- A replica process dies (SIGKILL, OOM killer, a crashing row; for a tensor-parallel replica,
  any of its ranks): the driver returns its leases to the queue at once and submits ``run`` to
  the replica's next incarnation (:mod:`supervise`). If replicas keep dying without the queue
  handing out any work, the job fails (a replica that cannot even load the model would
  otherwise restart forever).
- A shard runs out of attempts (``execution.max_attempts``): it is replaced by up to
  :data:`~batchgen.pipeline.splitting.SPLIT_WAYS` pieces with fresh attempts, recursively, so
  that a row that kills or hangs every attempt is cornered while the other rows complete
  (:mod:`splitting`). A single row that runs out of
  attempts is written as an error row (``failed N attempts: <last error>``). Pieces are published
  under ``parts/<shard_id>/`` and merged into ``shards/<shard_id>.parquet`` in one atomic write
  once all are done, so a shard is still committed exactly when its one file exists.
- SIGTERM / SIGINT: no more shards are leased; in-flight ones get :data:`STOP_GRACE_S` seconds
  (at most ``lease_timeout_s``) to finish, a second signal stops at once. The output stays
  resumable (no ``_SUCCESS``) and :class:`JobStopped` says how to go on.
- The driver itself dies: a local Ray's GCS and raylet die with it and its workers exit within
  seconds; a cluster ends the job's actors (none is detached). A replica may still publish a
  shard meanwhile: the same file, atomically, with the rows a new run would write. Running the
  same command again resumes: committed shards are skipped, parts of unmerged shards are
  discarded and the rest is redone.
- Storage that stays down after the retries (see :func:`storage.with_retries`): a replica's
  failed read or publish fails that attempt only; a failure in the driver ends the run with
  :class:`JobFailed`, leaving the output resumable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Optional

import ray

from batchgen import __version__
from batchgen.pipeline import jobsummary, raynet, writer
from batchgen.pipeline.errors import JobFailed, JobStopped
from batchgen.pipeline.metrics import JobMetrics, ProgressLogger, RunProgress
from batchgen.pipeline.paths import absolute_uri, check_job_paths
from batchgen.pipeline.planning import JobPlan, check_model, fingerprint_model, plan_job  # noqa: F401 (API)
from batchgen.pipeline.queue import create_queue
from batchgen.pipeline.raynet import replica_name
from batchgen.pipeline.replica import Task, fault_hook_env, load_test_hooks
from batchgen.pipeline.spec import JobSpec, SpecError  # noqa: F401 (callers catch it from here)
from batchgen.pipeline.splitting import Splitter
from batchgen.pipeline.storage import resolve_filesystem
from batchgen.pipeline.supervise import ActorReplica, ReplicaHandle, Supervisor, TPReplica
from batchgen.pipeline.tp_replica import TPReplicaGroup, replicas_that_fit

log = logging.getLogger("batchgen")

#: Longest wait for in-flight shards after SIGTERM/SIGINT (also capped by lease_timeout_s).
STOP_GRACE_S = 60.0


def init_ray(address: Optional[str] = None, dashboard: bool = True) -> None:
    """Join a cluster (``address``, or ``RAY_ADDRESS`` as ``ray job submit`` sets it), or start a
    private local Ray bound to 127.0.0.1, even beside a local head (see :func:`raynet.connect`).

    Raises:
        JobFailed: the cluster cannot be reached (not a storage error, though Ray's
            ConnectionError is an OSError).
    """
    try:
        raynet.connect(address, dashboard)
    except ConnectionError as exc:  # incl. TimeoutError
        raise JobFailed(str(exc)) from exc


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
    if tp > 1:  # the ranks of one replica share a node (tp_replica packs them)
        fit = max(1, replicas_that_fit(tp, use_gpu=bool(gpus)))
    wanted = fit if spec.execution.replicas == "auto" else spec.execution.replicas
    n = max(1, min(wanted, num_shards))
    if not gpus and tp == 1:
        # Fewer replicas than cores: share each node's cores out, so that one replica on a
        # laptop uses all of them instead of one (a replica cannot span nodes).
        nodes = [int(nd["Resources"].get("CPU", 0)) for nd in ray.nodes() if nd.get("Alive")]
        nodes = [c for c in nodes if c > 0] or [cpus]
        threads = max(1, min(nodes) // -(-n // len(nodes)))
        resources = {"num_cpus": threads}
    return n, resources, threads


def run_job(spec: JobSpec, *, address: Optional[str] = None, dashboard: bool = True,
            progress_every_s: float = 10.0, on_stats: Optional[Callable[[dict], None]] = None) -> dict:
    """Run a whole job; return the ``_SUCCESS`` summary.

    Raises:
        SpecError: the spec, model or input is invalid (nothing was written).
        JobStopped: SIGTERM/SIGINT stopped it; run it again to resume.
        JobFailed: it cannot finish.
    """
    started = time.time()
    faults = fault_hook_env()
    load_test_hooks(faults, "the driver")  # says so loudly; a typo in it fails here, not in every replica
    check_job_paths(spec)  # under `ray job submit`: no results inside Ray's temporary working dir
    out_uri = absolute_uri(spec.output.path)
    log.info("job %s: output %s", spec.name, out_uri)
    on_cluster = bool(address or os.environ.get("RAY_ADDRESS"))
    # On a cluster the model may live only on the GPU nodes: check it here only if it is here.
    try:
        plan = plan_job(spec, model_check=not on_cluster or os.path.exists(spec.model.path))
        log.info("job %s: %d shards (%d rows), %d already committed", spec.name, len(plan.shards),
                 plan.rows_total, len(plan.shards) - len(plan.todo))
        if plan.todo:
            status = "failed"
            try:
                init_ray(address, dashboard)
                _Run(spec, plan, faults, progress_every_s, on_stats).run()
                status = "done"
            except JobStopped:
                status = "stopped"
                raise
            finally:
                _record_run(spec, plan, started, status)
        summary = _finish(spec, plan, started, out_uri)
        log.info("job %s: complete, results in %s", spec.name, out_uri)
        return summary
    except OSError as exc:
        # Storage that stays down (retries spent) in the driver: nothing committed is lost.
        raise JobFailed(f"storage error: {exc}; the output is resumable: run the same command again "
                        "once storage is reachable") from exc


def _record_run(spec: JobSpec, plan: JobPlan, started: float, status: str) -> None:
    """Append this run's record (the shards it committed) to ``runs.json``; never raises for
    storage, so that the run's own outcome is what the caller sees."""
    fs, root = resolve_filesystem(spec.output.path)
    try:
        new = {s.shard_id for s in plan.todo}
        rows = writer.read_shard_summaries(fs, root, new)
        jobsummary.append_run(fs, root, jobsummary.run_record(started, time.time(), status, rows))
    except OSError as exc:
        log.warning("could not record this run in %s: %s", writer.RUNS, exc)


# --------------------------------------------------------------------------------------- the run

@contextlib.contextmanager
def _stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for SIGTERM and SIGINT while the block runs (main thread only; Ray's own
    SIGTERM handler, set by ray.init, would exit without cleaning up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _replicas(spec: JobSpec, queue_name: str, n: int, resources: dict[str, float], threads: int,
              faults: Optional[str]) -> list[ReplicaHandle]:
    """The run's ``n`` replicas (not started): one actor each, or one group of ranks each."""
    # Replicas may run in another working directory: send them absolute local paths.
    spec_dict = spec.with_resolved_paths().model_dump(mode="json")
    names = [replica_name(spec.name, i) for i in range(n)]
    if spec.model.tensor_parallel > 1:  # N rank actors per replica, in one placement group
        return [TPReplica(TPReplicaGroup(spec_dict, queue_name, name, faults)) for name in names]
    return [ActorReplica(name, spec_dict, queue_name, threads, faults, resources) for name in names]


class _Run:
    """One run over the shards still to do: the queue, the replicas (:class:`Supervisor`), the
    splits of poison shards (:class:`Splitter`), progress (:class:`RunProgress`) and the signals."""

    def __init__(self, spec: JobSpec, plan: JobPlan, faults: Optional[str], progress_every_s: float,
                 on_stats: Optional[Callable[[dict], None]]) -> None:
        self.spec, self.plan, self.faults = spec, plan, faults
        self.fs, self.root = resolve_filesystem(spec.output.path)
        self.metrics = JobMetrics(spec.name)
        # Cumulative over resumes: what earlier runs committed shows as done from the first line.
        self.progress = RunProgress(self.metrics, ProgressLogger(
            total_shards=len(plan.shards), done_before=len(plan.shards) - len(plan.todo), every_s=progress_every_s,
            total_rows=plan.rows_total, rows_before=plan.rows_total - sum(s.num_rows for s in plan.todo)), on_stats)
        self.stop_signal: Optional[int] = None
        self.stop_now = False
        self.stop_deadline = 0.0
        self.queue_closed = False
        self.queue: Optional[ray.actor.ActorHandle] = None
        self.replicas: Optional[Supervisor] = None
        self.splitter: Optional[Splitter] = None

    def run(self) -> None:
        """Run every shard to a committed file, or raise JobStopped/JobFailed."""
        with _stop_signals(self._on_signal):
            try:
                self._start()
                self._watch()
            except ray.exceptions.RayActorError as e:  # replicas' deaths are handled by the Supervisor
                raise JobFailed(f"the shard queue actor died ({type(e).__name__}); committed shards are kept: "
                                "run the same command again to resume") from e
            finally:
                if self.replicas is not None:
                    self.replicas.kill_all()
                if self.queue is not None:
                    ray.kill(self.queue)
        if self.stop_signal is not None:
            done = len(writer.committed_shards(self.fs, self.root) & {s.shard_id for s in self.plan.shards})
            name = signal.Signals(self.stop_signal).name
            raise JobStopped(self.stop_signal, f"stopped by {name}: {done} of {len(self.plan.shards)} shards are "
                                               f"committed in {self.spec.output.path}; run the same command again "
                                               "to resume (committed shards are kept, the rest is redone)")

    def _start(self) -> None:
        ex = self.spec.execution
        # A unique name: replicas (in every incarnation) look the queue up by it.
        queue_name = f"batchgen-queue-{self.spec.name}-{uuid.uuid4().hex[:12]}"
        self.queue = create_queue({s.shard_id: Task(s, s.shard_id) for s in self.plan.todo},
                                  ex.max_attempts, ex.lease_timeout_s, name=queue_name)
        self.splitter = Splitter(self.spec, self.queue, self.fs, self.root, {s.shard_id: s for s in self.plan.todo})
        n, resources, threads = replica_layout(self.spec, len(self.plan.todo))
        handles = _replicas(self.spec, queue_name, n, resources, threads, self.faults)
        self.replicas = Supervisor(handles, self.queue, self.metrics)
        self.replicas.start()
        tp = self.spec.model.tensor_parallel
        log.info("started %d replicas, each %s", n, f"{tp} ranks in one placement group" if tp > 1 else resources)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only flags here: the watch loop does the Ray calls (a handler may interrupt one).
        if self.stop_signal is None:
            self.stop_signal = signum
            self.stop_deadline = time.monotonic() + min(STOP_GRACE_S, self.spec.execution.lease_timeout_s)
        else:
            self.stop_now = True

    def _watch(self) -> None:
        replicas, splitter = self.replicas, self.splitter
        while True:
            replicas.poll(stopping=self.stop_signal is not None)
            if self.stop_signal is not None and not self.queue_closed:
                ray.get(self.queue.close.remote())
                self.queue_closed = True
                log.warning("%s: leasing stopped; waiting up to %.0fs for in-flight shards (signal again to "
                            "stop now)", signal.Signals(self.stop_signal).name,
                            max(0.0, self.stop_deadline - time.monotonic()))
            stats = ray.get(self.queue.stats.remote())
            if stats["dead"] and self.stop_signal is None:
                splitter.handle_dead()
                stats = ray.get(self.queue.stats.remote())
            splitter.collect_parts()
            self._report(stats)
            if self.stop_signal is not None:
                if not replicas.runs or self.stop_now or time.monotonic() >= self.stop_deadline:
                    self._report(ray.get(self.queue.stats.remote()), force=True)
                    return
                continue
            if stats["pending"] + stats["leased"] + stats["dead"] == 0 and not replicas.runs:
                self._report(stats, force=True)
                return
            if stats["pending"] and replicas.idle:  # new pieces after the replicas had run dry
                replicas.wake_idle()

    def _report(self, stats: dict, force: bool = False) -> None:
        # Committed pieces are not shards of the plan; merged shards are.
        shown = {**stats, "done": stats["done"] - self.splitter.parts_committed + self.splitter.merged}
        # Rows count as they finish (replicas report them with their heartbeats), not only
        # when their shard commits.
        totals = ray.get(self.queue.result_totals.remote(["rows", "completion_tokens"], in_flight=True))
        self.progress.report(stats, shown, int(totals["rows"]), int(totals["completion_tokens"]), force)


# --------------------------------------------------------------------------------------- the end

def _finish(spec: JobSpec, plan: JobPlan, started: float, out_uri: Optional[str] = None) -> dict:
    fs, root = resolve_filesystem(spec.output.path)
    rows = writer.read_shard_summaries(fs, root, [s.shard_id for s in plan.shards])
    if plan.dead or len(rows) != len(plan.shards):
        missing = sorted({s.shard_id for s in plan.shards} - {r.shard_id for r in rows})
        raise JobFailed(f"{len(missing)} of {len(plan.shards)} shards did not complete "
                        f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    groups = {s.shard_id: list(s.row_groups) for s in plan.shards}
    for r in rows:  # replicas do not know the row groups; the plan does
        if r.row_groups is None:
            r.row_groups = groups.get(r.shard_id)
    base = {
        "name": spec.name,
        "output": out_uri or absolute_uri(spec.output.path),
        "spec_fingerprint": plan.spec_fp,
        "input_fingerprint": plan.input_fp,
        "model_fingerprint": None if plan.model_fp is None else plan.model_fp.get("digest"),
        "batchgen_version": __version__,
        "shards": len(plan.shards),
        "shards_committed": len(rows),
        "failed_shards": plan.dead,
    }
    summary = jobsummary.success_summary(base, rows, jobsummary.read_runs(fs, root), started)
    writer.write_summary(fs, root, rows)
    removed = writer.remove_leftovers(fs, root)
    if removed:
        log.info("removed %d temp file(s) left by killed writers", removed)
    writer.write_success(fs, root, summary)
    return summary
