"""A replica: one model replica that leases shards from the queue until there are none left.

:class:`ShardWorker` is the part that turns one shard into one output table; it runs in any
process (tests drive it directly). :class:`Replica` is the Ray actor around it: lease, work,
heartbeat, publish, ack.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Optional

import pyarrow as pa

from batchgen.engine import LLM, CompletionOutput, SamplingParams
from batchgen.pipeline.shards import PromptRow, Shard, build_prompts, read_shard, resolve_filesystem
from batchgen.pipeline.spec import JobSpec
from batchgen.pipeline.writer import output_schema, publish_shard


class LeaseLost(Exception):
    """The queue gave this shard to someone else (our lease expired): drop the work."""


def build_llm(spec: JobSpec, device: Optional[str] = None) -> LLM:
    """The engine for this job's model, with the spec's engine knobs."""
    from batchgen.tokenizer import Tokenizer

    m = spec.model
    tokenizer = Tokenizer(m.tokenizer) if m.tokenizer else None
    kv = int(m.kv_cache_memory_gb * (1 << 30)) if m.kv_cache_memory_gb else None
    return LLM(m.path, tokenizer=tokenizer, dtype=m.dtype, device=device, kv_cache_bytes=kv,
               max_num_seqs=m.max_num_seqs, max_num_batched_tokens=m.max_num_batched_tokens,
               max_model_len=m.max_seq_len)


def row_sampling(spec: JobSpec, row: PromptRow) -> SamplingParams:
    """A row's sampling: the spec's, its per-row overrides, and a seed derived from its id."""
    s = spec.sampling
    fields: dict[str, Any] = dict(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
        logprobs=s.logprobs, truncate_prompt=spec.input.truncate_prompt, seed=s.seed,
    )
    fields.update(row.overrides)
    fields["seed"] = row.seed  # already derived from (seed or its override, row id)
    return SamplingParams(**fields)


class ShardWorker:
    """Runs shards through one engine."""

    def __init__(self, spec: JobSpec, llm: LLM) -> None:
        self.spec = spec
        self.llm = llm

    def _prompt(self, row: PromptRow) -> Any:
        if self.spec.input.chat and self.llm.tokenizer is not None:
            return self.llm.tokenizer.encode_chat_prompt(row.prompt, system=self.spec.input.system)
        return row.prompt

    def process(self, shard: Shard, keep_going: Callable[[], None] = lambda: None) -> tuple[pa.Table, dict]:
        """The output table of ``shard`` and its counts. ``keep_going`` is called between engine
        steps (heartbeats); it raises to abandon the shard."""
        spec = self.spec
        started = time.monotonic()
        table = read_shard(shard, spec.input_columns())
        rows = build_prompts(table, spec)
        outs: dict[str, CompletionOutput] = {}
        row_errors: dict[int, str] = {}
        for i, row in enumerate(rows):
            if row.error is not None:
                row_errors[i] = row.error
                continue
            try:
                params = row_sampling(spec, row)
            except ValueError as e:
                row_errors[i] = f"bad sampling override: {e}"
                continue
            self.llm.add_request(self._prompt(row), params, request_id=str(i))
        while self.llm.has_unfinished():
            keep_going()
            for out in self.llm.step():
                outs[out.request_id] = out
        result = self._table(table, rows, outs, row_errors)
        counts = {
            "rows": len(rows),
            "rows_ok": sum(o.ok for o in outs.values()),
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs.values()),
            "completion_tokens": sum(len(o.token_ids) for o in outs.values()),
            "seconds": time.monotonic() - started,
        }
        counts["rows_error"] = counts["rows"] - counts["rows_ok"]
        return result, counts

    def _table(self, table: pa.Table, rows: list[PromptRow], outs: dict[str, CompletionOutput],
               row_errors: dict[int, str]) -> pa.Table:
        spec = self.spec
        keep = spec.input.keep_columns
        schema = output_schema(spec, table.schema.field(spec.input.id_column).type,
                               {c: table.schema.field(c).type for c in keep})
        cols: dict[str, list] = {name: [] for name in schema.names}
        for i in range(len(rows)):
            out = outs.get(str(i))
            ok = out is not None and out.ok
            cols["completion"].append(out.text if ok else None)
            cols["finish_reason"].append(out.finish_reason if out is not None else "error")
            cols["prompt_tokens"].append(len(out.prompt_token_ids) if out is not None else 0)
            cols["completion_tokens"].append(len(out.token_ids) if out is not None else 0)
            cols["error"].append(None if ok else (out.error if out is not None else row_errors[i]))
            if "logprobs" in cols:
                cols["logprobs"].append(out.logprobs if ok else None)
        cols[spec.input.id_column] = table.column(spec.input.id_column).to_pylist()
        for c in keep:
            cols[c] = table.column(c).to_pylist()
        return pa.table(cols, schema=schema)


def _host() -> str:
    return socket.gethostname()


class Replica:
    """Ray actor: one model replica pulling shards from the queue until it is empty."""

    def __init__(self, spec: dict, queue: Any, replica_id: str, torch_threads: Optional[int] = None) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.spec = JobSpec.model_validate(spec)
        self.queue = queue
        self.replica_id = replica_id
        self.worker: Optional[ShardWorker] = None

    def ready(self) -> str:
        return f"{self.replica_id}@{_host()} pid {os.getpid()}"

    def run(self) -> dict:
        """Lease, process, publish and ack shards until the queue has nothing left."""
        import ray

        from batchgen.pipeline.metrics import JobMetrics

        if self.worker is None:
            self.worker = ShardWorker(self.spec, build_llm(self.spec))
        metrics = JobMetrics(self.spec.name)
        done = 0
        while True:
            lease = ray.get(self.queue.lease.remote(self.replica_id))
            if lease is None:
                if ray.get(self.queue.is_finished.remote()):
                    return {"replica": self.replica_id, "shards": done}
                time.sleep(0.5)  # others hold leases that may still come back
                continue
            shard: Shard = lease["payload"]
            last_beat = time.monotonic()

            def keep_going() -> None:
                nonlocal last_beat
                if time.monotonic() - last_beat >= self.spec.execution.heartbeat_s:
                    last_beat = time.monotonic()
                    if not ray.get(self.queue.heartbeat.remote(lease["lease_id"])):
                        raise LeaseLost(shard.shard_id)

            try:
                table, counts = self.worker.process(shard, keep_going)
                summary = {
                    "shard_id": shard.shard_id, "input_file": shard.relpath, "row_start": shard.row_start,
                    **counts, "attempts": lease["attempt"], "replica": self.replica_id, "host": _host(),
                }
                fs, root = resolve_filesystem(self.spec.output.path)
                publish_shard(fs, root, shard.shard_id, table, summary=summary)
            except LeaseLost:
                self.worker.llm.abort_all()
                continue
            except Exception as e:  # noqa: BLE001 - any failure of an attempt goes back to the queue
                self.worker.llm.abort_all()
                metrics.shard_failed(self.replica_id)
                ray.get(self.queue.nack.remote(lease["lease_id"], f"{type(e).__name__}: {e}"))
                continue
            if ray.get(self.queue.ack.remote(lease["lease_id"], summary)):
                done += 1
                metrics.shard_done(counts["rows_ok"], counts["rows_error"], counts["prompt_tokens"],
                                   counts["completion_tokens"], self.replica_id, counts["seconds"])
