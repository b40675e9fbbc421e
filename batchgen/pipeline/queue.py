"""The shard queue: hands shards to replicas as SQS-style leases, from one Ray actor.

A replica `lease`s a shard, `heartbeat`s while it works (each beat pushes the deadline
`lease_timeout_s` ahead), then `ack`s with a result or `nack`s with an error. A lease that misses
its deadline expires and the shard goes back to the queue; every lease granted is one attempt,
and a shard whose attempts run out is dead-lettered with the error of each attempt. The driver
can then replace a dead shard with smaller sub-shards (`requeue_dead`) to corner a poison row,
or commit it with a result of its own (`settle_dead`: an error row for a single poison row).

Commit rule: a shard is done exactly once, by the first successful `ack`. An ack is accepted from
the shard's live lease, and also from an *expired* lease as long as nobody has finished the
shard yet: the work is done and worth keeping (GPU time is the expensive part). When that
happens the shard's newer lease, if any, is revoked: its `heartbeat` and `ack` answer False and
its holder must drop its work. Acks from a nacked, released, revoked or already-acked lease, and
acks for a shard that is done or was replaced, are refused. Since two attempts may both have
written output, the committed output is the one the accepted ack's `result` points to; writers
should name their files per attempt or write identical content.

Stopping: `close` makes every later `lease` answer None and `is_finished` True, while leases
already granted may still heartbeat and ack; replicas finish what they hold and then return.

`ShardQueue` is a plain class so tests can drive it in-process with a fake clock; the pipeline
runs it as a Ray actor (`create_queue`). Ray runs an actor's methods one at a time (default
max_concurrency=1), so the state needs no locks. Expiry is lazy: every call first expires what
is overdue (`reap`), so no timer thread is needed either.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import ray

ShardState = Literal["pending", "leased", "done", "dead", "replaced"]
LeaseState = Literal["live", "expired", "nacked", "released", "revoked", "acked"]


@dataclass(frozen=True)
class Lease:
    """What a replica gets from :meth:`ShardQueue.lease`: the work and the id to report on it."""

    lease_id: str
    shard_id: str
    payload: Any  # what the shard was queued with (the pipeline's Task)
    attempt: int  # counts from 1
    solo: bool  # the shard failed before, or replaces one that did: run it alone


@dataclass(eq=False)
class _Shard:
    shard_id: str
    payload: Any
    state: ShardState = "pending"
    attempts: int = 0
    # Failed before, or replaces a shard that did: it may take whatever runs beside it down too.
    suspect: bool = False
    errors: list[str] = field(default_factory=list)
    lease: _Lease | None = None  # the live lease while state == "leased"
    result: dict | None = None


@dataclass(eq=False)
class _Lease:
    lease_id: str
    # The shard object itself, not its id: if the id is later reused by requeue_dead, old leases
    # still point at the replaced object and cannot commit the new one.
    shard: _Shard
    replica_id: str
    attempt: int
    deadline: float
    state: LeaseState = "live"
    # What the holder reported with its last heartbeat (rows finished so far, tokens): progress
    # of work not yet committed, counted by result_totals(in_flight=True) while the lease lives.
    progress: dict | None = None


class ShardQueue:
    """Shards handed out as leases with deadlines, bounded attempts and a dead-letter list."""

    def __init__(
        self,
        items: Mapping[str, Any],
        max_attempts: int,
        lease_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Queue every `items` entry (shard_id -> opaque payload) in the given order.

        `max_attempts` bounds the leases granted per shard; `lease_timeout_s` is how long a lease
        lives without a heartbeat; `clock` returns seconds (injectable for tests).
        """
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
        if not lease_timeout_s > 0:
            raise ValueError(f"lease_timeout_s must be > 0, got {lease_timeout_s!r}")
        self._max_attempts = max_attempts
        self._timeout = float(lease_timeout_s)
        self._clock = clock
        self._shards: dict[str, _Shard] = {}
        self._pending: deque[_Shard] = deque()
        # Every lease ever granted, so that a late ack can still be matched to its shard.
        self._leases: dict[str, _Lease] = {}
        self._live: dict[str, _Lease] = {}
        self._leases_granted = 0
        self._replaced: dict[str, list[str]] = {}
        self._closed = False
        for shard_id, payload in items.items():
            self._add(shard_id, payload)

    # -- replica side ------------------------------------------------------------------------

    def lease(self, replica_id: str, shared: bool = False) -> Lease | None:
        """Lease the next pending shard to `replica_id`, or None if none is pending right now.

        `shared=True` says the replica already runs other shards: then only a shard that never
        failed (and does not replace one that did) is leased, so that a shard whose rows crash
        their process runs alone and cannot use up its neighbours' attempts.

        Returns a `Lease`, or None, which does not mean the job is over: leased shards may still
        come back; see `is_finished`.
        """
        self.reap()
        if self._closed or not self._pending:
            return None
        if shared:
            shard = next((s for s in self._pending if not s.suspect), None)
            if shard is None:
                return None
            self._pending.remove(shard)
        else:
            shard = self._pending.popleft()
        shard.attempts += 1
        self._leases_granted += 1
        lease = _Lease(
            lease_id=f"lease-{self._leases_granted}",
            shard=shard,
            replica_id=replica_id,
            attempt=shard.attempts,
            deadline=self._clock() + self._timeout,
        )
        shard.state, shard.lease = "leased", lease
        self._leases[lease.lease_id] = lease
        self._live[lease.lease_id] = lease
        return Lease(lease.lease_id, shard.shard_id, shard.payload, lease.attempt, shard.suspect)

    def heartbeat(self, lease_id: str, progress: Mapping[str, float] | None = None) -> bool:
        """Extend a live lease by `lease_timeout_s`, recording the holder's `progress` (numeric
        counts of the work so far, e.g. rows finished); False means it is lost: stop the work."""
        self.reap()
        lease = self._live.get(lease_id)
        if lease is None:
            return False
        lease.deadline = self._clock() + self._timeout
        if progress is not None:
            lease.progress = dict(progress)
        return True

    def ack(self, lease_id: str, result: dict) -> bool:
        """Commit the shard held by `lease_id` with `result`; True only for the winning ack.

        False means the work must not be counted: the shard was finished by someone else,
        replaced, or the lease was given back (nack / release / revoked / acked before).
        """
        self.reap()
        lease = self._leases.get(lease_id)
        if lease is None or lease.state not in ("live", "expired"):
            return False
        shard = lease.shard
        if shard.state in ("done", "replaced"):
            return False
        if shard.state == "pending":
            self._pending.remove(shard)
        elif shard.state == "leased" and shard.lease is not lease:
            self._end(shard.lease, "revoked")
        if lease.state == "live":
            self._end(lease, "acked")
        else:
            lease.state = "acked"
        shard.state, shard.lease, shard.result = "done", None, result
        return True

    def nack(self, lease_id: str, error: str) -> bool:
        """Give the shard back now as a failed attempt with `error`; False if the lease is lost."""
        self.reap()
        lease = self._live.get(lease_id)
        if lease is None:
            return False
        self._fail(lease, "nacked", error)
        return True

    # -- driver side -------------------------------------------------------------------------

    def release_replica(self, replica_id: str) -> int:
        """A replica died: return all its live leases at once, each a failed attempt.

        Returns how many leases were released.
        """
        self.reap()
        held = [lease for lease in self._live.values() if lease.replica_id == replica_id]
        for lease in held:
            self._fail(lease, "released", f"replica {replica_id} released (died or was stopped)")
        return len(held)

    def reap(self) -> int:
        """Expire every live lease past its deadline; returns how many expired."""
        now = self._clock()
        overdue = sorted(
            (lease for lease in self._live.values() if lease.deadline <= now),
            key=lambda lease: lease.deadline,
        )
        for lease in overdue:
            self._fail(lease, "expired", f"lease expired: no heartbeat for {self._timeout:g}s")
        return len(overdue)

    def requeue_dead(self, shard_id: str, replacements: Mapping[str, Any]) -> None:
        """Replace the dead-lettered `shard_id` by `replacements` (new shard_id -> payload).

        The new shards are queued at the back with fresh attempt counts. A replacement may reuse
        `shard_id` itself (retry the same shard from scratch); other ids must be new. The old
        shard leaves the totals, and late acks for it are refused. Raises ValueError otherwise.
        """
        shard = self._shards.get(shard_id)
        if shard is None:
            raise ValueError(f"requeue_dead: unknown shard {shard_id!r}")
        if shard.state != "dead":
            raise ValueError(f"requeue_dead: shard {shard_id!r} is {shard.state}, not dead-lettered")
        if not replacements:
            raise ValueError(f"requeue_dead: shard {shard_id!r} needs at least one replacement")
        clashes = sorted(sid for sid in replacements if sid != shard_id and sid in self._shards)
        if clashes:
            raise ValueError(f"requeue_dead: replacement ids already in the queue: {clashes}")
        shard.state = "replaced"
        del self._shards[shard_id]
        self._replaced[shard_id] = list(replacements)
        for new_id, payload in replacements.items():
            self._add(new_id, payload)
            self._shards[new_id].suspect = True

    def settle_dead(self, shard_id: str, result: dict) -> None:
        """Commit the dead-lettered `shard_id` with a `result` the driver produced itself (for a
        single poison row: an error row), so that it counts as done. Raises ValueError otherwise."""
        shard = self._shards.get(shard_id)
        if shard is None or shard.state != "dead":
            state = "unknown" if shard is None else shard.state
            raise ValueError(f"settle_dead: shard {shard_id!r} is {state}, not dead-lettered")
        shard.state, shard.result = "done", result

    def dead_letters(self) -> dict[str, list[str]]:
        """Dead-lettered shards: shard_id -> the error of each failed attempt, in order."""
        self.reap()
        return {sid: list(s.errors) for sid, s in self._shards.items() if s.state == "dead"}

    def replaced(self) -> dict[str, list[str]]:
        """Shards taken out by `requeue_dead`: old shard_id -> the ids that replaced it."""
        return {sid: list(new) for sid, new in self._replaced.items()}

    def close(self) -> None:
        """Grant no more leases (graceful stop): live leases may still heartbeat and ack."""
        self._closed = True

    def results_for(self, shard_ids: Sequence[str]) -> dict[str, dict]:
        """The results of those of `shard_ids` that are committed (cheaper than `results`)."""
        self.reap()
        found = (self._shards.get(sid) for sid in shard_ids)
        return {s.shard_id: s.result for s in found if s is not None and s.state == "done"}

    def results(self) -> dict[str, dict]:
        """Committed shards: shard_id -> the result of the winning ack."""
        self.reap()
        return {sid: s.result for sid, s in self._shards.items() if s.state == "done"}

    def result_totals(self, keys: Sequence[str], in_flight: bool = False) -> dict[str, float]:
        """Sum the numeric `keys` of all committed results (absent keys count 0): cheap progress
        figures such as rows and tokens, without shipping every result to the caller. With
        `in_flight`, the progress that live leases reported by heartbeat is added (a lease that
        is lost takes its rows with it: they will be done again)."""
        self.reap()
        totals = dict.fromkeys(keys, 0)
        sources = [s.result for s in self._shards.values() if s.state == "done"]
        if in_flight:
            sources += [lease.progress for lease in self._live.values()]
        for source in sources:
            if isinstance(source, Mapping):
                for key in keys:
                    value = source.get(key, 0)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        totals[key] += value
        return totals

    def stats(self) -> dict[str, int]:
        """Counts: total (current shards), pending, leased, done, dead, replaced, and attempts
        (leases granted so far, all shards)."""
        self.reap()
        counts = {"pending": 0, "leased": 0, "done": 0, "dead": 0}
        for shard in self._shards.values():
            counts[shard.state] += 1
        return {
            "total": len(self._shards),
            **counts,
            "replaced": len(self._replaced),
            "attempts": self._leases_granted,
        }

    def is_finished(self) -> bool:
        """True when nothing is pending or leased (every shard is done or dead), or once the
        queue is closed: then nothing more will be leased, so a replica can stop asking."""
        self.reap()
        return self._closed or (not self._pending and not self._live)

    # -- internals ---------------------------------------------------------------------------

    def _add(self, shard_id: str, payload: Any) -> None:
        if not isinstance(shard_id, str) or not shard_id:
            raise ValueError(f"shard ids must be non-empty strings, got {shard_id!r}")
        if shard_id in self._shards:
            raise ValueError(f"duplicate shard id {shard_id!r}")
        shard = _Shard(shard_id, payload)
        self._shards[shard_id] = shard
        self._pending.append(shard)

    def _end(self, lease: _Lease, state: LeaseState) -> None:
        """Take a live lease out of service."""
        del self._live[lease.lease_id]
        lease.state = state
        lease.shard.lease = None

    def _fail(self, lease: _Lease, state: LeaseState, error: str) -> None:
        """End a live lease as a failed attempt: requeue its shard, or dead-letter it."""
        self._end(lease, state)
        shard = lease.shard
        shard.errors.append(f"attempt {lease.attempt} on {lease.replica_id}: {error}")
        shard.suspect = True
        if shard.attempts >= self._max_attempts:
            shard.state = "dead"
        else:
            shard.state = "pending"
            self._pending.append(shard)


# num_cpus=0: the queue is bookkeeping and must never wait for, or take, a slot a replica needs.
# max_restarts=0: its state lives only in memory, so a restarted queue would be an empty one;
# the driver owns it and fails the run (to be resumed from committed output) if it dies.
ShardQueueActor = ray.remote(num_cpus=0, max_restarts=0)(ShardQueue)


def create_queue(
    items: Mapping[str, Any],
    max_attempts: int,
    lease_timeout_s: float,
    name: str | None = None,
) -> ray.actor.ActorHandle:
    """Start a `ShardQueue` actor (needs a connected Ray); `name` makes it findable with
    `ray.get_actor(name)` from replicas."""
    actor_cls = ShardQueueActor.options(name=name) if name else ShardQueueActor
    return actor_cls.remote(dict(items), max_attempts, lease_timeout_s)
