"""The driver: check the job, plan shards, start the queue and the replicas, watch, finish.

Everything that can be wrong with the spec, the model directory or the input is found before
Ray starts, a model loads or the output location is touched (:mod:`planning`; under ``ray job
submit`` also the paths, :mod:`paths`). Then the driver only coordinates: replicas pull shards
from the queue and publish their own output; the driver logs the absolute output location at the
start and the end, records each run in ``runs.json`` however it ends, and writes
``summary.parquet`` and ``_SUCCESS`` (last) at the end (:mod:`jobsummary`).

What the driver does when things go wrong:

- A replica process dies (SIGKILL, OOM killer, a crashing row): Ray restarts the actor, the
  driver returns its leases to the queue at once and submits ``run`` to the new process. If
  replicas keep dying without the queue handing out any work, the job fails (a replica that
  cannot even load the model would otherwise restart forever).
- A shard runs out of attempts (``execution.max_attempts``): it is replaced by up to
  :data:`SPLIT_WAYS` pieces with fresh attempts, recursively, so that a row that kills or hangs
  every attempt is cornered while the other rows complete. A single row that runs out of
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
- Storage that stays down after the retries (see :func:`writer.with_retries`): a replica's
  failed read or publish fails that attempt only; a failure in the driver ends the run with
  :class:`JobFailed`, leaving the output resumable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional

import ray

from batchgen import __version__
from batchgen.pipeline import jobsummary, raynet, writer
from batchgen.pipeline.paths import absolute_uri, check_job_paths
from batchgen.pipeline.planning import JobPlan, check_model, fingerprint_model, plan_job  # noqa: F401 (API)
from batchgen.pipeline.metrics import JobMetrics, ProgressLogger
from batchgen.pipeline.queue import create_queue
from batchgen.pipeline.raynet import replica_name
from batchgen.pipeline.faults import FAULTS_ENV, Faults
from batchgen.pipeline.replica import Replica, Task, output_table
from batchgen.pipeline.shards import Shard, read_shard, resolve_filesystem
from batchgen.pipeline.spec import JobSpec, SpecError  # noqa: F401 (callers catch it from here)
from batchgen.pipeline.tp_replica import TPReplicaGroup, replicas_that_fit

log = logging.getLogger("batchgen")

#: How many pieces a dead-lettered shard is split into (fewer when it has fewer rows).
SPLIT_WAYS = 8
#: Longest wait for in-flight shards after SIGTERM/SIGINT (also capped by lease_timeout_s).
STOP_GRACE_S = 60.0


class JobFailed(Exception):
    """The job ran but could not complete (a replica that cannot start, storage that stays down)."""


class JobStopped(JobFailed):
    """The run was stopped by a signal; the output is resumable. ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


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
    faults = os.environ.get(FAULTS_ENV) or None
    Faults.parse(faults)  # a typo in the test hook fails here, not in every replica
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

@dataclass
class _Split:
    """A planned shard that ran out of attempts and is being done in pieces."""

    shard: Shard
    open: dict[str, Shard] = field(default_factory=dict)  # queued pieces: queue id -> rows
    done: dict[str, dict] = field(default_factory=dict)  # committed pieces: queue id -> ack summary
    spent_attempts: int = 0  # attempts of pieces that were split again (and of the shard itself)


def _pieces(shard: Shard, root: Shard, ways: int) -> list[Shard]:
    """``shard`` (the planned shard ``root`` or a piece of it) cut into ``ways`` near-equal row
    ranges, named ``<root id>@<first>-<end>`` by rows relative to ``root``."""
    ways = min(ways, shard.num_rows)
    out, offset = [], shard.row_offset
    for k in range(ways):
        rows = shard.num_rows // ways + (1 if k < shard.num_rows % ways else 0)
        first = offset - root.row_offset
        out.append(replace(shard, shard_id=f"{root.shard_id}@{first}-{first + rows}", row_offset=offset,
                           num_rows=rows, row_start=root.row_start + first))
        offset += rows
    return out


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


