"""Job metrics for Prometheus (via `ray.util.metrics`) and the driver's progress line.

Ray exports the metrics on each node's metrics port (`ray start --metrics-export-port`), named
`ray_<name>` (counters gain `_total`). All carry a `job` tag; per-replica ones also `replica`.

`ProgressLogger` is for humans: one line every `every_s` (never per token or per row), e.g.
`[batchgen] shards 12/40 (30%) rows 12000 | 350 rows/s | 9100 tok/s | ETA 1m20s`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ray.util.metrics import Counter, Gauge, Histogram

JOB_TAGS = ("job",)
REPLICA_TAGS = ("job", "replica")
# Seconds per shard: from a few seconds (small model) to hours (70B, long outputs).
SHARD_SECONDS_BUCKETS = [1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200]


@dataclass
class _Instruments:
    rows_done: Counter
    rows_failed: Counter
    tokens_in: Counter
    tokens_out: Counter
    shards_done: Counter
    shards_failed: Counter
    shards_leased: Gauge
    queue_depth: Gauge
    replica_tokens_per_s: Gauge
    shard_seconds: Histogram


def _make_instruments() -> _Instruments:
    return _Instruments(
        rows_done=Counter("batchgen_rows_done", "Rows completed without error", JOB_TAGS),
        rows_failed=Counter("batchgen_rows_failed", "Rows committed with a per-row error", JOB_TAGS),
        tokens_in=Counter("batchgen_tokens_in", "Prompt tokens processed", JOB_TAGS),
        tokens_out=Counter("batchgen_tokens_out", "Completion tokens generated", JOB_TAGS),
        shards_done=Counter("batchgen_shards_done", "Shards committed", JOB_TAGS),
        shards_failed=Counter(
            "batchgen_shards_failed", "Shard attempts that failed (nack, expiry, replica loss)",
            REPLICA_TAGS,
        ),
        shards_leased=Gauge("batchgen_shards_leased", "Shards currently leased", JOB_TAGS),
        queue_depth=Gauge("batchgen_queue_depth", "Shards waiting for a replica", JOB_TAGS),
        replica_tokens_per_s=Gauge(
            "batchgen_replica_tokens_per_second",
            "Completion tokens per second of a replica over its last shard",
            REPLICA_TAGS,
        ),
        shard_seconds=Histogram(
            "batchgen_shard_seconds", "Wall time per committed shard", SHARD_SECONDS_BUCKETS,
            JOB_TAGS,
        ),
    )


class JobMetrics:
    """The batchgen metrics of one job, from the driver or any actor.

    The Ray metric objects are created on first use, inside the process that records (they need
    a connected Ray), and are not pickled: a JobMetrics can be passed to actors as it is.
    """

    def __init__(self, job: str) -> None:
        """`job` becomes the `job` tag of every series."""
        if not job:
            raise ValueError("JobMetrics needs a non-empty job name")
        self.job = job
        self._instruments: _Instruments | None = None

    def __getstate__(self) -> dict:
        return {"job": self.job, "_instruments": None}

    @property
    def _m(self) -> _Instruments:
        if self._instruments is None:
            self._instruments = _make_instruments()
        return self._instruments

    def _tags(self, replica: str | None = None) -> dict[str, str]:
        return {"job": self.job} if replica is None else {"job": self.job, "replica": replica}

    def shard_done(
        self,
        rows_ok: int,
        rows_err: int,
        tokens_in: int,
        tokens_out: int,
        replica: str,
        seconds: float,
        busy_seconds: float | None = None,
    ) -> None:
        """Record one committed shard (call it only for an accepted ack). ``busy_seconds``: the
        replica's time that these tokens stand for (its time since its previous commit, as
        shards overlap); default ``seconds``."""
        m, tags = self._m, self._tags()
        # Ray counters reject increments <= 0 (a shard may well have no failed rows) and any
        # type but int/float (numpy or Arrow scalars), hence the filter and float().
        for counter, value in (
            (m.rows_done, rows_ok),
            (m.rows_failed, rows_err),
            (m.tokens_in, tokens_in),
            (m.tokens_out, tokens_out),
            (m.shards_done, 1),
        ):
            if value > 0:
                counter.inc(float(value), tags)
        if seconds > 0:
            m.shard_seconds.observe(float(seconds), tags)
        busy = seconds if busy_seconds is None else busy_seconds
        if busy > 0:
            m.replica_tokens_per_s.set(float(tokens_out) / float(busy), self._tags(replica))

    def shard_failed(self, replica: str) -> None:
        """Record one failed shard attempt on `replica`."""
        self._m.shards_failed.inc(1, self._tags(replica))

    def replica_throughput(self, replica: str, tokens_per_s: float) -> None:
        """Set a replica's current tokens/s (e.g. from its heartbeat, between shards)."""
        self._m.replica_tokens_per_s.set(float(tokens_per_s), self._tags(replica))

    def queue(self, stats: Mapping[str, int]) -> None:
        """Publish queue depth and leased shards from `ShardQueue.stats()`."""
        tags = self._tags()
        self._m.queue_depth.set(float(stats["pending"]), tags)
        self._m.shards_leased.set(float(stats["leased"]), tags)


