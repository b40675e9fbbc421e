"""The shard queue (leases, expiry, dead letters), job metrics and the progress line.

Most tests drive `ShardQueue` in-process with a hand-moved clock; the last ones run it as a
real Ray actor with two concurrent consumers, and record metrics from inside Ray.
"""

from __future__ import annotations

import os

# Ray binds its servers to every interface unless it runs in single-node mode; set before
# `import ray` so that, when this module imports Ray first, its constants see it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest
import ray
from ray._private import ray_constants

from batchgen.pipeline.metrics import JobMetrics, ProgressLogger, TokenRate, format_duration, format_progress
from batchgen.pipeline.queue import ShardQueue, create_queue


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_queue(n: int = 3, max_attempts: int = 3, timeout: float = 10.0) -> tuple[ShardQueue, Clock]:
    clock = Clock()
    items = {f"s{i}": {"index": i} for i in range(n)}
    return ShardQueue(items, max_attempts=max_attempts, lease_timeout_s=timeout, clock=clock), clock


# -- leases ------------------------------------------------------------------------------------


def test_leases_come_in_input_order_then_none() -> None:
    q, _ = make_queue(3)
    leases = [q.lease("r1"), q.lease("r2"), q.lease("r1")]
    assert [lease.shard_id for lease in leases] == ["s0", "s1", "s2"]
    assert [lease.payload for lease in leases] == [{"index": 0}, {"index": 1}, {"index": 2}]
    assert [lease.attempt for lease in leases] == [1, 1, 1]
    assert len({lease.lease_id for lease in leases}) == 3
    assert q.lease("r3") is None
    assert not q.is_finished()  # all leased, none done
    assert q.stats() == {
        "total": 3, "pending": 0, "leased": 3, "done": 0, "dead": 0, "replaced": 0, "attempts": 3,
    }


def test_heartbeat_extends_the_lease() -> None:
    q, clock = make_queue(1, timeout=10)
    lease = q.lease("r1")
    for _ in range(3):  # 24 s in all: well past the first deadline, alive thanks to the beats
        clock.advance(8)
        assert q.heartbeat(lease.lease_id)
    clock.advance(10)  # a full timeout without a beat
    assert not q.heartbeat(lease.lease_id)
    assert q.stats()["pending"] == 1


def test_expired_lease_is_released_with_the_next_attempt() -> None:
    q, clock = make_queue(1, timeout=10)
    first = q.lease("r1")
    clock.advance(9)
    assert q.lease("r2") is None  # not expired yet
    clock.advance(1)
    second = q.lease("r2")
    assert (second.shard_id, second.attempt) == ("s0", 2)
    assert second.lease_id != first.lease_id
    assert not q.heartbeat(first.lease_id)  # the old holder must abandon its work
    assert q.heartbeat(second.lease_id)
    assert q.stats()["attempts"] == 2


def test_reap_expires_overdue_leases_without_other_calls() -> None:
    q, clock = make_queue(2, timeout=5)
    q.lease("r1")
    clock.advance(3)
    q.lease("r1")
    clock.advance(2.5)  # only the first is overdue
    assert q.reap() == 1
    assert q.reap() == 0
    assert q.stats()["pending"] == 1 and q.stats()["leased"] == 1


def test_late_ack_is_rejected_once_another_holder_acked() -> None:
    q, clock = make_queue(1, timeout=10)
    slow = q.lease("r1")
    clock.advance(11)
    fast = q.lease("r2")
    assert q.ack(fast.lease_id, {"by": "r2"})
    assert not q.ack(slow.lease_id, {"by": "r1"})
    assert q.results() == {"s0": {"by": "r2"}}


