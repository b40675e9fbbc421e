"""``batchgen bench --pipeline``: the bench's workload as a Parquet job through the Ray pipeline.

The bare engine answers "how fast is the engine"; a user runs jobs, which add Ray, shards, a
queue, Parquet in and out, per-shard publishing and the tail of each shard. This runs the same
prompts, with the same weights, as a real job (``run_job``, local Ray on 127.0.0.1) at 1 and 2
replicas, checks that every row's tokens are the bare engine's (a divergence only at a near-tie,
as against transformers), and reports each job's wall time against the bare engine's. The
bare engine runs between rounds of jobs, with Ray stopped, so both see the same load drift.

The random model needs a tokenizer so that its prompts can live in a Parquet text column: a
synthetic SentencePiece model in which token ``i`` is the word ``t<i>``, so the text
``"t17 t4242"`` encodes to exactly ``[BOS, 17, 4242]`` and no id is lost on the way.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from batchgen.bench.core import RunResult, Workload, compare_tokens
from batchgen.model import Transformer

BOS_ID = 1
#: Token 3 is the tokenizer's one piece without a leading "▁" (streaming decode needs one);
#: prompts avoid it, because the word would glue to its neighbour. Outputs may contain it.
ANCHOR_ID = 3


def word_tokenizer(vocab_size: int) -> bytes:
    """A serialized SentencePiece unigram model: ``<unk>`` ``<s>`` ``</s>``, the plain piece ``t3``,
    then ``▁t<i>`` for every other id, so that space-separated words ``t<i>`` encode one id each."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    piece = pb.ModelProto.SentencePiece
    m = pb.ModelProto()
    m.pieces.add(piece="<unk>", score=0.0, type=piece.UNKNOWN)
    m.pieces.add(piece="<s>", score=0.0, type=piece.CONTROL)
    m.pieces.add(piece="</s>", score=0.0, type=piece.CONTROL)
    m.pieces.add(piece=f"t{ANCHOR_ID}", score=-1.0, type=piece.NORMAL)
    for i in range(ANCHOR_ID + 1, vocab_size):
        m.pieces.add(piece=f"\u2581t{i}", score=-1.0, type=piece.NORMAL)
    m.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    m.trainer_spec.vocab_size = vocab_size
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"  # no NFKC tables needed: the text is ASCII
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = True
    m.normalizer_spec.escape_whitespaces = True
    return m.SerializeToString()


def pipeline_workload(wl: Workload) -> Workload:
    """``wl`` as a job sees it: BOS first (the tokenizer adds it; the length stays), no anchor id."""
    prompts = [[BOS_ID] + [ANCHOR_ID + 1 if t == ANCHOR_ID else t for t in p[1:]] for p in wl.prompts]
    return Workload(prompts, list(wl.max_tokens))


def prompt_text(ids: list[int]) -> str:
    """The text whose encoding (with BOS) is ``ids``."""
    assert ids[0] == BOS_ID and ANCHOR_ID not in ids
    return " ".join(f"t{i}" for i in ids[1:])