class _Run:
    """One run over the shards still to do: the queue, the replicas and the watch loop."""

    def __init__(self, spec: JobSpec, plan: JobPlan, faults: Optional[str], progress_every_s: float,
                 on_stats: Optional[Callable[[dict], None]]) -> None:
        self.spec, self.plan, self.faults, self.on_stats = spec, plan, faults, on_stats
        self.fs, self.root = resolve_filesystem(spec.output.path)
        self.roots = {s.shard_id: s for s in plan.todo}
        self.splits: dict[str, _Split] = {}
        self.parts_committed = 0
        self.merged = 0
        self.metrics = JobMetrics(spec.name)
        # Cumulative over resumes: what earlier runs committed shows as done from the first line.
        self.progress = ProgressLogger(total_shards=len(plan.shards), done_before=len(plan.shards) - len(plan.todo),
                                       every_s=progress_every_s, total_rows=plan.rows_total,
                                       rows_before=plan.rows_total - sum(s.num_rows for s in plan.todo))
        self.stop_signal: Optional[int] = None
        self.stop_now = False
        self.stop_deadline = 0.0
        self.queue_closed = False
        self.queue: Optional[ray.actor.ActorHandle] = None
        self.replicas: list[Any] = []  # Replica actors, or TPReplicaGroups with tensor_parallel > 1
        self.names: list[str] = []
        self.tp = False

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> None:
        """Run every shard to a committed file, or raise JobStopped/JobFailed."""
        with _stop_signals(self._on_signal):
            try:
                self._start()
                self._watch()
            except ray.exceptions.RayActorError as e:  # replicas' deaths are handled in _poll_runs
                raise JobFailed(f"the shard queue actor died ({type(e).__name__}); committed shards are kept: "
                                "run the same command again to resume") from e
            finally:
                for r in self.replicas:
                    r.kill() if self.tp else ray.kill(r)
                if self.queue is not None:
                    ray.kill(self.queue)
                if not self.tp:  # a TP group's kill() waits for its ranks' names itself
                    raynet.wait_names_free(self.names)
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
        n, resources, threads = replica_layout(self.spec, len(self.plan.todo))
        # max_restarts=-1: a dead replica comes back; the queue's attempt limit bounds the retries.
        actor_opts = dict(max_restarts=-1, max_task_retries=0, **resources)
        # Replicas may run in another working directory: send them absolute local paths.
        spec_dict = self.spec.with_resolved_paths().model_dump(mode="json")
        self.names = [replica_name(self.spec.name, i) for i in range(n)]
        self.tp = self.spec.model.tensor_parallel > 1
        if self.tp:  # N rank actors per replica, in one placement group, restarted as a whole
            self.replicas = [TPReplicaGroup(spec_dict, queue_name, name, self.faults) for name in self.names]
            for g in self.replicas:
                g.start(wait=False)
        else:
            # Named as the dashboard and `ray list actors` show them (and as their metrics'
            # `replica` label); the driver's own namespace keeps two runs of one job apart.
            self.replicas = [ray.remote(Replica).options(name=name, **actor_opts)
                             .remote(spec_dict, queue_name, name, threads, self.faults) for name in self.names]
        self.runs: dict[Any, int] = {}
        self.alive: dict[Any, int] = {}  # TP followers' loops: they end only when their replica broke
        self.idle: set[int] = set()
        for i in range(n):
            self._submit(i)
        self.deaths_in_a_row, self.attempts_seen = 0, 0
        log.info("started %d replicas, each %s", n,
                 f"{self.spec.model.tensor_parallel} ranks in one placement group" if self.tp else resources)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only flags here: the watch loop does the Ray calls (a handler may interrupt one).
        if self.stop_signal is None:
            self.stop_signal = signum
            self.stop_deadline = time.monotonic() + min(STOP_GRACE_S, self.spec.execution.lease_timeout_s)
        else:
            self.stop_now = True

    def _watch(self) -> None:
        while True:
            self._poll_runs()
            if self.stop_signal is not None and not self.queue_closed:
                ray.get(self.queue.close.remote())
                self.queue_closed = True
                log.warning("%s: leasing stopped; waiting up to %.0fs for in-flight shards (signal again to "
                            "stop now)", signal.Signals(self.stop_signal).name,
                            max(0.0, self.stop_deadline - time.monotonic()))
            stats = ray.get(self.queue.stats.remote())
            if stats["dead"] and self.stop_signal is None:
                self._handle_dead()
                stats = ray.get(self.queue.stats.remote())
            self._collect_parts()
            self._report(stats)
            if self.stop_signal is not None:
                if not self.runs or self.stop_now or time.monotonic() >= self.stop_deadline:
                    self._report(ray.get(self.queue.stats.remote()), force=True)
                    return
                continue
            if stats["pending"] + stats["leased"] + stats["dead"] == 0 and not self.runs:
                self._report(stats, force=True)
                return
            if stats["pending"] and self.idle:  # new pieces after the replicas had run dry
                for i in sorted(self.idle):
                    self._submit(i)
                self.idle.clear()

    def _submit(self, i: int) -> None:
        """Submit replica ``i``'s run (and watch a fresh TP replica's followers)."""
        r = self.replicas[i]
        self.runs[r.run() if self.tp else r.run.remote()] = i
        if self.tp and not any(j == i for j in self.alive.values()):
            self.alive.update(dict.fromkeys(r.alive_refs(), i))

    def _poll_runs(self) -> None:
        """Wait up to a second for a replica's ``run`` to end, and deal with how it ended."""
        refs = list(self.runs) + list(self.alive)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0) if refs else ([], [])
        if not self.runs:
            time.sleep(0.2)
        for ref in ready:
            if self.tp:
                self._poll_tp(ref)
                continue
            i = self.runs.pop(ref)
            try:
                ray.get(ref)
                self.idle.add(i)
            except ray.exceptions.RayActorError as e:
                # The process died (SIGKILL, OOM, a crashing row). Ray restarts the actor; its
                # leases go back now rather than after the lease timeout. Only one run() per
                # replica is ever submitted, so no lease of the new process can be among them.
                released = ray.get(self.queue.release_replica.remote(self.names[i]))
                if "restarting" in str(e):
                    # run() was sent while Ray was still restarting the actor: not a new death.
                    log.info("%s is still restarting; submitting its run again", self.names[i])
                else:
                    log.warning("%s died (%s); %d shard(s) back to the queue", self.names[i],
                                type(e).__name__, released)
                    self._count_death(str(e))
                if released:
                    self.metrics.shard_failed(self.names[i])
                if self.stop_signal is None:
                    self.runs[self.replicas[i].run.remote()] = i
            except ray.exceptions.RayTaskError as e:
                raise JobFailed(f"{self.names[i]} failed: {e}") from None

    def _poll_tp(self, ref: Any) -> None:
        """A TP replica's run or follower loop ended: idle, or the whole replica is replaced."""
        is_run = ref in self.runs
        i = (self.runs if is_run else self.alive).pop(ref, None)
        if i is None:
            return  # a ref of an incarnation already replaced
        try:
            ray.get(ref)
            if is_run:
                self.idle.add(i)  # rank 0 found nothing left to lease
                return
            error = "a follower stopped serving"
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            error = str(e)  # a rank died, or the set-up / a collective failed (TPError)
        # Any rank down breaks the group: replace every rank, hand the leases back now.
        self.runs = {r: j for r, j in self.runs.items() if j != i}
        self.alive = {r: j for r, j in self.alive.items() if j != i}
        self.idle.discard(i)
        self.replicas[i].kill()
        released = ray.get(self.queue.release_replica.remote(self.names[i]))
        log.warning("%s: a rank failed (%s); replica restarted, %d shard(s) back to the queue", self.names[i],
                    error.splitlines()[0][:300] if error else "?", released)
        if released:
            self.metrics.shard_failed(self.names[i])
        self._count_death(error)
        if self.stop_signal is None:
            self.replicas[i].start(wait=False)
            self._submit(i)

    def _count_death(self, error: str) -> None:
        attempts = ray.get(self.queue.stats.remote())["attempts"]
        if attempts != self.attempts_seen:  # work was handed out since the last death
            self.attempts_seen, self.deaths_in_a_row = attempts, 0
        self.deaths_in_a_row += 1
        limit = max(10, 5 * len(self.replicas))
        if self.deaths_in_a_row > limit:
            raise JobFailed(f"replicas died {self.deaths_in_a_row} times in a row without taking any work "
                            f"(does the model fit the device?); last error: {error.splitlines()[0][:500]}")

    def _report(self, stats: dict, force: bool = False) -> None:
        self.metrics.queue(stats)
        # Committed pieces are not shards of the plan; merged shards are.
        shown = {**stats, "done": stats["done"] - self.parts_committed + self.merged}
        # Rows count as they finish (replicas report them with their heartbeats), not only
        # when their shard commits.
        totals = ray.get(self.queue.result_totals.remote(["rows", "completion_tokens"], in_flight=True))
        line = self.progress.update(shown, int(totals["rows"]), int(totals["completion_tokens"]), force=force)
        if line:
            log.info(line)
        if self.on_stats:
            self.on_stats(shown)

    # -- poison isolation --------------------------------------------------------------------

    def _handle_dead(self) -> None:
        """Split every dead-lettered shard or piece; settle single rows as error rows."""
        dead = ray.get(self.queue.dead_letters.remote())
        for qid, errors in dead.items():
            root_id = qid.split("@", 1)[0]
            split = self.splits.get(root_id)
            rows = split.open[qid] if split is not None else self.roots[root_id]
            if rows.num_rows == 1:
                self._settle_row(qid, root_id, rows, errors)
                continue
            pieces = _pieces(rows, self.roots[root_id], SPLIT_WAYS)
            try:
                ray.get(self.queue.requeue_dead.remote(qid, {p.shard_id: Task(p, root_id) for p in pieces}))
            except ValueError:
                continue  # a late ack committed it meanwhile: nothing to split
            if split is None:
                split = self.splits[root_id] = _Split(self.roots[root_id])
            split.open.pop(qid, None)
            split.open.update({p.shard_id: p for p in pieces})
            split.spent_attempts += len(errors)
            log.warning("%s failed %d attempts (last: %s); split into %d pieces to corner the failing rows",
                        qid, len(errors), errors[-1] if errors else "?", len(pieces))

    def _settle_row(self, qid: str, root_id: str, rows: Shard, errors: list[str]) -> None:
        """Write the single row ``rows`` as an error row and commit it in the queue."""
        message = f"failed {len(errors)} attempts: {errors[-1] if errors else 'no error recorded'}"
        spec = self.spec
        in_fs, _ = resolve_filesystem(rows.path)
        columns = [spec.input.id_column, *spec.input.keep_columns]
        table = writer.with_retries(in_fs, f"reading {rows.shard_id}", lambda: read_shard(rows, columns))
        out = output_table(spec, table, [message] * table.num_rows)
        summary = {"shard_id": qid, "input_file": rows.relpath, "row_start": rows.row_start, "rows": out.num_rows,
                   "rows_ok": 0, "rows_error": out.num_rows, "prompt_tokens": 0, "completion_tokens": 0,
                   "seconds": 0.0, "attempts": len(errors), "replica": "driver", "host": socket.gethostname()}
        try:
            # Claim it first: a late ack that wins the race keeps its own (good) output.
            ray.get(self.queue.settle_dead.remote(qid, summary))
        except ValueError:
            return
        log.warning("row %d of %s failed %d attempts; written as an error row (%s)", rows.row_start,
                    rows.relpath, len(errors), message)
        if qid == root_id:  # a planned one-row shard: no pieces to merge
            writer.publish_shard(self.fs, self.root, root_id, out, summary=summary)
        else:
            writer.publish_part(self.fs, self.root, root_id, qid, out, summary=summary)

    def _collect_parts(self) -> None:
        """Move committed pieces to their split; merge every split whose pieces are all done."""
        open_ids = [qid for split in self.splits.values() for qid in split.open]
        if not open_ids:
            return
        results = ray.get(self.queue.results_for.remote(open_ids))
        for qid, result in results.items():
            split = self.splits[qid.split("@", 1)[0]]
            split.open.pop(qid)
            split.done[qid] = result or {}
            self.parts_committed += 1
        for root_id, split in list(self.splits.items()):
            if not split.open:
                self._merge(split)
                del self.splits[root_id]

    def _merge(self, split: _Split) -> None:
        shard = split.shard
        order = sorted(split.done, key=lambda qid: int(qid.rsplit("@", 1)[1].split("-")[0]))
        acks = [split.done[qid] for qid in order]
        summary = {"shard_id": shard.shard_id, "input_file": shard.relpath, "row_start": shard.row_start,
                   "seconds": sum(float(a.get("seconds") or 0) for a in acks),
                   **_span(acks),
                   "attempts": split.spent_attempts + sum(int(a.get("attempts") or 0) for a in acks),
                   "replica": ",".join(sorted({str(a.get("replica")) for a in acks})),
                   "host": ",".join(sorted({str(a.get("host")) for a in acks}))}
        writer.merge_parts(self.fs, self.root, shard.shard_id, order, summary=summary)
        self.merged += 1
        log.info("%s: merged %d pieces", shard.shard_id, len(order))


def _span(acks: list[dict]) -> dict[str, float]:
    """The pieces' earliest start and latest finish (where they recorded them)."""
    span = {}
    for key, pick in (("started", min), ("finished", max)):
        times = [float(a[key]) for a in acks if a.get(key) is not None]
        if times:
            span[key] = pick(times)
    return span


# --------------------------------------------------------------------------------------- the end

def _finish(spec: JobSpec, plan: JobPlan, started: float, out_uri: Optional[str] = None) -> dict:
    fs, root = resolve_filesystem(spec.output.path)
    rows = writer.read_shard_summaries(fs, root, [s.shard_id for s in plan.shards])
    if plan.dead or len(rows) != len(plan.shards):
        missing = sorted({s.shard_id for s in plan.shards} - {r["shard_id"] for r in rows})
        raise JobFailed(f"{len(missing)} of {len(plan.shards)} shards did not complete "
                        f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    groups = {s.shard_id: list(s.row_groups) for s in plan.shards}
    for r in rows:  # replicas do not know the row groups; the plan does
        r.setdefault("row_groups", groups.get(r["shard_id"]))
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