def test_late_ack_wins_when_nobody_finished_and_revokes_the_new_lease() -> None:
    q, clock = make_queue(1, timeout=10)
    slow = q.lease("r1")
    clock.advance(11)
    fresh = q.lease("r2")
    assert q.ack(slow.lease_id, {"by": "r1"})  # the work is done: keep it
    assert not q.heartbeat(fresh.lease_id)  # ... and tell the new holder to stop
    assert not q.ack(fresh.lease_id, {"by": "r2"})
    assert q.results() == {"s0": {"by": "r1"}}
    assert q.is_finished()


def test_late_ack_of_an_expired_lease_takes_the_shard_out_of_the_queue() -> None:
    q, clock = make_queue(1, timeout=10)
    slow = q.lease("r1")
    clock.advance(11)
    assert q.stats()["pending"] == 1  # expired, back in the queue
    assert q.ack(slow.lease_id, {"ok": True})
    assert q.lease("r2") is None  # not handed out again
    assert q.stats()["done"] == 1 and q.is_finished()


def test_double_ack_counts_once() -> None:
    q, _ = make_queue(1)
    lease = q.lease("r1")
    assert q.ack(lease.lease_id, {"n": 1})
    assert not q.ack(lease.lease_id, {"n": 2})
    assert q.results() == {"s0": {"n": 1}}
    assert not q.ack("lease-999", {}) and not q.heartbeat("lease-999")  # unknown ids


def test_nack_requeues_now_and_counts_an_attempt() -> None:
    q, _ = make_queue(2)
    lease = q.lease("r1")
    assert q.nack(lease.lease_id, "CUDA out of memory")
    assert not q.nack(lease.lease_id, "again")  # already given back
    assert not q.ack(lease.lease_id, {})  # a nacked attempt cannot commit
    assert q.lease("r1").shard_id == "s1"  # requeued at the back
    retry = q.lease("r1")
    assert (retry.shard_id, retry.attempt) == ("s0", 2)


def test_shared_leases_skip_shards_that_failed_before() -> None:
    q, _ = make_queue(3)
    first = q.lease("r1")
    assert first.solo is False
    q.nack(first.lease_id, "replica died")  # s0 goes to the back, suspect now
    assert q.lease("r2", shared=True).shard_id == "s1"
    assert q.lease("r2", shared=True).shard_id == "s2"
    assert q.lease("r2", shared=True) is None  # only s0 is left, and it must run alone
    retry = q.lease("r3")
    assert (retry.shard_id, retry.attempt, retry.solo) == ("s0", 2, True)


def test_replacements_of_a_dead_shard_run_alone() -> None:
    q, _ = make_queue(1, max_attempts=1)
    q.nack(q.lease("r1").lease_id, "boom")
    q.requeue_dead("s0", {"s0.a": {"i": 0}, "s0.b": {"i": 1}})
    assert q.lease("r1", shared=True) is None
    assert [q.lease("r1").solo, q.lease("r2").solo] == [True, True]


def test_release_replica_returns_all_its_leases_at_once() -> None:
    q, _ = make_queue(3)
    a, b, c = q.lease("r1"), q.lease("r1"), q.lease("r2")
    assert q.release_replica("r1") == 2
    assert q.release_replica("r1") == 0
    again = [q.lease("r3"), q.lease("r3")]
    assert [(x.shard_id, x.attempt) for x in again] == [("s0", 2), ("s1", 2)]
    assert not q.heartbeat(a.lease_id) and not q.ack(b.lease_id, {})
    assert q.heartbeat(c.lease_id)  # the other replica is untouched


def test_exhausted_attempts_dead_letter_the_shard_with_every_error() -> None:
    q, clock = make_queue(1, max_attempts=3, timeout=10)
    q.nack(q.lease("r1").lease_id, "ValueError: bad row 17")
    q.lease("r2")
    clock.advance(10)  # attempt 2 times out
    q.lease("r3")
    q.release_replica("r3")  # attempt 3: replica died
    assert q.lease("r4") is None
    dead = q.dead_letters()
    assert list(dead) == ["s0"]
    assert len(dead["s0"]) == 3
    assert "attempt 1 on r1" in dead["s0"][0] and "bad row 17" in dead["s0"][0]
    assert "attempt 2 on r2" in dead["s0"][1] and "expired" in dead["s0"][1]
    assert "attempt 3 on r3" in dead["s0"][2] and "released" in dead["s0"][2]
    assert q.is_finished()
    assert q.stats()["dead"] == 1


