"""Supervising replicas: one interface for a one-process replica and a tensor-parallel group.

The driver keeps one ``run`` in flight per replica and watches it, plus, for a replica of
several processes, the refs that resolve only when one of them broke (a TP group's followers).
However a replica breaks (its process died, a rank failed), the same happens: its leases go back
to the queue at once, the death is counted (replicas that keep dying without taking any work
fail the job: a model that does not fit would otherwise restart forever), and unless the run is
stopping the replica comes back and gets a new ``run``. :class:`ReplicaHandle` says what differs:

- :class:`ActorReplica`: one Ray actor with ``max_restarts=-1``; Ray restarts a dead process by
  itself, so there is nothing to tear down and nothing to start; an exception raised by its
  ``run`` (a bug, not a death) fails the job.
- :class:`TPReplica`: a :class:`~batchgen.pipeline.tp_replica.TPReplicaGroup`; a lone restarted
  rank could never rejoin its group, so any failure kills every rank and starts them all anew.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import ray

from batchgen.pipeline import raynet
from batchgen.pipeline.errors import JobFailed
from batchgen.pipeline.metrics import JobMetrics
from batchgen.pipeline.replica import Replica
from batchgen.pipeline.tp_replica import TPReplicaGroup

log = logging.getLogger("batchgen")


class ReplicaHandle:
    """One replica as the driver sees it, however many processes it is."""

    name: str  # the name it leases under (its leases are released under it)

    def start(self) -> None:
        """Start its process(es) without waiting for them."""
        raise NotImplementedError

    def run(self) -> ray.ObjectRef:
        """Its run loop: resolves when the queue has nothing left for it (submit again for more)."""
        raise NotImplementedError

    def alive_refs(self) -> list[ray.ObjectRef]:
        """Refs that resolve only when the replica broke (even without an error)."""
        return []

    def broken_by(self, error: Exception) -> bool:
        """Whether ``error``, raised by one of its refs, means the replica broke (restart it)
        rather than a bug (fail the job)."""
        return isinstance(error, ray.exceptions.RayActorError)

    def still_restarting(self, error: Exception) -> bool:
        """Whether ``error`` only says that a run was sent while the replica was coming back."""
        return False

    def reset(self) -> None:
        """After a failure: make sure nothing of the broken incarnation runs on."""

    def revive(self) -> None:
        """After :meth:`reset`: bring the replica back."""

    def kill(self) -> None:
        """End it for good."""
        raise NotImplementedError

    def names_to_free(self) -> list[str]:
        """Actor names that :meth:`kill` may leave taken for a moment (a next run reuses them)."""
        return []


class ActorReplica(ReplicaHandle):
    """A one-process replica: a :class:`~batchgen.pipeline.replica.Replica` actor that Ray restarts."""

    def __init__(self, name: str, spec: dict, queue_name: str, torch_threads: int, faults: Optional[str],
                 resources: dict[str, Any]) -> None:
        self.name, self.resources = name, resources
        self.args = (spec, queue_name, name, torch_threads, faults)
        self.actor: Optional[ray.actor.ActorHandle] = None

    def start(self) -> None:
        # Named as the dashboard and `ray list actors` show them (and as their metrics' `replica`
        # label); the driver's own namespace keeps two runs of one job apart. max_restarts=-1: a
        # dead replica comes back; the queue's attempt limit bounds the retries.
        self.actor = (ray.remote(Replica).options(name=self.name, max_restarts=-1, max_task_retries=0,
                                                  **self.resources).remote(*self.args))

    def run(self) -> ray.ObjectRef:
        return self.actor.run.remote()

    def still_restarting(self, error: Exception) -> bool:
        return "restarting" in str(error)

    def kill(self) -> None:
        if self.actor is not None:
            ray.kill(self.actor)

    def names_to_free(self) -> list[str]:
        return [self.name]


class TPReplica(ReplicaHandle):
    """A tensor-parallel replica: its ranks live and die as one."""

    def __init__(self, group: TPReplicaGroup) -> None:
        self.group, self.name = group, group.name

    def start(self) -> None:
        self.group.start(wait=False)

    def run(self) -> ray.ObjectRef:
        return self.group.run()

    def alive_refs(self) -> list[ray.ObjectRef]:
        return self.group.alive_refs()

    def broken_by(self, error: Exception) -> bool:
        # A rank died, or the set-up / a collective failed (TPError): either way only new ranks help.
        return isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.RayTaskError))

    def reset(self) -> None:
        self.group.kill()

    def revive(self) -> None:
        self.group.start(wait=False)

    def kill(self) -> None:
        self.group.kill()  # waits for its ranks' names itself


class Supervisor:
    """The replicas of one run, each with its ``run`` in flight, restarted when they break."""

    def __init__(self, handles: list[ReplicaHandle], queue: ray.actor.ActorHandle, metrics: JobMetrics) -> None:
        self.handles, self.queue, self.metrics = handles, queue, metrics
        self.runs: dict[ray.ObjectRef, int] = {}  # each replica's run -> its index
        self.alive: dict[ray.ObjectRef, int] = {}  # refs that resolve only when their replica broke
        self.idle: set[int] = set()  # replicas whose run found nothing left to lease
        self.deaths_in_a_row, self.attempts_seen = 0, 0

    def start(self) -> None:
        """Start every replica and submit its run."""
        for h in self.handles:
            h.start()
        for i in range(len(self.handles)):
            self.submit(i)

    def submit(self, i: int) -> None:
        """Submit replica ``i``'s run (and watch a fresh incarnation's alive refs)."""
        h = self.handles[i]
        self.runs[h.run()] = i
        if not any(j == i for j in self.alive.values()):
            self.alive.update(dict.fromkeys(h.alive_refs(), i))

    def wake_idle(self) -> None:
        """Submit a run to every idle replica (new pieces appeared after they had run dry)."""
        for i in sorted(self.idle):
            self.submit(i)
        self.idle.clear()

    def poll(self, stopping: bool) -> None:
        """Wait up to a second for a run (or an alive ref) to end, and deal with how it ended;
        while ``stopping``, a broken replica is not brought back."""
        refs = list(self.runs) + list(self.alive)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0) if refs else ([], [])
        if not self.runs:
            time.sleep(0.2)
        for ref in ready:
            self._ended(ref, stopping)

    def _ended(self, ref: ray.ObjectRef, stopping: bool) -> None:
        is_run = ref in self.runs
        i = (self.runs if is_run else self.alive).pop(ref, None)
        if i is None:
            return  # a ref of an incarnation already replaced
        h = self.handles[i]
        try:
            ray.get(ref)
            if is_run:
                self.idle.add(i)  # it found nothing left to lease
                return
            error: Exception = RuntimeError("a follower stopped serving")
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            if not h.broken_by(e):
                raise JobFailed(f"{h.name} failed: {e}") from None
            error = e
        self._replace(i, error, stopping)

    def _replace(self, i: int, error: Exception, stopping: bool) -> None:
        """Replica ``i`` broke: its leases go back now, rather than after the lease timeout, and
        it comes back (unless the run is stopping) with a new run. Only one run per replica is
        ever in flight, so no lease of the new incarnation can be among those released."""
        h = self.handles[i]
        self.runs = {r: j for r, j in self.runs.items() if j != i}
        self.alive = {r: j for r, j in self.alive.items() if j != i}
        self.idle.discard(i)
        h.reset()
        released = ray.get(self.queue.release_replica.remote(h.name))
        text = str(error)
        if h.still_restarting(error):
            log.info("%s is still restarting; submitting its run again", h.name)
        else:
            log.warning("%s failed (%s: %s); %d shard(s) back to the queue", h.name, type(error).__name__,
                        text.splitlines()[0][:300] if text else "?", released)
            self._count_death(text)
        if released:
            self.metrics.shard_failed(h.name)
        if not stopping:
            h.revive()
            self.submit(i)

    def _count_death(self, error: str) -> None:
        attempts = ray.get(self.queue.stats.remote())["attempts"]
        if attempts != self.attempts_seen:  # work was handed out since the last death
            self.attempts_seen, self.deaths_in_a_row = attempts, 0
        self.deaths_in_a_row += 1
        limit = max(10, 5 * len(self.handles))
        if self.deaths_in_a_row > limit:
            first = error.splitlines()[0][:500] if error else "?"
            raise JobFailed(f"replicas died {self.deaths_in_a_row} times in a row without taking any work "
                            f"(does the model fit the device?); last error: {first}")

    def kill_all(self) -> None:
        """End every replica for good, and wait until their actor names are free again."""
        for h in self.handles:
            h.kill()
        raynet.wait_names_free([n for h in self.handles for n in h.names_to_free()])