class PipelineBench:
    """A model directory (HF layout + the word tokenizer), the workload as Parquet, and its jobs.

    Each :meth:`round` starts a local Ray, runs every replica count's job once and stops Ray
    again, so that the bare engine, timed between rounds, runs alone as in the main bench and
    load drift on a shared machine lands on both.
    """

    def __init__(self, model: Transformer, wl: Workload, workdir: Path, replicas: list[int], shard_rows: int,
                 max_num_seqs: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from batchgen.checkpoint_save import save_hf
        from batchgen.tokenizer import Tokenizer

        self.model, self.wl, self.workdir, self.replicas = model, wl, workdir, replicas
        self.shard_rows, self.max_num_seqs = shard_rows, max_num_seqs
        self.results = {n: RunResult(tokens=[]) for n in replicas}
        self.startup_s: dict[int, list[float]] = {n: [] for n in replicas}
        self.info: dict[int, dict[str, Any]] = {}
        self.ray_start_s: list[float] = []
        self.model_dir = workdir / "model"
        save_hf({k: v.float().cpu() for k, v in model.state_dict().items()}, model.args, self.model_dir)
        (self.model_dir / "tokenizer.model").write_bytes(word_tokenizer(model.args.vocab_size))
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        tok = Tokenizer(self.model_dir / "tokenizer.model")
        texts = [prompt_text(p) for p in wl.prompts]
        bad = next((i for i, (t, p) in enumerate(zip(texts, wl.prompts)) if tok.encode(t, bos=True) != p), None)
        if bad is not None:
            raise RuntimeError(f"word tokenizer does not round-trip prompt {bad}")
        self.input = workdir / "prompts.parquet"
        pq.write_table(pa.table({"id": list(range(len(texts))), "prompt": texts,
                                 "max_tokens": pa.array(wl.max_tokens, pa.int32())}),
                       self.input, row_group_size=max(1, min(shard_rows, 1000)))

    @staticmethod
    def _start_ray() -> float:
        # A local Ray listens on loopback only; Ray reads this switch when it is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        t0 = time.perf_counter()
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=os.cpu_count(),
                 log_to_driver=False)
        return time.perf_counter() - t0

    def spec(self, replicas: int) -> Any:
        from batchgen.pipeline.spec import validate_spec

        return validate_spec({
            "name": f"bench-{replicas}",
            "model": {"path": str(self.model_dir), "dtype": self.dtype, "max_seq_len": self.wl.max_total_len,
                      "max_num_seqs": self.max_num_seqs},
            "input": {"path": str(self.input), "id_column": "id", "prompt_column": "prompt"},
            "sampling": {"max_tokens": max(self.wl.max_tokens), "ignore_eos": True,
                         "overrides": {"max_tokens": "max_tokens"}},
            "output": {"path": str(self.workdir / f"out-{replicas}"), "mode": "overwrite", "token_ids": True},
            "execution": {"replicas": replicas, "shard_rows": self.shard_rows},
        })

    def round(self) -> None:
        """Every replica count's job once, on a local Ray started for this round and stopped after it."""
        import ray

        self.ray_start_s.append(self._start_ray())
        try:
            for n in self.replicas:
                self.info[n] = self.run(n)
        finally:
            ray.shutdown()

    def run(self, replicas: int) -> dict[str, Any]:
        """One timed job (Ray already up; replica start and model load included)."""
        import pyarrow.parquet as pq

        from batchgen.pipeline.driver import run_job

        spec, result = self.spec(replicas), self.results[replicas]
        wall0, t0 = time.time(), time.perf_counter()
        summary = run_job(spec, dashboard=False, progress_every_s=3600)
        result.seconds.append(time.perf_counter() - t0)
        out = Path(spec.output.path)
        rows = pq.read_table(out / "shards", columns=["id", "token_ids", "error"]).to_pylist()
        errors = [r for r in rows if r["error"] is not None]
        if errors or len(rows) != len(self.wl.prompts):
            raise RuntimeError(f"pipeline job with {replicas} replicas: {len(rows)} rows, {len(errors)} errors "
                               f"({errors[0]['error'] if errors else ''})")
        by_id = {r["id"]: r["token_ids"] for r in rows}
        result.tokens = [by_id[i] for i in range(len(self.wl.prompts))]
        shards = pq.read_table(out / "summary.parquet", columns=["replica", "seconds", "started"]).to_pylist()
        # Planning, actor start, model load and the first read: what a job costs before it computes.
        self.startup_s[replicas].append(min(s["started"].timestamp() for s in shards) - wall0)
        busy: dict[str, float] = {}
        for s in shards:
            busy[s["replica"]] = busy.get(s["replica"], 0.0) + s["seconds"]
        return {"replicas": replicas, "shards": summary["shards"], "replica_busy_seconds": sorted(busy.values())}

    def report(self, engine: RunResult, tie_tol: float) -> list[dict[str, Any]]:
        """Each replica count's times, overhead and token agreement against the bare engine's runs.

        Uses only what the rounds kept in memory: the job files may already be removed.
        """
        reports = []
        for n in self.replicas:
            result = self.results[n]
            check = compare_tokens(self.model, None, self.wl, result.tokens, engine.tokens, tie_tol)
            reports.append({
                **self.info[n],
                "seconds": result.seconds,
                "startup_seconds": self.startup_s[n],
                "engine_seconds": engine.seconds,
                "ray_start_seconds": self.ray_start_s,
                "tokens_per_s": self.wl.output_tokens / result.median_s,
                "overhead_vs_engine": result.median_s / engine.median_s - 1,
                "tokens_match_fraction": check["tokens_match_fraction"],
                "divergences": check["divergences"],
                "ok": check["ok"],
            })
        return reports


@contextmanager
def pipeline_bench(model: Transformer, wl: Workload, replicas: list[int], shard_rows: int, max_num_seqs: int,
                   workdir: Optional[str] = None) -> Iterator[PipelineBench]:
    """A :class:`PipelineBench` in a temporary directory that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="batchgen-bench-pipeline-", dir=workdir) as tmp:
        yield PipelineBench(model, wl, Path(tmp), replicas, shard_rows, max_num_seqs)