def test_late_ack_rescues_a_shard_dead_lettered_by_expiry() -> None:
    q, clock = make_queue(1, max_attempts=1, timeout=10)
    lease = q.lease("r1")
    clock.advance(10)
    assert "s0" in q.dead_letters()
    assert q.ack(lease.lease_id, {"ok": 1})
    assert q.dead_letters() == {} and q.results() == {"s0": {"ok": 1}}


def test_requeue_dead_replaces_a_shard_by_sub_shards_with_fresh_attempts() -> None:
    q, clock = make_queue(2, max_attempts=2, timeout=10)
    first = q.lease("r1")  # s0
    keep = q.lease("r1")  # s1 stays leased throughout
    q.nack(first.lease_id, "poison")
    second = q.lease("r1")  # s0, attempt 2: let it expire, so a late ack would be acceptable
    clock.advance(9)
    assert q.heartbeat(keep.lease_id)
    clock.advance(1)
    assert list(q.dead_letters()) == ["s0"]

    q.requeue_dead("s0", {"s0/a": {"rows": [0, 50]}, "s0/b": {"rows": [50, 100]}})
    assert q.dead_letters() == {}
    assert q.replaced() == {"s0": ["s0/a", "s0/b"]}
    stats = q.stats()
    assert (stats["total"], stats["pending"], stats["leased"], stats["replaced"]) == (3, 2, 1, 1)
    assert not q.ack(second.lease_id, {})  # the replaced shard can no longer be committed

    sub = q.lease("r2")
    assert (sub.shard_id, sub.payload, sub.attempt) == ("s0/a", {"rows": [0, 50]}, 1)
    q.nack(sub.lease_id, "still poison")  # one failure does not kill it: fresh count of 2
    assert q.lease("r2").shard_id == "s0/b"
    assert (q.lease("r2").shard_id, q.dead_letters()) == ("s0/a", {})


def test_requeue_dead_can_retry_the_same_id_and_checks_its_input() -> None:
    q, _ = make_queue(2, max_attempts=1)
    q.lease("r1")
    with pytest.raises(ValueError, match="'s0' is leased, not dead-lettered"):
        q.requeue_dead("s0", {"s0": {}})
    with pytest.raises(ValueError, match="unknown shard 'nope'"):
        q.requeue_dead("nope", {"x": {}})
    q.release_replica("r1")
    with pytest.raises(ValueError, match="at least one replacement"):
        q.requeue_dead("s0", {})
    with pytest.raises(ValueError, match=r"already in the queue: \['s1'\]"):
        q.requeue_dead("s0", {"s1": {}})
    q.requeue_dead("s0", {"s0": {"index": 0}})
    retry = q.lease("r2")
    assert (retry.shard_id, retry.attempt) == ("s1", 1)
    retry = q.lease("r2")
    assert (retry.shard_id, retry.attempt) == ("s0", 1)


def test_stats_results_and_totals_over_a_mixed_run() -> None:
    q, clock = make_queue(5, max_attempts=1, timeout=10)
    leases = [q.lease("r1") for _ in range(4)]
    q.ack(leases[0].lease_id, {"rows_ok": 10, "completion_tokens": 300})
    q.ack(leases[1].lease_id, {"rows_ok": 7, "rows_error": 3, "completion_tokens": 150})
    q.nack(leases[2].lease_id, "boom")  # dead: one attempt only
    assert q.stats() == {
        "total": 5, "pending": 1, "leased": 1, "done": 2, "dead": 1, "replaced": 0, "attempts": 4,
    }
    assert not q.is_finished()
    assert q.result_totals(["rows_ok", "rows_error", "completion_tokens", "absent"]) == {
        "rows_ok": 17, "rows_error": 3, "completion_tokens": 450, "absent": 0,
    }
    assert set(q.results()) == {"s0", "s1"}


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        ShardQueue({"a": 1}, max_attempts=0, lease_timeout_s=1)
    with pytest.raises(ValueError, match="lease_timeout_s"):
        ShardQueue({"a": 1}, max_attempts=1, lease_timeout_s=0)
    with pytest.raises(ValueError, match="non-empty strings"):
        ShardQueue({"": 1}, max_attempts=1, lease_timeout_s=1)
    assert ShardQueue({}, max_attempts=1, lease_timeout_s=1).is_finished()


