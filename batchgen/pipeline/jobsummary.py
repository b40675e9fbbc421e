"""The job summary: one record per run in ``runs.json``, cumulative totals in ``_SUCCESS``.

A job may take several runs (stopped, killed, resumed). Each run that had work to do appends one
record when it ends, however it ends (done, stopped by a signal, failed): when it started and
finished, which shards it committed, their rows and tokens, its wall seconds and tokens/s. A run
with nothing to do (a re-run of a finished job) adds no record, so the figures of the runs that
did the work are kept. ``_SUCCESS`` holds the cumulative counts (read from the committed shards
themselves) and the list of runs; its ``seconds`` and ``completion_tokens_per_s`` are summed over
the recorded runs. A driver killed with SIGKILL cannot record its run: its shards still count in
the totals, and ``runs_unrecorded_rows`` says how many rows no run record accounts for.

Every timestamp here is ISO-8601 UTC (``2026-12-06T14:53:36.123Z``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Mapping, Sequence

import pyarrow.fs as pafs

from batchgen.pipeline import storage
from batchgen.pipeline.records import COUNTS, ShardSummary
from batchgen.pipeline.writer import RUNS


def iso(ts: float) -> str:
    """Epoch seconds as ISO-8601 UTC with milliseconds and a ``Z``."""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _totals(rows: Iterable[ShardSummary]) -> dict[str, int]:
    rows = list(rows)
    return {key: sum(int(getattr(r, key) or 0) for r in rows) for key in COUNTS}


def run_record(started: float, finished: float, status: str, rows: Sequence[ShardSummary]) -> dict[str, Any]:
    """The record of one run: ``rows`` are the summary rows of the shards it committed."""
    seconds = max(finished - started, 0.0)
    totals = _totals(rows)
    return {"started": iso(started), "finished": iso(finished), "status": status, "shards": len(rows),
            **totals, "seconds": round(seconds, 3),
            "completion_tokens_per_s": round(totals["completion_tokens"] / seconds, 3) if seconds > 0 else 0.0}


def read_runs(fs: pafs.FileSystem, root: str) -> list[dict[str, Any]]:
    """The run records under ``root`` (oldest first; [] when none)."""
    doc = storage.read_json(fs, storage.join(root, RUNS))
    return list((doc or {}).get("runs", []))


def append_run(fs: pafs.FileSystem, root: str, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Add ``record`` to ``runs.json`` (one atomic rewrite; the driver is its only writer)."""
    runs = [*read_runs(fs, root), dict(record)]
    storage.publish_json(fs, storage.join(root, RUNS), {"runs": runs})
    return runs


def success_summary(base: Mapping[str, Any], shard_rows: Sequence[ShardSummary],
                    runs: Sequence[Mapping[str, Any]], now: float) -> dict[str, Any]:
    """``_SUCCESS``'s content: ``base`` (name, fingerprints, output...), cumulative counts over
    ``shard_rows``, and the runs with their summed seconds and tokens/s."""
    totals = _totals(shard_rows)
    seconds = sum(float(r.get("seconds") or 0) for r in runs)
    run_tokens = sum(int(r.get("completion_tokens") or 0) for r in runs)
    return {
        **base,
        **totals,
        "started": runs[0]["started"] if runs else iso(now),
        "finished": runs[-1]["finished"] if runs else iso(now),
        "seconds": round(seconds, 3),
        "completion_tokens_per_s": round(run_tokens / seconds, 3) if seconds > 0 else 0.0,
        "runs": list(runs),
        "runs_unrecorded_rows": totals["rows"] - sum(int(r.get("rows") or 0) for r in runs),
    }
