"""`batchgen demo` end to end: the bundled model through tokenizer, engine, shards, replicas and Parquet.

A regression in RoPE, the KV cache, batching or detokenisation drops the accuracy below the bar.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def test_demo_job_meets_the_accuracy_bar(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-m", "batchgen", "demo", "--out", str(tmp_path), "--rows", "160",
         "--shard-rows", "20", "--no-dashboard"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    m = re.search(r"^accuracy: (\d\.\d\d) \((\d+)/(\d+) completions equal the expected answer\)$", res.stdout, re.M)
    assert re.search(r"^rows_ok: \d+ of 160 rows generated without an error$", res.stdout, re.M), res.stdout
    assert m, res.stdout
    correct, total = int(m.group(2)), int(m.group(3))
    # 160 rows: 32 descending sorts (16 on the adapter, 16 left on the base model, which cannot
    # do them and is not scored on them), 128 base-task rows.
    assert total == 160 - 16 and correct / total >= 0.95
    groups = {(g[0], g[1]): (int(g[3]), int(g[4])) for g in re.findall(
        r"^  (base task|desc) rows +on the (base|adapter) model *: accuracy (\d\.\d\d) \((\d+)/(\d+)\)$", res.stdout, re.M)}
    assert set(groups) == {("base task", "base"), ("desc", "base"), ("desc", "adapter")}, res.stdout
    assert groups[("desc", "base")][1] == groups[("desc", "adapter")][1] == 16
    assert groups[("desc", "base")][0] <= 2  # the base model cannot sort descending...
    assert groups[("desc", "adapter")][0] >= 15  # ...the LoRA adapter taught it, in the same job
    # The numbers come from the job's real output: 8 shards, every id once.
    out = pq.ParquetDataset(tmp_path / "results" / "shards").read()
    assert sorted(out.column("id").to_pylist()) == list(range(160))
    summary = pq.read_table(tmp_path / "results" / "summary.parquet").to_pylist()
    assert len(summary) == 8 and {s["replica"] for s in summary} <= {"batchgen-demo-replica-0", "batchgen-demo-replica-1"}
    assert (tmp_path / "results" / "_SUCCESS").exists()