# -- progress line -----------------------------------------------------------------------------


def test_format_duration_and_progress_line() -> None:
    assert [format_duration(s) for s in (0, 45, 80, 3599, 7500, None, float("inf"))] == [
        "0s", "45s", "1m20s", "59m59s", "2h05m", "?", "?",
    ]
    assert format_progress(12, 40, 12000, 40000, 350.0, 9100.0, 80.0, running=3) == (
        "[batchgen] [######--------------] 30% rows 12000/40000 | shards 12/40, 3 running | 350 rows/s | "
        "9100 tok/s | ETA 1m20s"
    )
    assert format_progress(0, 4, 0, 400, None, 2.5, None, shards_dead=1) == (
        "[batchgen] [--------------------] 0% rows 0/400 | shards 0/4, 0 running | - rows/s | 2.5 tok/s | "
        "ETA ? | 1 dead"
    )
    # Rows finish before their shard commits: the bar follows rows, not shards.
    assert format_progress(0, 4, 200, 400, None, None, None, running=2).startswith(
        "[batchgen] [##########----------] 50% rows 200/400 | shards 0/4, 2 running"
    )


def stats(done: int, pending: int, leased: int = 0, dead: int = 0) -> dict[str, int]:
    return {"done": done, "pending": pending, "leased": leased, "dead": dead}


def test_progress_logger_cadence_rates_and_eta() -> None:
    clock = Clock()
    progress = ProgressLogger(total_shards=12, done_before=2, every_s=10, window_s=60, clock=clock,
                              total_rows=1200, rows_before=200)
    assert progress.update(stats(0, 10), rows=0, tokens_out=0) is None  # not due yet
    clock.advance(5)
    assert progress.update(stats(1, 9), rows=100, tokens_out=2000) is None
    clock.advance(5)
    line = progress.update(stats(2, 7, leased=1), rows=200, tokens_out=4000)
    # 10 s since the first sample: 20 rows/s, 400 tok/s -> 800 rows left in 40 s; the 2 shards
    # and 200 rows from the earlier run count as done (cumulative) but did not make the rate.
    assert line == ("[batchgen] [######--------------] 33% rows 400/1200 | shards 4/12, 1 running | 20 rows/s | "
                    "400 tok/s | ETA 40s")
    clock.advance(1)
    assert progress.update(stats(2, 8), rows=200, tokens_out=4000) is None
    assert progress.update(stats(2, 8), rows=200, tokens_out=4000, force=True) is not None


def test_progress_logger_rates_forget_samples_older_than_the_window() -> None:
    clock = Clock()
    progress = ProgressLogger(total_shards=100, every_s=10, window_s=30, total_rows=10_000, clock=clock)
    for _ in range(60):  # ten minutes of model loading: polled, nothing done
        progress.update(stats(0, 100), rows=0, tokens_out=0)
        clock.advance(10)
    for i in range(1, 7):  # then 5 rows/s
        line = progress.update(stats(i, 100 - i), rows=50 * i, tokens_out=0)
        clock.advance(10)
    # Window of 30 s: rate 5 rows/s, not diluted by the idle start; row-based ETA.
    assert "| 5.0 rows/s |" in line
    assert line.endswith(f"ETA {format_duration((10_000 - 300) / 5)}")


