"""A replica: one model replica that leases shards from the queue until there are none left.

:class:`Replica` is the Ray actor around a :class:`~batchgen.pipeline.worker.ShardWorker` (which
turns a shard into an output table): lease, work, heartbeat, publish, ack.

Failure handling, from the smallest blast radius up:

- A poison row, or a row whose generation raises, becomes an error row in the worker (see
  :mod:`batchgen.pipeline.worker`); a shard none of whose rows could run is nacked.
- A CUDA error (not an out-of-memory one) leaves the device unusable for this process: the
  attempt is nacked and the process exits, so that Ray starts a fresh one.
- A replica process that dies (SIGKILL, OOM killer, a row that crashes it) is restarted by Ray;
  the driver hands its leases back at once. A shard that failed once (and every piece of a
  split one) then runs alone, so a row that kills its process cannot use up the attempts of
  the shards beside it; one that keeps killing replicas runs out of attempts and the driver
  splits it (see :mod:`batchgen.pipeline.driver`).
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import pyarrow as pa

from batchgen.pipeline.exits import exit_replica
from batchgen.pipeline.records import ShardSummary
from batchgen.pipeline.shards import Shard
from batchgen.pipeline.spec import JobSpec
from batchgen.pipeline.storage import resolve_filesystem
from batchgen.pipeline.worker import LeaseLost, ShardRun, ShardWorker, build_llm
from batchgen.pipeline.writer import publish_part, publish_shard

if TYPE_CHECKING:
    from batchgen.pipeline.queue import Lease

#: Longest time between a running shard's heartbeats, which carry its finished rows to the queue.
PROGRESS_EVERY_S = 5.0
#: How often a replica publishes its tokens/s gauge (a local call; Ray exports it on its own cadence).
GAUGE_EVERY_S = 1.0

# --------------------------------------------------------------------------------------- the actor

@dataclass(frozen=True)
class Task:
    """A queue entry: run the rows of ``shard`` and publish them as the planned shard
    ``root_id``, or, when ``shard`` is a piece of it (after a split), as one of its parts."""

    shard: Shard
    root_id: str

    @property
    def is_part(self) -> bool:
        return self.shard.shard_id != self.root_id


def _host() -> str:
    return socket.gethostname()


@dataclass(eq=False)
class _Publishing:
    """A finished shard on the publishing thread, until it is acked (or nacked)."""

    future: Future
    lease: "Lease"
    summary: ShardSummary
    keep_going: Callable[[], None]  # its heartbeat: the lease lives until the ack


# =============================================================================== TEST-HOOK SEAM
# The only place where production code reaches the test hook (batchgen.pipeline.faults), and it
# does so only when the driver runs with BATCHGEN_FAULTS set: then the hook says loudly that it
# is active and wraps the replica's engine; otherwise nothing of it is even imported.

def fault_hook_env() -> Optional[str]:
    """The test hook's setting in this process's environment (``BATCHGEN_FAULTS``), or None."""
    return os.environ.get("BATCHGEN_FAULTS") or None


def load_test_hooks(raw: Optional[str], where: str) -> Optional[Any]:
    """The test hook described by ``raw`` (:class:`~batchgen.pipeline.faults.Faults`), announced
    with a loud WARNING naming ``where`` it runs; None when ``raw`` is empty.

    Raises:
        ValueError: ``raw`` is not a valid hook description.
    """
    if not raw:
        return None
    from batchgen.pipeline.faults import Faults

    faults = Faults.parse(raw)
    faults.announce(where)
    return faults

# =============================================================================== end of the seam


class Replica:
    """Ray actor: one model replica pulling shards from the queue until it is empty.

    The driver creates it with ``max_restarts=-1``: after a crash Ray runs ``__init__`` again in
    a new process and the driver submits ``run`` again. The queue is found by its actor name
    in each incarnation, so nothing but plain values has to be kept for restarts.
    """

    def __init__(self, spec: dict, queue_name: str, replica_id: str, torch_threads: Optional[int] = None,
                 faults: Optional[str] = None) -> None:
        import ray
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.spec = JobSpec.model_validate(spec)
        self.queue = ray.get_actor(queue_name)
        self.replica_id = replica_id
        self.faults = load_test_hooks(faults, f"replica {replica_id} (pid {os.getpid()})")
        from batchgen.pipeline.metrics import TokenRate

        self.worker: Optional[ShardWorker] = None
        self._rate = TokenRate()
        self._tokens_seen = 0  # worker.tokens_out already added to _rate
        self._gauge_at = 0.0
        # One thread: shards are published in the order they finish, one at a time.
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchgen-publish")
        self._publishing: list[_Publishing] = []

    def ready(self) -> str:
        return f"{self.replica_id}@{_host()} pid {os.getpid()}"

    def _fault(self, point: str) -> None:
        """The test hook's fault at ``point`` (``load``, ``publish``), when it is active."""
        if self.faults is not None:
            self.faults.at(point)

    def _engine(self, llm: Any) -> Any:
        """``llm``, wrapped by the test hook when it is active."""
        return llm if self.faults is None else self.faults.wrap(llm)

    def run(self) -> dict:
        """Lease, process, publish and ack shards until the queue has nothing left (or is closed).

        The next shard is leased as soon as the engine has admitted every row it holds, so its
        rows fill the slots that the current shards' last rows leave (see :class:`ShardWorker`).
        Finished shards are published on a background thread: a slow object store (a PUT that
        retries for a minute) neither stalls the engine nor starves the heartbeats of the
        shards still running.
        """
        import ray

        from batchgen.pipeline.metrics import JobMetrics

        if self.worker is None:
            self._fault("load")
            self.worker = ShardWorker(self.spec, self._engine(build_llm(self.spec)))
        worker = self.worker
        metrics = JobMetrics(self.spec.name)
        done = 0
        next_ask = 0.0  # when the queue had nothing, ask again only after a pause, not every step
        while True:
            done += self._collect_published(metrics, wait_s=0.0 if worker.inflight else 0.2)
            if worker.wants_more() and (not worker.inflight or time.monotonic() >= next_ask):
                # With shards in flight, ask only for shards that never failed (see ShardQueue.lease).
                lease = ray.get(self.queue.lease.remote(self.replica_id, bool(worker.inflight)))
                if lease is not None:
                    self._start(lease, metrics)
                    continue
                if not worker.inflight:
                    if self._publishing:
                        continue  # our own leases are still open: the queue cannot be finished
                    if ray.get(self.queue.is_finished.remote()):
                        self._update_rate(metrics, force=True)  # a job shorter than GAUGE_EVERY_S too
                        return {"replica": self.replica_id, "shards": done}
                    time.sleep(0.5)  # others hold leases that may still come back
                    continue
                next_ask = time.monotonic() + 0.5
            if not worker.inflight:
                continue
            try:
                for run in list(worker.inflight):
                    try:
                        run.keep_going()
                    except LeaseLost:
                        worker.drop(run)
                finished = worker.step()
            except Exception as e:  # noqa: BLE001 - a CUDA error (others are the rows'): start afresh
                for run in worker.inflight:
                    self._fail(run.context, e, metrics)
                exit_replica(f"{type(e).__name__}: {e}; this process's device state is not trusted any more")
            for run in finished:
                self._complete(run, metrics)
            self._update_rate(metrics)

    def _update_rate(self, metrics: Any, force: bool = False) -> None:
        """Feed the rows that finished into the replica's tokens/s; publish it every few seconds."""
        tokens = self.worker.tokens_out
        if tokens != self._tokens_seen:
            self._rate.add(tokens - self._tokens_seen)
            self._tokens_seen = tokens
        now = time.monotonic()
        if force or now - self._gauge_at >= GAUGE_EVERY_S:
            self._gauge_at = now
            rate = self._rate.rate()
            if rate is not None:
                metrics.replica_throughput(self.replica_id, rate)

    def _start(self, lease: "Lease", metrics: Any) -> None:
        import ray

        shard = lease.payload.shard
        last_beat = time.monotonic()
        # Heartbeats also carry the rows finished so far (the driver's progress line counts them
        # before the shard commits), so they come at least every PROGRESS_EVERY_S.
        every = min(self.spec.execution.heartbeat_s, PROGRESS_EVERY_S)
        started: list[ShardRun] = []

        def keep_going() -> None:
            nonlocal last_beat
            if time.monotonic() - last_beat >= every:
                last_beat = time.monotonic()
                progress = started[0].progress() if started else None
                if not ray.get(self.queue.heartbeat.remote(lease.lease_id, progress)):
                    raise LeaseLost(shard.shard_id)

        self._rate.start()
        try:
            started.append(self.worker.start(shard, keep_going, context=lease, solo=lease.solo))
        except Exception as e:  # noqa: BLE001 - unreadable shard: this attempt fails
            self._fail(lease, e, metrics)

    def _complete(self, run: ShardRun, metrics: Any) -> None:
        """Hand a finished shard to the publishing thread (or nack it)."""
        lease, task = run.context, run.context.payload
        if isinstance(run.error, LeaseLost):
            return
        if run.error is not None:
            self._fail(lease, run.error, metrics)
            return
        try:
            table, counts = self.worker.finish(run)
        except Exception as e:  # noqa: BLE001 - any failure of an attempt goes back to the queue
            self._fail(lease, e, metrics)
            return
        summary = ShardSummary.for_shard(task.shard, **counts, attempts=lease.attempt, replica=self.replica_id,
                                         host=_host())
        future = self._publisher.submit(self._publish, task, table, summary)
        self._publishing.append(_Publishing(future, lease, summary, run.keep_going))

    def _collect_published(self, metrics: Any, wait_s: float) -> int:
        """Ack the shards whose publishing ended (nack those where it failed); the number acked."""
        import ray

        if not self._publishing:
            return 0
        # A lease lives until its shard is acked: one publish retrying for minutes (the others
        # queue behind it on the one thread) must not let the leases of the others expire.
        for entry in self._publishing:
            try:
                entry.keep_going()
            except LeaseLost:
                pass  # someone else has it now; our ack will be refused or win as a late ack
        if wait_s:
            futures_wait([e.future for e in self._publishing], timeout=wait_s, return_when=FIRST_COMPLETED)
        acked, still = 0, []
        for entry in self._publishing:
            if not entry.future.done():
                still.append(entry)
                continue
            error = entry.future.exception()
            if error is not None:
                self._fail(entry.lease, error, metrics)
                continue
            # The queue keeps results as plain dicts (it sums their counts for progress).
            if not ray.get(self.queue.ack.remote(entry.lease.lease_id, entry.summary.to_dict())):
                continue
            acked += 1
            s = entry.summary
            metrics.shard_done(s.rows_ok, s.rows_error, s.prompt_tokens, s.completion_tokens, self.replica_id,
                               s.seconds)
        self._publishing = still
        return acked

    def _fail(self, lease: "Lease", error: BaseException, metrics: Any) -> None:
        import ray

        metrics.shard_failed(self.replica_id)
        ray.get(self.queue.nack.remote(lease.lease_id, f"{type(error).__name__}: {error}"))

    def _publish(self, task: Task, table: pa.Table, summary: ShardSummary) -> None:
        fs, root = resolve_filesystem(self.spec.output.path)
        hook = (lambda: self._fault("publish")) if self.faults is not None else None
        if task.is_part:
            publish_part(fs, root, task.root_id, task.shard.shard_id, table, summary=summary, before_commit=hook)
        else:
            publish_shard(fs, root, task.root_id, table, summary=summary, before_commit=hook)
