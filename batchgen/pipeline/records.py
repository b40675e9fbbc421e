"""Typed records that cross module boundaries in the pipeline.

:class:`ShardSummary` is a committed shard's row of ``summary.parquet``: a replica builds it for
a shard it ran (:meth:`ShardSummary.for_shard`), the driver for a row it settles as an error row
and for a split shard from its pieces (:meth:`ShardSummary.merged`), and the writer stores it in
the shard file's footer (JSON: :meth:`to_dict` / :meth:`from_dict`) and writes
``summary.parquet`` from those (:data:`SUMMARY_SCHEMA`). Unknown fields are refused when a
summary is made from a dict, so that a typo is found where it is made, not at the end of a job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Optional, Sequence

import pyarrow as pa

#: One row per committed shard; every field but ``shard_id`` may be missing (null).
SUMMARY_SCHEMA = pa.schema([
    pa.field("shard_id", pa.string(), nullable=False),
    ("input_file", pa.string()),
    ("row_start", pa.int64()),
    ("row_groups", pa.list_(pa.int32())),
    ("rows", pa.int64()),
    ("rows_ok", pa.int64()),
    ("rows_error", pa.int64()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("seconds", pa.float64()),
    # When the shard's rows were read and when its last row finished (UTC). Shards overlap in a
    # replica's engine, so "seconds" alone cannot tell a timeline; these can.
    ("started", pa.timestamp("ms", tz="UTC")),
    ("finished", pa.timestamp("ms", tz="UTC")),
    ("attempts", pa.int32()),
    ("replica", pa.string()),
    ("host", pa.string()),
])
#: The row and token counts of a summary (what progress and totals add up).
COUNTS = ("rows", "rows_ok", "rows_error", "prompt_tokens", "completion_tokens")


@dataclass
class ShardSummary:
    """One committed shard (or piece of a split shard): where its rows come from, its counts and
    timings, and who made it. ``started``/``finished`` are epoch seconds (JSON has no time type);
    None is a field not recorded (a null in ``summary.parquet``)."""

    shard_id: str
    input_file: Optional[str] = None
    row_start: Optional[int] = None
    row_groups: Optional[list[int]] = None
    rows: Optional[int] = None
    rows_ok: Optional[int] = None
    rows_error: Optional[int] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    seconds: Optional[float] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    attempts: Optional[int] = None
    replica: Optional[str] = None
    host: Optional[str] = None

    @classmethod
    def for_shard(cls, shard: Any, shard_id: Optional[str] = None, **values: Any) -> "ShardSummary":
        """The summary of ``shard`` (a :class:`~batchgen.pipeline.shards.Shard`), published as
        ``shard_id`` (default its own id), with ``values`` for the other fields."""
        return cls.from_dict({"shard_id": shard_id or shard.shard_id, "input_file": shard.relpath,
                              "row_start": shard.row_start, **values})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShardSummary":
        """The summary in ``data`` (a footer's JSON, a queue result).

        Raises:
            ValueError: for a key that is not a summary field, or a missing ``shard_id``.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"summary row {data.get('shard_id')!r}: unknown field(s) {sorted(unknown)}; "
                             f"known: {', '.join(SUMMARY_SCHEMA.names)}")
        if not data.get("shard_id"):
            raise ValueError(f"summary row without a shard_id: {dict(data)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The recorded fields as a JSON-ready dict (fields not recorded are left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def with_id(self, shard_id: str) -> "ShardSummary":
        """This summary under another shard id."""
        return replace(self, shard_id=shard_id)

    @classmethod
    def merged(cls, shard: Any, pieces: Sequence["ShardSummary"], spent_attempts: int) -> "ShardSummary":
        """The summary of the split ``shard`` from its pieces' summaries: their seconds and
        attempts summed (plus ``spent_attempts``: those of pieces split again and of the shard
        itself), their earliest start and latest finish, every replica and host. The row and
        token counts are left to the writer, which takes them from the merged rows."""
        started = [p.started for p in pieces if p.started is not None]
        finished = [p.finished for p in pieces if p.finished is not None]
        return cls.for_shard(
            shard,
            seconds=sum(float(p.seconds or 0) for p in pieces),
            started=min(started) if started else None,
            finished=max(finished) if finished else None,
            attempts=spent_attempts + sum(int(p.attempts or 0) for p in pieces),
            replica=",".join(sorted({str(p.replica) for p in pieces})),
            host=",".join(sorted({str(p.host) for p in pieces})),
        )
