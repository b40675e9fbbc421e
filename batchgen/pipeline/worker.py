"""Turning shards into output tables in one engine: the row -> engine request -> output row path.

:class:`ShardWorker` runs shards through one engine, several at a time; it runs in any process
(tests drive it directly; :class:`~batchgen.pipeline.replica.Replica` is the Ray actor around
it). Each row of a shard goes one way: :func:`~batchgen.pipeline.rows.build_prompts` makes it a
:class:`~batchgen.pipeline.rows.PromptRow`, :func:`engine_request` an :class:`EngineRequest`
(or an error row's text), the engine a :class:`~batchgen.engine.CompletionOutput`, and
:func:`result_columns` the output row's result columns.

Failures in here, from the smallest blast radius up:

- A poison row (null, empty, invalid UTF-8, too long for the context, bad override) becomes an
  error row without touching the others (``build_prompts`` and the engine report it).
- A row whose *generation raises* is cornered in the process: each in-flight shard's rows not
  finished yet are run again, shard by shard, in halves, down to single rows, and a row that
  still raises alone becomes an error row (``generation failed: ...``). If no row of a shard
  could be generated at all, the failure looks like the engine's rather than the rows', so that
  attempt fails instead (nack) and the queue retries the shard, possibly on another replica.
- A CUDA error (not an out-of-memory one) is re-raised (:func:`is_fatal`): the replica nacks
  and its process exits.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import pyarrow as pa

from batchgen.engine import LLM, CompletionOutput, SamplingParams
from batchgen.pipeline.adapters import local_adapters, merged, row_adapters
from batchgen.pipeline.rows import PromptRow, build_prompts
from batchgen.pipeline.shards import Shard, read_shard
from batchgen.pipeline.spec import JobSpec
from batchgen.pipeline.storage import resolve_filesystem, with_retries
from batchgen.pipeline.writer import output_schema
from batchgen.prompts import PromptError


#: A row's outcome: the engine's output, or the reason it could not run.
RowResult = Union[CompletionOutput, str]


class LeaseLost(Exception):
    """The queue gave this shard to someone else (our lease expired): drop the work."""


# --------------------------------------------------------------------------------------- engine side

def build_llm(spec: JobSpec, device: Optional[str] = None) -> LLM:
    """The engine for this job's model, with the spec's engine knobs."""
    from batchgen.tokenizer import Tokenizer

    m = spec.model
    tokenizer = Tokenizer(m.tokenizer) if m.tokenizer else None
    kv = int(m.kv_cache_memory_gb * (1 << 30)) if m.kv_cache_memory_gb else None
    return LLM(m.path, tokenizer=tokenizer, dtype=m.dtype, device=device, kv_cache_bytes=kv,
               max_num_seqs=m.max_num_seqs, max_num_batched_tokens=m.max_num_batched_tokens,
               max_model_len=m.max_seq_len, cuda_graphs=None if m.cuda_graphs else False,
               compile_decode=m.compile_decode, attention_backend=m.attention_backend,
               adapters=local_adapters(spec) or None, merge_adapter=merged(spec),
               prefix_caching=m.prefix_caching)


def row_sampling(spec: JobSpec, row: PromptRow, adapter: Optional[str] = None) -> SamplingParams:
    """A row's sampling: the spec's, its per-row overrides, a seed derived from its id, and the
    LoRA adapter it runs with (its ``input.adapter_column`` cell; None = base or the merged one)."""
    s = spec.sampling
    fields: dict[str, Any] = dict(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
        logprobs=s.logprobs, truncate_prompt=spec.input.truncate_prompt, seed=s.seed,
    )
    fields.update(row.overrides)
    fields["seed"] = row.seed  # already derived from (seed or its override, row id)
    fields["adapter"] = adapter
    fields["constraint"] = s.constraint()  # (kind, value): compiled, and cached, by the engine
    if spec.classify is not None:
        fields["choices"] = row.choices or spec.classify.choices
        fields["normalize"] = spec.classify.normalize
    return SamplingParams(**fields)


def is_fatal(exc: BaseException) -> bool:
    """True for errors after which this process cannot use its device any more (CUDA errors
    other than out-of-memory): only a new process recovers."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False  # recoverable: smaller groups may well fit
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)


# --------------------------------------------------------------------------------------- row -> engine -> row

@dataclass
class EngineRequest:
    """What one row asks of the engine. Built in one place (:func:`engine_request`) and handed
    to the engine in one place (:meth:`ShardWorker._submit`): a per-row engine option (an
    adapter, constraints) is a field here and an argument there."""

    index: int  # row index in the shard
    prompt: Union[str, list[int]]  # text, or token ids (chat, rendered Meta's way)
    params: SamplingParams


def engine_request(spec: JobSpec, row: PromptRow, index: int, tokenizer: Any,
                   adapter: Optional[str] = None) -> Union[EngineRequest, str]:
    """The engine request for the shard's row ``index``, or why it cannot run (its error text).

    Chat conversations go to the engine as token ids (Meta's rendering), other prompts as text;
    without a tokenizer the text goes on and the engine reports that it cannot encode it.
    """
    if row.error is not None:
        return row.error
    try:
        prompt = row.engine_input(tokenizer)
    except PromptError as e:  # build_prompts validated it already; never let one row fail the shard
        return str(e)
    try:
        return EngineRequest(index, prompt, row_sampling(spec, row, adapter))
    except ValueError as e:
        return f"bad sampling override: {e}"


