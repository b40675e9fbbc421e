"""Poison isolation: a shard that runs out of attempts is split into pieces, recursively, until
the rows at fault are cornered; the pieces are merged back into the shard's one file.

A dead-lettered shard (or piece) of several rows is replaced in the queue by up to
:data:`SPLIT_WAYS` pieces with fresh attempts; a single row that runs out of attempts is written
as an error row (``failed N attempts: <last error>``). Pieces are published under
``parts/<shard_id>/`` and merged into ``shards/<shard_id>.parquet`` in one atomic write once all
are done, so a shard is still committed exactly when its one file exists.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field, replace

import pyarrow.fs as pafs
import ray

from batchgen.pipeline import writer
from batchgen.pipeline.records import ShardSummary
from batchgen.pipeline.replica import Task
from batchgen.pipeline.shards import Shard, read_shard
from batchgen.pipeline.spec import JobSpec
from batchgen.pipeline.storage import resolve_filesystem, with_retries
from batchgen.pipeline.worker import output_table

log = logging.getLogger("batchgen")

#: How many pieces a dead-lettered shard is split into (fewer when it has fewer rows).
SPLIT_WAYS = 8


@dataclass
class _Split:
    """A planned shard that ran out of attempts and is being done in pieces."""

    shard: Shard
    open: dict[str, Shard] = field(default_factory=dict)  # queued pieces: queue id -> rows
    done: dict[str, tuple[Shard, ShardSummary]] = field(default_factory=dict)  # committed pieces
    spent_attempts: int = 0  # attempts of pieces that were split again (and of the shard itself)


def pieces(shard: Shard, root: Shard, ways: int) -> list[Shard]:
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


class Splitter:
    """The splits of one run: dead letters in, pieces queued, merged shards out."""

    def __init__(self, spec: JobSpec, queue: ray.actor.ActorHandle, fs: pafs.FileSystem, root: str,
                 roots: dict[str, Shard]) -> None:
        """``roots``: the planned shards of this run by id; ``fs``/``root``: the output."""
        self.spec, self.queue, self.fs, self.root, self.roots = spec, queue, fs, root, roots
        self.splits: dict[str, _Split] = {}  # by planned shard id
        self.tasks: dict[str, Task] = {}  # every piece ever queued: its rows and its planned shard
        self.parts_committed = 0
        self.merged = 0

    def _task(self, qid: str) -> Task:
        return self.tasks.get(qid) or Task(self.roots[qid], qid)

    def handle_dead(self) -> None:
        """Split every dead-lettered shard or piece; settle single rows as error rows."""
        dead = ray.get(self.queue.dead_letters.remote())
        for qid, errors in dead.items():
            task = self._task(qid)
            rows, root_id = task.shard, task.root_id
            if rows.num_rows == 1:
                self._settle_row(task, errors)
                continue
            new = {p.shard_id: Task(p, root_id) for p in pieces(rows, self.roots[root_id], SPLIT_WAYS)}
            try:
                ray.get(self.queue.requeue_dead.remote(qid, new))
            except ValueError:
                continue  # a late ack committed it meanwhile: nothing to split
            self.tasks.update(new)
            split = self.splits.get(root_id)
            if split is None:
                split = self.splits[root_id] = _Split(self.roots[root_id])
            split.open.pop(qid, None)
            split.open.update({p: t.shard for p, t in new.items()})
            split.spent_attempts += len(errors)
            log.warning("%s failed %d attempts (last: %s); split into %d pieces to corner the failing rows",
                        qid, len(errors), errors[-1] if errors else "?", len(new))

    def _settle_row(self, task: Task, errors: list[str]) -> None:
        """Write the single row of ``task`` as an error row and commit it in the queue."""
        rows, qid = task.shard, task.shard.shard_id
        message = f"failed {len(errors)} attempts: {errors[-1] if errors else 'no error recorded'}"
        spec = self.spec
        in_fs, _ = resolve_filesystem(rows.path)
        columns = [spec.input.id_column, *spec.input.keep_columns]
        table = with_retries(in_fs, f"reading {rows.shard_id}", lambda: read_shard(rows, columns))
        out = output_table(spec, table, [message] * table.num_rows)
        summary = ShardSummary.for_shard(rows, rows=out.num_rows, rows_ok=0, rows_error=out.num_rows,
                                         prompt_tokens=0, completion_tokens=0, seconds=0.0, attempts=len(errors),
                                         replica="driver", host=socket.gethostname())
        try:
            # Claim it first: a late ack that wins the race keeps its own (good) output.
            ray.get(self.queue.settle_dead.remote(qid, summary.to_dict()))
        except ValueError:
            return
        log.warning("row %d of %s failed %d attempts; written as an error row (%s)", rows.row_start,
                    rows.relpath, len(errors), message)
        if not task.is_part:  # a planned one-row shard: no pieces to merge
            writer.publish_shard(self.fs, self.root, task.root_id, out, summary=summary)
        else:
            writer.publish_part(self.fs, self.root, task.root_id, qid, out, summary=summary)

    def collect_parts(self) -> None:
        """Move committed pieces to their split; merge every split whose pieces are all done."""
        open_ids = [qid for split in self.splits.values() for qid in split.open]
        if not open_ids:
            return
        results = ray.get(self.queue.results_for.remote(open_ids))
        for qid, result in results.items():
            split = self.splits[self.tasks[qid].root_id]
            piece = split.open.pop(qid)
            summary = ShardSummary.from_dict(result) if result else ShardSummary(shard_id=qid)
            split.done[qid] = (piece, summary)
            self.parts_committed += 1
        for root_id, split in list(self.splits.items()):
            if not split.open:
                self._merge(split)
                del self.splits[root_id]

    def _merge(self, split: _Split) -> None:
        order = sorted(split.done, key=lambda qid: split.done[qid][0].row_offset)
        summary = ShardSummary.merged(split.shard, [split.done[qid][1] for qid in order], split.spent_attempts)
        writer.merge_parts(self.fs, self.root, split.shard.shard_id, order, summary=summary)
        self.merged += 1
        log.info("%s: merged %d pieces", split.shard.shard_id, len(order))
