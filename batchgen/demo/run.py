"""``batchgen demo``: the bundled model answers held-out problems through the whole pipeline.

Writes a Parquet file of held-out prompts (never seen in training), a job spec for them, runs
the job exactly as ``batchgen run`` would (local Ray, 2 replicas, several shards), then prints
the summary, a few rows and the exact-match accuracy. The same job is in ``jobs/demo.yaml``.

A fifth of the rows are a task the bundled model never learnt, descending sort (``desc: 5 1 3 =``),
and the job carries the LoRA adapter that teaches it (``batchgen/demo/adapters/desc``, trained by
``python -m batchgen.demo.lora_train``): the ``adapter`` column sends half of those rows to the
adapter and leaves the other half (and every other row) on the base model, all in the same job
and the same engine steps. Each group's accuracy is printed: the base cannot sort descending, the
adapter can.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from batchgen.demo.task import make_examples

MODEL_DIR = Path(__file__).resolve().parent / "model"
ADAPTER_DIR = Path(__file__).resolve().parent / "adapters" / "desc"
ACCURACY_BAR = 0.95
#: The groups of rows, in the order they are printed: (task, model).
GROUPS = (("base task", "base"), ("desc", "base"), ("desc", "adapter"))


def write_prompts(path: Path, rows: int, seed: int, row_group_size: int = 50) -> None:
    """Held-out problems as Parquet: ``id``, ``prompt``, ``answer``, ``adapter`` (the LoRA adapter
    a row runs with, null for the base model). A fifth of the rows are descending sorts, every
    other one of them sent to the ``desc`` adapter; the rows are interleaved, so every shard mixes
    base and adapter rows."""
    from batchgen.demo.lora_train import desc_examples

    n_desc = rows // 5
    base = make_examples(rows - n_desc, seed=seed, split="heldout")
    desc = desc_examples(n_desc, seed, "heldout")
    every = max(1, rows // max(1, n_desc))
    examples: list[tuple[str, str, str | None]] = []
    for i in range(rows):  # a desc row every `every` rows, alternating adapter / base
        if desc and (i % every == every - 1 or len(desc) >= rows - i):
            p, a = desc.pop(0)
            examples.append((p, a, "desc" if len(desc) % 2 == 0 else None))
        else:
            p, a = base.pop(0)
            examples.append((p, a, None))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "id": list(range(len(examples))),
        "prompt": [p for p, _, _ in examples],
        "answer": [a for _, a, _ in examples],
        "adapter": pa.array([n for _, _, n in examples], pa.string()),
    }), path, row_group_size=row_group_size)


def demo_spec(out_dir: Path, replicas: int, shard_rows: int) -> dict[str, Any]:
    """The demo job, with absolute paths so it runs from any directory."""
    return {
        "name": "demo",
        "model": {"path": str(MODEL_DIR), "dtype": "float32", "adapters": {"desc": str(ADAPTER_DIR)}},
        "input": {"path": str(out_dir / "prompts.parquet"), "id_column": "id", "prompt_column": "prompt",
                  "keep_columns": ["prompt", "answer", "adapter"], "adapter_column": "adapter"},
        "sampling": {"max_tokens": 16, "temperature": 0.0},
        "output": {"path": str(out_dir / "results"), "mode": "overwrite"},
        "execution": {"replicas": replicas, "shard_rows": shard_rows},
    }


def group_of(row: dict) -> tuple[str, str]:
    """(task, model) of an output row."""
    return ("desc" if row["prompt"].startswith("desc:") else "base task", "adapter" if row["adapter"] else "base")


def accuracy(results_dir: Path) -> tuple[int, int, list[dict], dict[tuple[str, str], tuple[int, int]]]:
    """(correct, total, rows, per group (correct, total)) over the job's output: a row is correct
    when its completion equals the expected answer. ``correct``/``total`` count the rows each
    model is meant to solve (all but the descending sorts left on the base model)."""
    rows = pq.ParquetDataset(results_dir / "shards").read().sort_by("id").to_pylist()
    groups = {g: [0, 0] for g in GROUPS}
    for r in rows:
        r["correct"] = r["error"] is None and r["completion"].strip() == r["answer"]
        g = groups[group_of(r)]
        g[0] += r["correct"]
        g[1] += 1
    solved = [g for g in GROUPS if g != ("desc", "base")]
    return (sum(groups[g][0] for g in solved), sum(groups[g][1] for g in solved), rows,
            {g: (c, n) for g, (c, n) in groups.items()})


def run_demo(out_dir: Path = Path("demo-out"), rows: int = 500, replicas: int = 2, shard_rows: int = 50,
             seed: int = 0, dashboard: bool = True, show: int = 5) -> int:
    """Run the demo job; print summary, sample rows and accuracy. Exit code 0 if it meets the bar."""
    from batchgen.pipeline.driver import run_job
    from batchgen.pipeline.spec import validate_spec

    out_dir = out_dir.resolve()
    prompts_path = out_dir / "prompts.parquet"
    write_prompts(prompts_path, rows, seed, row_group_size=shard_rows)  # one row group per shard
    spec_dict = demo_spec(out_dir, replicas, shard_rows)
    (out_dir / "demo.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False))
    summary = run_job(validate_spec(spec_dict), dashboard=dashboard, progress_every_s=5)

    correct, total, table, groups = accuracy(out_dir / "results")
    print("summary:", json.dumps({k: summary[k] for k in (
        "shards", "rows", "rows_ok", "rows_error", "prompt_tokens", "completion_tokens", "seconds")}, default=str))
    print(f"per-shard summary: {out_dir / 'results' / 'summary.parquet'}")
    # The first rows, and the first of each group they leave out (an adapter row among them).
    shown = table[:show] + [next(r for r in table if group_of(r) == g) for g in GROUPS
                            if all(group_of(r) != g for r in table[:show]) and any(group_of(r) == g for r in table)]
    for r in shown:
        mark = "ok " if r["correct"] else "BAD"
        print(f"  {mark} id={r['id']:<4} {r['prompt']!r:34} -> {r['completion']!r} "
              f"(expected {r['answer']!r}, {r['finish_reason']}{', adapter ' + r['adapter'] if r['adapter'] else ''})")
    acc = correct / total if total else 0.0
    # rows_ok counts rows the model completed without an error; accuracy counts completions that
    # equal the expected answer. A row can be ok and still wrong.
    print(f"rows_ok: {summary['rows_ok']} of {summary['rows']} rows generated without an error")
    for (task, model), (c, n) in groups.items():
        print(f"  {task + ' rows':15} on the {model + ' model':13}: accuracy {c / n if n else 0:.2f} ({c}/{n})")
    print(f"accuracy: {acc:.2f} ({correct}/{total} completions equal the expected answer)")
    print(f"output: {out_dir / 'results'}")
    return 0 if acc >= ACCURACY_BAR else 1


def add_demo_args(p: Any) -> None:
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="where prompts and results go")
    p.add_argument("--rows", type=int, default=500)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--shard-rows", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dashboard", action="store_true")


def run_demo_args(args: Any) -> int:
    return run_demo(args.out, args.rows, args.replicas, args.shard_rows, args.seed, not args.no_dashboard)