def result_columns(result: RowResult) -> dict[str, Any]:
    """The result columns of one output row (see :func:`~batchgen.pipeline.writer.output_schema`):
    from an engine output, or from the error text of a row that did not run."""
    if isinstance(result, str):
        result = CompletionOutput(request_id="", prompt_token_ids=[], token_ids=[], text=None,
                                  finish_reason="error", error=result)
    ok = result.ok
    return {
        "completion": result.text if ok else None,
        "finish_reason": result.finish_reason,
        "prompt_tokens": len(result.prompt_token_ids),
        "completion_tokens": len(result.token_ids),
        # Every error row says why; an engine error without text would break that promise. A
        # constrained row cut by max_tokens is a length row whose error says it is incomplete.
        "error": result.error if ok else (result.error or "error without a message"),
        "logprobs": result.logprobs if ok else None,
        "token_ids": result.token_ids if ok else None,
        "truncated_tokens": result.truncated_tokens,
        "label": result.label if ok else None,
        "label_logprobs": result.label_logprobs if ok else None,
        "label_probs": result.label_probs if ok else None,
    }


def output_table(spec: JobSpec, table: pa.Table, results: Sequence[RowResult]) -> pa.Table:
    """The output rows for the input rows ``table`` (id and keep columns): one result each, an
    engine output or the error text of a row that did not run."""
    keep = spec.input.keep_columns
    schema = output_schema(spec, table.schema.field(spec.input.id_column).type,
                           {c: table.schema.field(c).type for c in keep})
    cols: dict[str, list] = {name: [] for name in schema.names}
    for result in results:
        for name, value in result_columns(result).items():
            if name in cols:  # logprobs and token_ids only when the spec asks for them
                cols[name].append(value)
    cols[spec.input.id_column] = table.column(spec.input.id_column).to_pylist()
    for c in keep:
        cols[c] = table.column(c).to_pylist()
    return pa.table(cols, schema=schema)


@dataclass(eq=False)
class ShardRun:
    """One shard in the engine: its rows' results so far and the rows still generating."""

    shard: Shard
    table: pa.Table
    results: list[Optional[RowResult]]
    pending: dict[str, EngineRequest]  # engine request id -> row still generating
    keep_going: Callable[[], None]
    started: float  # time.monotonic(), for durations
    started_at: float  # time.time(), for the summary's timeline
    context: Any = None  # the caller's (the replica keeps its lease here)
    error: Optional[Exception] = None  # set when the shard cannot be completed: nack it
    solo: bool = False  # failed before: nothing else joins the engine while it runs

    @property
    def done(self) -> bool:
        return not self.pending

    def progress(self) -> dict[str, int]:
        """Rows finished so far (error rows included) and their completion tokens, for heartbeats."""
        done = [r for r in self.results if r is not None]
        return {"rows": len(done), "completion_tokens": sum(len(r.token_ids) for r in done if not isinstance(r, str))}


