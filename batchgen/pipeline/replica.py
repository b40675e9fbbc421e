"""A replica: one model replica that leases shards from the queue until there are none left.

:class:`ShardWorker` is the part that turns one shard into one output table; it runs in any
process (tests drive it directly). :class:`Replica` is the Ray actor around it: lease, work,
heartbeat, publish, ack.

Failure handling, from the smallest blast radius up:

- A poison row (null, empty, invalid UTF-8, too long for the context, bad override) becomes an
  error row without touching the others (``build_prompts`` and the engine report it).
- A row whose *generation raises* is cornered in the process: each in-flight shard's rows not
  finished yet are run again, shard by shard, in halves, down to single rows, and a row that
  still raises alone becomes an error row (``generation failed: ...``). If no row of a shard
  could be generated at all, the failure looks like the engine's rather than the rows', so that
  attempt fails instead (nack) and the queue retries the shard, possibly on another replica.
- A CUDA error (not an out-of-memory one) leaves the device unusable for this process: the
  attempt is nacked and the process exits, so that Ray starts a fresh one.
- A replica process that dies (SIGKILL, OOM killer, a row that crashes it) is restarted by Ray;
  the driver hands its leases back at once. A shard that failed once (and every piece of a
  split one) then runs alone, so a row that kills its process cannot use up the attempts of
  the shards beside it; one that keeps killing replicas runs out of attempts and the driver
  splits it (see :mod:`batchgen.pipeline.driver`).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import pyarrow as pa

from batchgen.engine import LLM, CompletionOutput, SamplingParams
from batchgen.pipeline.faults import Faults, exit_replica
from batchgen.pipeline.shards import PromptRow, Shard, build_prompts, read_shard, resolve_filesystem
from batchgen.pipeline.spec import JobSpec
from batchgen.pipeline.writer import output_schema, publish_part, publish_shard, with_retries
from batchgen.prompts import PromptError

#: Longest time between a running shard's heartbeats, which carry its finished rows to the queue.
PROGRESS_EVERY_S = 5.0
#: How often a replica publishes its tokens/s gauge (a local call; Ray exports it on its own cadence).
GAUGE_EVERY_S = 1.0


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
               compile_decode=m.compile_decode, prefix_caching=m.prefix_caching)


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


def output_table(spec: JobSpec, table: pa.Table, results: Sequence[RowResult]) -> pa.Table:
    """The output rows for the input rows ``table`` (id and keep columns): one result each, an
    engine output or the error text of a row that did not run."""
    keep = spec.input.keep_columns
    schema = output_schema(spec, table.schema.field(spec.input.id_column).type,
                           {c: table.schema.field(c).type for c in keep})
    cols: dict[str, list] = {name: [] for name in schema.names}
    for out in results:
        if isinstance(out, str):
            out = CompletionOutput(request_id="", prompt_token_ids=[], token_ids=[], text=None,
                                   finish_reason="error", error=out)
        ok = out.ok
        cols["completion"].append(out.text if ok else None)
        cols["finish_reason"].append(out.finish_reason)
        cols["prompt_tokens"].append(len(out.prompt_token_ids))
        cols["completion_tokens"].append(len(out.token_ids))
        # Every error row says why; an engine error without text would break that promise.
        cols["error"].append(None if ok else (out.error or "error without a message"))
        if "logprobs" in cols:
            cols["logprobs"].append(out.logprobs if ok else None)
        if "token_ids" in cols:
            cols["token_ids"].append(out.token_ids if ok else None)
    cols[spec.input.id_column] = table.column(spec.input.id_column).to_pylist()
    for c in keep:
        cols[c] = table.column(c).to_pylist()
    return pa.table(cols, schema=schema)


@dataclass
class _Item:
    index: int  # row index in the shard
    prompt: Any  # text, or token ids for chat
    params: SamplingParams
    text: str  # the raw prompt text, for the fault hook


@dataclass(eq=False)
class ShardRun:
    """One shard in the engine: its rows' results so far and the rows still generating."""

    shard: Shard
    table: pa.Table
    results: list[Optional[RowResult]]
    pending: dict[str, _Item]  # engine request id -> row still generating
    keep_going: Callable[[], None]
    started: float  # time.monotonic(), for durations
    started_at: float  # time.time(), for the summary's timeline
    context: Any = None  # the caller's (the replica keeps its lease here)
    error: Optional[Exception] = None  # set when the shard cannot be completed: nack it
    texts: list[str] = field(default_factory=list)  # prompts, for the fault hook
    solo: bool = False  # failed before: nothing else joins the engine while it runs
    stepped: bool = False

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

    def __init__(self, spec: JobSpec, llm: LLM, faults: Optional[Faults] = None) -> None:
        self.spec = spec
        self.llm = llm
        self.faults = faults
        self.inflight: list[ShardRun] = []
        self._tags = itertools.count()
        #: Completion tokens of every row finished so far (the replica's throughput gauge reads it).
        self.tokens_out = 0

    def _prompt(self, row: PromptRow) -> Any:
        """The engine input of a row: chat conversations as token ids (Meta's rendering), else the text.

        Without a tokenizer the text goes to the engine, which reports that it cannot encode it.
        """
        return row.engine_input(self.llm.tokenizer)

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
        rows = build_prompts(table, spec)
        run = ShardRun(shard, table, [None] * len(rows), {}, keep_going, started, started_at, context, solo=solo)
        tag = f"{next(self._tags)}/"
        for i, row in enumerate(rows):
            if row.error is not None:
                run.results[i] = row.error
                continue
            try:
                prompt = self._prompt(row)
            except PromptError as e:  # build_prompts validated it already; never let one row fail the shard
                run.results[i] = str(e)
                continue
            try:
                item = _Item(i, prompt, row_sampling(spec, row), row.prompt or "")
            except ValueError as e:
                run.results[i] = f"bad sampling override: {e}"
                continue
            run.pending[tag + str(i)] = item
            run.texts.append(item.text)
            self.llm.add_request(item.prompt, item.params, request_id=tag + str(i))
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
            if self.faults is not None:
                self.faults.on_step()
                for run in self.inflight:
                    if not run.stepped:
                        run.stepped = True
                        self.faults.on_rows(run.texts)
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

    def _generate(self, todo: list[_Item], results: list[Optional[RowResult]],
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

    def _run_group(self, group: list[_Item], results: list[Optional[RowResult]],
                   keep_going: Callable[[], None]) -> None:
        for item in group:
            self.llm.add_request(item.prompt, item.params, request_id=str(item.index))
        steps = 0
        while self.llm.has_unfinished():
            keep_going()
            for out in self.llm.step():
                results[int(out.request_id)] = out
            steps += 1
            if self.faults is not None:
                self.faults.on_step()
                if steps == 1:
                    self.faults.on_rows([item.text for item in group])


# --------------------------------------------------------------------------------------- the actor

@dataclass(frozen=True)
class Task:
    """A queue entry: run the rows of ``shard`` and publish them as the planned shard
    ``root_id``, or, when ``shard`` is a piece of it (after a split), as one of its parts."""

    shard: Shard
    root_id: str

    @property
    def is_part(self) -> bool:
        return self.shard.shard_id != self.root_id


def _host() -> str:
    return socket.gethostname()


class Replica:
    """Ray actor: one model replica pulling shards from the queue until it is empty.

    The driver creates it with ``max_restarts=-1``: after a crash Ray runs ``__init__`` again in
    a new process and the driver submits ``run`` again. The queue is found by its actor name
    in each incarnation, so nothing but plain values has to be kept for restarts.
    """

    def __init__(self, spec: dict, queue_name: str, replica_id: str, torch_threads: Optional[int] = None,
                 faults: Optional[str] = None) -> None:
        import ray
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.spec = JobSpec.model_validate(spec)
        self.queue = ray.get_actor(queue_name)
        self.replica_id = replica_id
        self.faults = Faults.parse(faults)
        from batchgen.pipeline.metrics import TokenRate

        self.worker: Optional[ShardWorker] = None
        self._rate = TokenRate()
        self._tokens_seen = 0  # worker.tokens_out already added to _rate
        self._gauge_at = 0.0
        # One thread: shards are published in the order they finish, one at a time.
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchgen-publish")
        # (future, lease, counts, summary, heartbeat) of each shard being published
        self._publishing: list[tuple[Future, dict, dict, dict, Callable[[], None]]] = []

    def ready(self) -> str:
        return f"{self.replica_id}@{_host()} pid {os.getpid()}"

    def _fault(self, point: str) -> None:
        if self.faults is not None:
            self.faults.at(point)

    def run(self) -> dict:
        """Lease, process, publish and ack shards until the queue has nothing left (or is closed).

        The next shard is leased as soon as the engine has admitted every row it holds, so its
        rows fill the slots that the current shards' last rows leave (see :class:`ShardWorker`).
        Finished shards are published on a background thread: a slow object store (a PUT that
        retries for a minute) neither stalls the engine nor starves the heartbeats of the
        shards still running.
        """
        import ray

        from batchgen.pipeline.metrics import JobMetrics

        if self.worker is None:
            self._fault("load")
            self.worker = ShardWorker(self.spec, build_llm(self.spec), self.faults)
        worker = self.worker
        metrics = JobMetrics(self.spec.name)
        done = 0
        next_ask = 0.0  # when the queue had nothing, ask again only after a pause, not every step
        while True:
            done += self._collect_published(metrics, wait_s=0.0 if worker.inflight else 0.2)
            if worker.wants_more() and (not worker.inflight or time.monotonic() >= next_ask):
                # With shards in flight, ask only for shards that never failed (see ShardQueue.lease).
                lease = ray.get(self.queue.lease.remote(self.replica_id, bool(worker.inflight)))
                if lease is not None:
                    self._start(lease, metrics)
                    continue
                if not worker.inflight:
                    if self._publishing:
                        continue  # our own leases are still open: the queue cannot be finished
                    if ray.get(self.queue.is_finished.remote()):
                        self._update_rate(metrics, force=True)  # a job shorter than GAUGE_EVERY_S too
                        return {"replica": self.replica_id, "shards": done}
                    time.sleep(0.5)  # others hold leases that may still come back
                    continue
                next_ask = time.monotonic() + 0.5
            if not worker.inflight:
                continue
            try:
                for run in list(worker.inflight):
                    try:
                        run.keep_going()
                    except LeaseLost:
                        worker.drop(run)
                finished = worker.step()
            except Exception as e:  # noqa: BLE001 - a CUDA error (others are the rows'): start afresh
                for run in worker.inflight:
                    self._fail(run.context, e, metrics)
                exit_replica(f"{type(e).__name__}: {e}; this process's device state is not trusted any more")
            for run in finished:
                self._complete(run, metrics)
            self._update_rate(metrics)

    def _update_rate(self, metrics: Any, force: bool = False) -> None:
        """Feed the rows that finished into the replica's tokens/s; publish it every few seconds."""
        tokens = self.worker.tokens_out
        if tokens != self._tokens_seen:
            self._rate.add(tokens - self._tokens_seen)
            self._tokens_seen = tokens
        now = time.monotonic()
        if force or now - self._gauge_at >= GAUGE_EVERY_S:
            self._gauge_at = now
            rate = self._rate.rate()
            if rate is not None:
                metrics.replica_throughput(self.replica_id, rate)

    def _start(self, lease: dict, metrics: Any) -> None:
        import ray

        shard = lease["payload"].shard
        last_beat = time.monotonic()
        # Heartbeats also carry the rows finished so far (the driver's progress line counts them
        # before the shard commits), so they come at least every PROGRESS_EVERY_S.
        every = min(self.spec.execution.heartbeat_s, PROGRESS_EVERY_S)
        started: list[ShardRun] = []

        def keep_going() -> None:
            nonlocal last_beat
            if time.monotonic() - last_beat >= every:
                last_beat = time.monotonic()
                progress = started[0].progress() if started else None
                if not ray.get(self.queue.heartbeat.remote(lease["lease_id"], progress)):
                    raise LeaseLost(shard.shard_id)

        self._rate.start()
        try:
            started.append(self.worker.start(shard, keep_going, context=lease, solo=lease["solo"]))
        except Exception as e:  # noqa: BLE001 - unreadable shard: this attempt fails
            self._fail(lease, e, metrics)

    def _complete(self, run: ShardRun, metrics: Any) -> None:
        """Hand a finished shard to the publishing thread (or nack it)."""
        lease, task = run.context, run.context["payload"]
        if isinstance(run.error, LeaseLost):
            return
        if run.error is not None:
            self._fail(lease, run.error, metrics)
            return
        try:
            table, counts = self.worker.finish(run)
        except Exception as e:  # noqa: BLE001 - any failure of an attempt goes back to the queue
            self._fail(lease, e, metrics)
            return
        summary = {
            "shard_id": task.shard.shard_id, "input_file": task.shard.relpath, "row_start": task.shard.row_start,
            **counts, "attempts": lease["attempt"], "replica": self.replica_id, "host": _host(),
        }
        future = self._publisher.submit(self._publish, task, table, summary)
        self._publishing.append((future, lease, counts, summary, run.keep_going))

    def _collect_published(self, metrics: Any, wait_s: float) -> int:
        """Ack the shards whose publishing ended (nack those where it failed); the number acked."""
        import ray

        if not self._publishing:
            return 0
        # A lease lives until its shard is acked: one publish retrying for minutes (the others
        # queue behind it on the one thread) must not let the leases of the others expire.
        for *_, keep_going in self._publishing:
            try:
                keep_going()
            except LeaseLost:
                pass  # someone else has it now; our ack will be refused or win as a late ack
        if wait_s:
            futures_wait([f for f, *_ in self._publishing], timeout=wait_s, return_when=FIRST_COMPLETED)
        acked, still = 0, []
        for entry in self._publishing:
            future, lease, counts, summary, _ = entry
            if not future.done():
                still.append(entry)
                continue
            error = future.exception()
            if error is not None:
                self._fail(lease, error, metrics)
                continue
            if not ray.get(self.queue.ack.remote(lease["lease_id"], summary)):
                continue
            acked += 1
            metrics.shard_done(counts["rows_ok"], counts["rows_error"], counts["prompt_tokens"],
                               counts["completion_tokens"], self.replica_id, counts["seconds"])
        self._publishing = still
        return acked

    def _fail(self, lease: dict, error: BaseException, metrics: Any) -> None:
        import ray

        metrics.shard_failed(self.replica_id)
        ray.get(self.queue.nack.remote(lease["lease_id"], f"{type(error).__name__}: {error}"))

    def _publish(self, task: Task, table: pa.Table, summary: dict) -> None:
        fs, root = resolve_filesystem(self.spec.output.path)
        hook = (lambda: self._fault("publish")) if self.faults is not None else None
        if task.is_part:
            publish_part(fs, root, task.root_id, task.shard.shard_id, table, summary=summary, before_commit=hook)
        else:
            publish_shard(fs, root, task.root_id, table, summary=summary, before_commit=hook)