# -- progress line -----------------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """`45s`, `1m20s`, `2h05m`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def format_progress(
    shards_done: int,
    shards_total: int,
    rows: int | None,
    rows_per_s: float | None,
    tokens_per_s: float | None,
    eta_s: float | None,
    shards_dead: int = 0,
) -> str:
    """One progress line; rows, rates and ETA may be None (unknown or not measurable yet)."""
    pct = 100 * shards_done // shards_total if shards_total else 100
    line = (
        f"[batchgen] shards {shards_done}/{shards_total} ({pct}%) rows {'-' if rows is None else rows} | "
        f"{_rate(rows_per_s)} rows/s | {_rate(tokens_per_s)} tok/s | ETA {format_duration(eta_s)}"
    )
    if shards_dead:
        line += f" | {shards_dead} dead"
    return line


class ProgressLogger:
    """Decides when the progress line is due (every `every_s`) and builds it; the caller logs it.

    Feed it the queue's `stats()` as often as convenient (each poll); rates come from the last
    `window_s` seconds only, so start-up (model loading) stops weighing on them once replicas are
    busy. `done_before` counts shards committed by an earlier run (resume): they show as done
    but never make a rate. `rows` and `tokens_out` are this run's cumulative totals, when known.
    """

    def __init__(
        self,
        total_shards: int,
        done_before: int = 0,
        every_s: float = 10.0,
        total_rows: int | None = None,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`total_rows` (rows still to do in this run), when known, gives a smoother row-based
        ETA than shard counts."""
        if every_s <= 0 or window_s <= 0:
            raise ValueError(f"every_s and window_s must be > 0, got {every_s}, {window_s}")
        self.total_shards = total_shards
        self.done_before = done_before
        self.every_s = every_s
        self.total_rows = total_rows
        self.window_s = window_s
        self._clock = clock
        self._last_line_at = clock()
        # (time, shards done, rows, tokens out) samples; the oldest is the rates' baseline.
        self._samples: deque[tuple[float, int, int, int]] = deque()

    def update(
        self,
        stats: Mapping[str, int],
        rows: int | None = None,
        tokens_out: int | None = None,
        force: bool = False,
    ) -> str | None:
        """Record `stats` (ShardQueue.stats()) and totals; return the line when due, else None."""
        now = self._clock()
        self._samples.append((now, stats["done"], rows or 0, tokens_out or 0))
        # Keep one sample at or before the window's start as the baseline.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()
        if not force and now - self._last_line_at < self.every_s:
            return None
        self._last_line_at = now
        return self._line(stats, rows, tokens_out is not None)

    def _line(self, stats: Mapping[str, int], rows: int | None, have_tokens: bool) -> str:
        t0, s0, r0, k0 = self._samples[0]
        t1, s1, r1, k1 = self._samples[-1]
        dt = t1 - t0
        shards_per_s = (s1 - s0) / dt if dt > 0 else None
        rows_per_s = (r1 - r0) / dt if dt > 0 and rows is not None else None
        tokens_per_s = (k1 - k0) / dt if dt > 0 and have_tokens else None
        if stats["pending"] + stats["leased"] == 0:
            eta: float | None = 0.0
        elif self.total_rows is not None and rows is not None and rows_per_s:
            eta = max(self.total_rows - rows, 0) / rows_per_s
        elif shards_per_s:
            eta = (stats["pending"] + stats["leased"]) / shards_per_s
        else:
            eta = None
        return format_progress(
            self.done_before + stats["done"],
            self.total_shards,
            rows,
            rows_per_s,
            tokens_per_s,
            eta,
            stats.get("dead", 0),
        )