def test_progress_logger_eta_is_zero_when_nothing_is_left() -> None:
    clock = Clock()
    progress = ProgressLogger(total_shards=3, every_s=1, clock=clock)
    assert progress.update(stats(2, 0, dead=1), force=True) == (
        "[batchgen] [#############-------] 66% rows - | shards 2/3, 0 running | - rows/s | - tok/s | ETA 0s | 1 dead"
    )


def test_token_rate_counts_finished_tokens_over_a_sliding_window() -> None:
    clock = Clock()
    rate = TokenRate(window_s=30, clock=clock)
    assert rate.rate() is None  # not started
    clock.advance(100)  # model loading: not part of any rate
    rate.start()
    clock.advance(0.5)
    rate.add(40)
    assert rate.rate() == 40  # under a second of work: over one second, never more
    for _ in range(20):  # 10 s at 50 tok/s
        clock.advance(0.5)
        rate.add(25)
    assert rate.rate() == pytest.approx((40 + 20 * 25) / 10.5)
    # Two shards committing together no longer matter: only finished tokens and elapsed time.
    for _ in range(60):  # a minute at 20 tok/s: the window forgets the faster start
        clock.advance(1)
        rate.add(20)
    assert rate.rate() == pytest.approx(20, rel=0.05)
    clock.advance(31)  # idle for a window: the rate falls to zero
    assert rate.rate() == 0


def test_result_totals_count_rows_in_flight_from_heartbeats() -> None:
    clock = Clock()
    q = ShardQueue({"a": 0, "b": 1}, max_attempts=2, lease_timeout_s=30, clock=clock)
    a, b = q.lease("r0"), q.lease("r1")
    assert q.heartbeat(a.lease_id, {"rows": 4, "completion_tokens": 40})
    assert q.heartbeat(b.lease_id, {"rows": 1, "completion_tokens": 5})
    assert q.result_totals(["rows"]) == {"rows": 0}  # committed only
    assert q.result_totals(["rows", "completion_tokens"], in_flight=True) == {"rows": 5, "completion_tokens": 45}
    assert q.ack(a.lease_id, {"rows": 10, "completion_tokens": 100})  # counted once, as committed
    assert q.nack(b.lease_id, "boom")  # its rows will be done again: they leave the count
    assert q.result_totals(["rows", "completion_tokens"], in_flight=True) == {"rows": 10, "completion_tokens": 100}


# -- on real Ray -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[int]:
    """A local Ray for this module, on loopback; yields its Prometheus metrics port."""
    metrics_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        # Ray's single-node switch keeps every server on 127.0.0.1 (`_node_ip_address` alone
        # does not). Ray reads it at import, so also set the parsed value in case another test
        # module imported Ray before this one set the variable.
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _metrics_export_port=metrics_port,
            # Export metrics every 0.5 s instead of 10 s so the smoke test can read them back.
            _system_config={"metrics_report_interval_ms": 500},
            logging_level="ERROR",
        )
        try:
            yield metrics_port
        finally:
            ray.shutdown()


@ray.remote(num_cpus=1)
class Consumer:
    """Stands in for a replica: leases and acks until the queue is finished."""

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id

    def ready(self) -> bool:
        return True

    def drain(self, queue: ray.actor.ActorHandle, nack_every: int) -> list[str]:
        """Returns the shards this consumer committed; nacks every `nack_every`-th first attempt."""
        committed, n = [], 0
        while True:
            lease = ray.get(queue.lease.remote(self.replica_id))
            if lease is None:
                if ray.get(queue.is_finished.remote()):
                    return committed
                time.sleep(0.01)
                continue
            n += 1
            if nack_every and n % nack_every == 0 and lease.attempt == 1:
                ray.get(queue.nack.remote(lease.lease_id, "flaky"))
                continue
            time.sleep(0.005)  # a little "work", so that the two consumers interleave
            result = {"replica": self.replica_id, "double": lease.payload * 2}
            if ray.get(queue.ack.remote(lease.lease_id, result)):
                committed.append(lease.shard_id)