class ShardWorker:
    """Runs shards through one engine, several at a time.

    A replica starts the next shard while the current one's last rows are still generating, so
    the engine's batch never drains between shards (with one shard at a time, every shard ends
    with a tail of steps that run a few rows through all the weights). Each shard's rows carry
    their own request ids, so outputs go back to their shard and a lost lease drops only its rows.
    """

    def __init__(self, spec: JobSpec, llm: LLM) -> None:
        """``llm``: the engine (an :class:`~batchgen.engine.LLM`, or anything with its
        ``add_request``/``step``/``abort`` interface: the tensor-parallel leader, the test hook)."""
        self.spec = spec
        self.llm = llm
        self.inflight: list[ShardRun] = []
        self._tags = itertools.count()
        #: Completion tokens of every row finished so far (the replica's throughput gauge reads it).
        self.tokens_out = 0

    def _submit(self, request: EngineRequest, request_id: str) -> None:
        self.llm.add_request(request.prompt, request.params, request_id=request_id)

    def process(self, shard: Shard, keep_going: Callable[[], None] = lambda: None) -> tuple[pa.Table, dict]:
        """The output table of ``shard`` and its counts, run alone. ``keep_going`` is called between
        engine steps (heartbeats); it raises to abandon the shard.

        Raises:
            LeaseLost: from ``keep_going``.
            Exception: when reading fails, or when no row could be generated (see the module doc).
        """
        run = self.start(shard, keep_going)
        while not run.done:
            try:
                keep_going()
            except BaseException:
                self.drop(run)
                raise
            self.step()
        if run in self.inflight:  # no row reached the engine (all were error rows)
            self.inflight.remove(run)
        if run.error is not None:
            raise run.error
        return self.finish(run)

    def start(self, shard: Shard, keep_going: Callable[[], None] = lambda: None, context: Any = None,
              solo: bool = False) -> ShardRun:
        """Read ``shard`` and queue its rows in the engine; :meth:`step` then runs them with the
        other shards in flight (none will be added while a ``solo`` shard runs).

        Raises:
            Exception: when the shard cannot be read (the attempt fails; nothing was queued).
        """
        spec = self.spec
        started, started_at = time.monotonic(), time.time()
        fs, _ = resolve_filesystem(shard.path)
        table = with_retries(fs, f"reading shard {shard.shard_id}",
                             lambda: read_shard(shard, spec.input_columns()))
        rows = build_prompts(table, spec, context=self.llm.max_model_len)  # oversized text: error rows
        adapters = row_adapters(spec, table)
        run = ShardRun(shard, table, [None] * len(rows), {}, keep_going, started, started_at, context, solo=solo)
        tag = f"{next(self._tags)}/"
        for i, row in enumerate(rows):
            request = engine_request(spec, row, i, self.llm.tokenizer, adapters[i])
            if isinstance(request, str):
                run.results[i] = request
                continue
            run.pending[tag + str(i)] = request
            self._submit(request, tag + str(i))
        self.inflight.append(run)
        return run

    def drop(self, run: ShardRun) -> None:
        """Give up ``run`` (its lease is gone): its rows leave the engine, the others go on."""
        self.llm.abort(list(run.pending))
        run.pending.clear()
        if run in self.inflight:
            self.inflight.remove(run)

    def wants_more(self) -> bool:
        """Whether a new shard would keep the engine busy: nothing in flight, or every queued row
        already admitted (the batch will shrink as rows finish unless more arrive)."""
        if not self.inflight:
            return True
        if any(run.solo for run in self.inflight):
            return False
        cap = 1 + -(-self.llm.max_num_seqs // max(1, self.spec.execution.shard_rows))
        return self.llm.num_waiting == 0 and len(self.inflight) < cap

    def step(self) -> list[ShardRun]:
        """One engine step for every shard in flight; returns (and forgets) the shards now complete,
        with ``error`` set on those that must be retried.

        If the step raises, every in-flight shard's unfinished rows are re-run shard by shard,
        in halves, to corner the rows at fault (see the module doc); a CUDA error is re-raised.
        """
        try:
            for out in self.llm.step():
                self._record(out)
        except Exception as exc:  # noqa: BLE001 - isolate whatever the engine raised
            self.llm.abort_all()
            if is_fatal(exc):
                raise
            for run in self.inflight:
                items, run.pending = list(run.pending.values()), {}
                try:
                    self._generate(items, run.results, run.keep_going)
                except Exception as e:  # noqa: BLE001 - this shard's attempt fails, not the others
                    if is_fatal(e):
                        raise
                    run.error = e
        done = [run for run in self.inflight if run.done]
        self.inflight = [run for run in self.inflight if not run.done]
        return done

    def _record(self, out: CompletionOutput) -> None:
        for run in self.inflight:
            item = run.pending.pop(out.request_id, None)
            if item is not None:
                run.results[item.index] = out
                self.tokens_out += len(out.token_ids)
                return

    def finish(self, run: ShardRun) -> tuple[pa.Table, dict]:
        """The output table and counts of a complete shard."""
        done = [r for r in run.results if r is not None]
        assert len(done) == len(run.results), "every row has a result"
        outs = [r for r in done if not isinstance(r, str)]
        counts = {
            "rows": len(done),
            "rows_ok": sum(o.ok for o in outs),
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
            "completion_tokens": sum(len(o.token_ids) for o in outs),
            "seconds": time.monotonic() - run.started,
            "started": run.started_at,
            "finished": time.time(),
        }
        counts["rows_error"] = counts["rows"] - counts["rows_ok"]
        return output_table(self.spec, run.table, done), counts

    def _generate(self, todo: list[EngineRequest], results: list[Optional[RowResult]],
                  keep_going: Callable[[], None]) -> None:
        """Generate ``todo`` into ``results`` alone in the engine, cornering rows whose generation raises."""
        groups = [todo] if todo else []
        failed: list[tuple[int, Exception]] = []
        while groups:
            group = groups.pop()
            try:
                self._run_group(group, results, keep_going)
            except LeaseLost:
                self.llm.abort_all()
                raise
            except Exception as exc:  # noqa: BLE001 - isolate whatever the engine raised
                self.llm.abort_all()
                if is_fatal(exc):
                    raise
                left = [item for item in group if results[item.index] is None]
                if len(left) > 1:
                    mid = len(left) // 2
                    groups += [left[mid:], left[:mid]]
                else:
                    failed += [(item.index, exc) for item in left]
        if failed and len(failed) == len(todo):
            raise failed[-1][1]  # nothing generated at all: blame the engine, retry the shard
        for index, exc in failed:
            results[index] = f"generation failed: {type(exc).__name__}: {exc}"

    def _run_group(self, group: list[EngineRequest], results: list[Optional[RowResult]],
                   keep_going: Callable[[], None]) -> None:
        for request in group:
            self._submit(request, str(request.index))
        while self.llm.has_unfinished():
            keep_going()
            for out in self.llm.step():
                results[int(out.request_id)] = out
