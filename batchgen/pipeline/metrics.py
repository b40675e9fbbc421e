"""Job metrics for Prometheus (via `ray.util.metrics`) and the driver's progress line.

Ray exports the metrics on each node's metrics port (`ray start --metrics-export-port`), named
`ray_<name>` (counters gain `_total`). All carry a `batchgen_job` tag (the spec's `name`);
per-replica ones also `replica`, the replica's actor name (`batchgen-<job>-replica-<i>`, as the
Ray dashboard lists it). `cluster/grafana-dashboard.json` charts them.

`ProgressLogger` is for humans: one line every `every_s` (never per token or per row), e.g.
`[batchgen] [######--------------] 30% rows 12000/40000 | shards 12/40, 3 running | 350 rows/s |
9100 tok/s | ETA 1m20s`. A plain log line, not a tqdm bar: `ray job logs` and the dashboard
show the driver's output as a file, where a bar redrawn with carriage returns becomes one
unreadable line (or thousands); a line every few seconds reads the same everywhere.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ray.util.metrics import Counter, Gauge, Histogram

log = logging.getLogger("batchgen")

# Not `job`: Prometheus sets `job` to the scrape job's name and renames a scraped `job` label
# to `exported_job` (honor_labels: false, the default), so dashboards could not rely on it.
JOB_TAG = "batchgen_job"
JOB_TAGS = (JOB_TAG,)
REPLICA_TAGS = (JOB_TAG, "replica")
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
            "Completion tokens per second of a replica over the last minute (see TokenRate)",
            REPLICA_TAGS,
        ),
        shard_seconds=Histogram(
            "batchgen_shard_seconds", "Wall time per committed shard", SHARD_SECONDS_BUCKETS,
            JOB_TAGS,
        ),
    )


def prometheus_series() -> dict[str, tuple[str, ...]]:
    """Every series name batchgen's metrics appear under in Prometheus (``ray_`` prefix; counters
    add ``_total``, histograms ``_bucket``/``_sum``/``_count``), with its tag keys."""
    out: dict[str, tuple[str, ...]] = {}
    for instrument in vars(_make_instruments()).values():
        info = instrument.info
        base, tags = f"ray_{info['name']}", tuple(info["tag_keys"])
        if isinstance(instrument, Counter):
            out[f"{base}_total"] = tags
        elif isinstance(instrument, Histogram):
            out.update({f"{base}_{suffix}": (*tags, "le") if suffix == "bucket" else tags
                        for suffix in ("bucket", "sum", "count")})
        else:
            out[base] = tags
    return out


class JobMetrics:
    """The batchgen metrics of one job, from the driver or any actor.

    The Ray metric objects are created on first use, inside the process that records (they need
    a connected Ray), and are not pickled: a JobMetrics can be passed to actors as it is.
    """

    def __init__(self, job: str) -> None:
        """`job` becomes the `batchgen_job` tag of every series."""
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
        return {JOB_TAG: self.job} if replica is None else {JOB_TAG: self.job, "replica": replica}

    def shard_done(
        self,
        rows_ok: int,
        rows_err: int,
        tokens_in: int,
        tokens_out: int,
        replica: str,
        seconds: float,
    ) -> None:
        """Record one committed shard (call it only for an accepted ack). The replica's tokens/s
        is not derived from it (shards overlap in a replica): see :meth:`replica_throughput`."""
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

    def shard_failed(self, replica: str) -> None:
        """Record one failed shard attempt on `replica`."""
        self._m.shards_failed.inc(1, self._tags(replica))

    def replica_throughput(self, replica: str, tokens_per_s: float) -> None:
        """Set a replica's current tokens/s (from its :class:`TokenRate`)."""
        self._m.replica_tokens_per_s.set(float(tokens_per_s), self._tags(replica))

    def queue(self, stats: Mapping[str, int]) -> None:
        """Publish queue depth and leased shards from `ShardQueue.stats()`."""
        tags = self._tags()
        self._m.queue_depth.set(float(stats["pending"]), tags)
        self._m.shards_leased.set(float(stats["leased"]), tags)


# -- replica throughput ------------------------------------------------------------------------