def test_two_concurrent_consumers_commit_every_shard_exactly_once(ray_local: int) -> None:
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    items = {f"shard-{i:03d}": i for i in range(60)}
    queue = create_queue(items, max_attempts=3, lease_timeout_s=30, name="test-queue")
    consumers = [Consumer.remote("r1"), Consumer.remote("r2")]
    try:
        assert ray.get_actor("test-queue")  # replicas can find it by name
        ray.get([c.ready.remote() for c in consumers])  # both processes up before draining
        a, b = ray.get([consumers[0].drain.remote(queue, 0), consumers[1].drain.remote(queue, 4)])
        assert a and b, "both consumers should have committed shards"
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(items)
        results = ray.get(queue.results.remote())
        assert {sid: r["double"] for sid, r in results.items()} == {s: 2 * i for s, i in items.items()}
        stats = ray.get(queue.stats.remote())
        assert (stats["done"], stats["dead"], stats["pending"], stats["leased"]) == (60, 0, 0, 0)
        assert stats["attempts"] > 60  # r2's nacks were retried
    finally:
        for actor in [queue, *consumers]:
            ray.kill(actor)


def scrape(port: int, job: str, names: list[str], timeout_s: float = 20) -> dict[str, float]:
    """Poll the Prometheus endpoint until every `names` series of `job` shows up."""
    deadline = time.monotonic() + timeout_s
    found: dict[str, float] = {}
    while time.monotonic() < deadline:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for line in body.splitlines():
            name = line.split("{", 1)[0]
            if name in names and f'batchgen_job="{job}"' in line:
                found[name] = float(line.rsplit(" ", 1)[1])
        if len(found) == len(names):
            return found
        time.sleep(0.5)
    raise AssertionError(f"metrics not exported within {timeout_s}s; found {found}")


@ray.remote(num_cpus=0)
class MetricsUser:
    """Records through a JobMetrics that was pickled into the actor before first use."""

    def __init__(self, metrics: JobMetrics) -> None:
        self.metrics = metrics

    def record(self) -> None:
        self.metrics.shard_done(rows_ok=10, rows_err=0, tokens_in=120, tokens_out=64,
                                replica="replica-0", seconds=2.0)
        self.metrics.shard_done(rows_ok=5, rows_err=2, tokens_in=80, tokens_out=36,
                                replica="replica-0", seconds=4.0)
        self.metrics.replica_throughput("replica-0", 9.0)
        self.metrics.shard_failed("replica-1")
        self.metrics.queue({"pending": 7, "leased": 2})


def test_job_metrics_recorded_inside_ray_reach_prometheus(ray_local: int) -> None:
    actor = MetricsUser.remote(JobMetrics("metrics-smoke"))
    ray.get(actor.record.remote())
    got = scrape(ray_local, "metrics-smoke", [
        "ray_batchgen_rows_done_total", "ray_batchgen_rows_failed_total",
        "ray_batchgen_tokens_in_total", "ray_batchgen_tokens_out_total",
        "ray_batchgen_shards_done_total", "ray_batchgen_shards_failed_total",
        "ray_batchgen_queue_depth", "ray_batchgen_shards_leased",
        "ray_batchgen_replica_tokens_per_second",
    ])
    assert got == {
        "ray_batchgen_rows_done_total": 15, "ray_batchgen_rows_failed_total": 2,
        "ray_batchgen_tokens_in_total": 200, "ray_batchgen_tokens_out_total": 100,
        "ray_batchgen_shards_done_total": 2, "ray_batchgen_shards_failed_total": 1,
        "ray_batchgen_queue_depth": 7, "ray_batchgen_shards_leased": 2,
        "ray_batchgen_replica_tokens_per_second": 9,  # the last shard: 36 tokens in 4 s
    }
    ray.kill(actor)