class TokenRate:
    """Completion tokens per second of one replica over the last `window_s` seconds.

    Tokens are added as rows finish (not when a shard commits: a replica runs several shards at
    once, and dividing one shard's tokens by the time since the previous commit gave absurd rates
    when two commits landed together). Until the replica has worked `window_s`, the rate is over
    the time since it started working (`start`), so model loading does not count.
    """

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._started: float | None = None
        self._events: deque[tuple[float, int]] = deque()

    def start(self) -> None:
        """Mark the start of work (the first shard's rows entering the engine); later calls do nothing."""
        if self._started is None:
            self._started = self._clock()

    def add(self, tokens: int) -> None:
        """Count `tokens` that just finished."""
        self.start()
        if tokens > 0:
            self._events.append((self._clock(), int(tokens)))

    def rate(self) -> float | None:
        """Tokens/s over the window; None before the replica started. Within its first second the
        tokens are divided by one second: an underestimate, never the absurd rate of a tiny span."""
        if self._started is None:
            return None
        now = self._clock()
        since = max(now - self.window_s, self._started)
        while self._events and self._events[0][0] < since:
            self._events.popleft()
        return sum(n for _, n in self._events) / max(now - since, 1.0)


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


BAR_WIDTH = 20


def format_progress(
    shards_done: int,
    shards_total: int,
    rows_done: int | None,
    rows_total: int | None,
    rows_per_s: float | None,
    tokens_per_s: float | None,
    eta_s: float | None,
    running: int = 0,
    shards_dead: int = 0,
) -> str:
    """One progress line. The bar and percentage follow rows when known (rows finish steadily,
    shards in steps), else shards; rows, rates and ETA may be None (unknown or not measurable yet)."""
    if rows_done is not None and rows_total:
        frac = rows_done / rows_total
    else:
        frac = shards_done / shards_total if shards_total else 1.0
    frac = min(max(frac, 0.0), 1.0)
    filled = int(frac * BAR_WIDTH)
    rows = "-" if rows_done is None else f"{rows_done}" + (f"/{rows_total}" if rows_total is not None else "")
    line = (
        f"[batchgen] [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {int(frac * 100)}% rows {rows} | "
        f"shards {shards_done}/{shards_total}, {running} running | "
        f"{_rate(rows_per_s)} rows/s | {_rate(tokens_per_s)} tok/s | ETA {format_duration(eta_s)}"
    )
    if shards_dead:
        line += f" | {shards_dead} dead"
    return line


class ProgressLogger:
    """Decides when the progress line is due (every `every_s`) and builds it; the caller logs it.

    Feed it the queue's `stats()` as often as convenient (each poll); rates come from the last
    `window_s` seconds only, so start-up (model loading) stops weighing on them once replicas are
    busy. Counts are cumulative over the job: `done_before` shards and `rows_before` rows were
    committed by earlier runs (resume); they show as done but never make a rate. `rows` and
    `tokens_out` passed to `update` are this run's totals so far, rows in flight included.
    """

    def __init__(
        self,
        total_shards: int,
        done_before: int = 0,
        every_s: float = 10.0,
        total_rows: int | None = None,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        rows_before: int = 0,
    ) -> None:
        """`total_rows`: rows of the whole job (all shards), when known."""
        if every_s <= 0 or window_s <= 0:
            raise ValueError(f"every_s and window_s must be > 0, got {every_s}, {window_s}")
        self.total_shards = total_shards
        self.done_before = done_before
        self.rows_before = rows_before
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
        """Record `stats` (ShardQueue.stats()) and this run's totals; return the line when due, else None."""
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
        rows_done = None if rows is None else self.rows_before + rows
        if stats["pending"] + stats["leased"] == 0:
            eta: float | None = 0.0
        elif self.total_rows is not None and rows_done is not None and rows_per_s:
            eta = max(self.total_rows - rows_done, 0) / rows_per_s
        elif shards_per_s:
            eta = (stats["pending"] + stats["leased"]) / shards_per_s
        else:
            eta = None
        return format_progress(
            self.done_before + stats["done"],
            self.total_shards,
            rows_done,
            self.total_rows,
            rows_per_s,
            tokens_per_s,
            eta,
            running=stats["leased"],
            shards_dead=stats.get("dead", 0),
        )


class RunProgress:
    """A run's progress, reported each time the driver looks at the queue: the queue gauges
    (:class:`JobMetrics`), the log line (:class:`ProgressLogger`) and the caller's ``on_stats``."""

    def __init__(self, metrics: JobMetrics, logger: ProgressLogger,
                 on_stats: Callable[[dict], None] | None = None) -> None:
        self.metrics, self.logger, self.on_stats = metrics, logger, on_stats

    def report(self, queue_stats: Mapping[str, int], shown: Mapping[str, int], rows: int, completion_tokens: int,
               force: bool = False) -> None:
        """``queue_stats``: the queue's own counts; ``shown``: the same in shards of the plan
        (pieces of split shards not counted); ``rows``/``completion_tokens``: finished so far."""
        self.metrics.queue(queue_stats)
        line = self.logger.update(shown, rows, completion_tokens, force=force)
        if line:
            log.info(line)
        if self.on_stats:
            self.on_stats(dict(shown))
