"""Classification and structured output as jobs: the spec, validate's exit 2, and a run through local Ray."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from batchgen.demo import task
from batchgen.pipeline.driver import run_job
from batchgen.pipeline.spec import SpecError, spec_fingerprint, validate_spec

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test dependency")

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "batchgen" / "demo" / "model"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 200},
                                           "ok": {"type": "boolean"}},
          "required": ["answer", "ok"], "additionalProperties": False}


def base(tmp_path: Path, **sections) -> dict:
    spec = {"name": "cls", "model": {"path": str(DEMO_MODEL), "dtype": "float32"},
            "input": {"path": str(tmp_path / "in"), "id_column": "id", "prompt_column": "prompt",
                      "keep_columns": ["answer"]},
            "sampling": {"max_tokens": 12},
            "output": {"path": str(tmp_path / "out")},
            "execution": {"replicas": 1, "shard_rows": 10, "heartbeat_s": 1, "lease_timeout_s": 60}}
    for k, v in sections.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    return spec


def write_input(tmp_path: Path, n: int = 20) -> list[tuple[str, str]]:
    ex = task.make_examples(n, seed=5, split="heldout", mix={"add": 1.0})
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    choices = [[a, str(int(a) + 1), str(int(a) + 10)] for _, a in ex]
    choices[3] = None  # a null cell: an error row
    pq.write_table(pa.table({"id": list(range(n)), "prompt": [p for p, _ in ex], "answer": [a for _, a in ex],
                             "opts": pa.array(choices, pa.list_(pa.string()))}), tmp_path / "in" / "part.parquet")
    return ex


def test_spec_sections_and_their_errors(tmp_path: Path) -> None:
    s = validate_spec(base(tmp_path, classify={"choices": ["a", "b"], "normalize": "tokens"}))
    assert s.classify.choices == ["a", "b"] and "label" in s.input.keep_columns + ["label"]
    assert spec_fingerprint(s) != spec_fingerprint(validate_spec(base(tmp_path, classify={"choices": ["a", "c"]})))
    bad = [({"classify": {"choices": ["a"], "choices_column": "opts"}}, "classify.choices"),
           ({"classify": {"normalize": "mean", "choices": ["a"]}}, "classify.normalize"),
           ({"classify": {"choices": ["a", "a"]}}, "classify.choices"),
           ({"sampling": {"regex": "a", "choice": ["x"]}}, "sampling.choice"),
           ({"sampling": {"regex": "("}}, "sampling.regex"),
           ({"sampling": {"json_schema": {"type": "nonsense"}}}, "sampling.json_schema"),
           ({"sampling": {"json_schema": str(tmp_path / "missing.json")}}, "sampling.json_schema"),
           ({"classify": {"choices": ["a"]}, "sampling": {"regex": "a"}}, "classify"),
           ({"input": {"keep_columns": ["label"]}}, "input.keep_columns")]
    for extra, where in bad:
        with pytest.raises(SpecError) as e:
            validate_spec(base(tmp_path, **extra))
        assert any(path == where for path, _ in e.value.errors), (extra, e.value.errors)
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    s = validate_spec(base(tmp_path, sampling={"json_schema": str(tmp_path / "s.json")}))
    assert s.sampling.constraint() == ("json_schema", SCHEMA)  # the file's content travels in the spec


def test_validate_refuses_a_schema_the_engine_cannot_compile_with_exit_2(tmp_path: Path) -> None:
    write_input(tmp_path)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(base(tmp_path, sampling={"json_schema": {"type": "object", "properties": {
        "x": {"type": "string", "format": "no-such-format"}}}})))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "batchgen", "validate", str(path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "sampling.json_schema" in res.stderr, res.stderr


def test_classify_and_extraction_jobs(tmp_path: Path) -> None:
    ex = write_input(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        run_job(validate_spec(base(tmp_path, classify={"choices_column": "opts"})))
        rows = {r["id"]: r for r in pq.ParquetDataset(tmp_path / "out" / "shards").read().to_pylist()}
        assert sorted(rows) == list(range(len(ex)))
        assert rows[3]["finish_reason"] == "error" and "opts" in rows[3]["error"] and rows[3]["label"] is None
        ok = [r for i, r in rows.items() if i != 3]
        for r in ok:
            assert r["finish_reason"] == "stop" and r["completion"] is None and r["error"] is None
            assert len(r["label_logprobs"]) == 3 and math.isclose(sum(r["label_probs"]), 1.0, abs_tol=1e-9)
        assert sum(r["label"] == r["answer"] for r in ok) >= len(ok) - 1

        out2 = tmp_path / "out2"
        run_job(validate_spec(base(tmp_path, sampling={"json_schema": SCHEMA, "max_tokens": 30},
                                   output={"path": str(out2)})))
        rows = pq.ParquetDataset(out2 / "shards").read().to_pylist()
        assert len(rows) == len(ex) and "label" not in rows[0]
        for r in rows:
            assert r["finish_reason"] == "stop", r
            jsonschema.validate(json.loads(r["completion"]), SCHEMA)
    finally:
        ray.shutdown()


def test_generate_choices_and_structured_output_flags(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "batchgen", "generate", "--model", str(DEMO_MODEL),
                               "--dtype", "float32", "--device", "cpu", *args], env=env, capture_output=True,
                              text=True, timeout=300)

    res = cli("--prompt", "12+45=", "--choices", "58,57,dog cat", "--json")
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["label"] == "57" and len(rec["label_probs"]) == 3 and rec["text"] is None
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    res = cli("--prompt", "12+45=", "--json-schema", str(tmp_path / "s.json"), "--max-tokens", "30", "--json")
    rec = json.loads(res.stdout)
    assert res.returncode == 0 and rec["finish_reason"] == "stop", res.stderr
    jsonschema.validate(json.loads(rec["text"]), SCHEMA)
    res = cli("--prompt", "x", "--regex", "(")
    assert res.returncode == 2 and "regex" in res.stderr
    res = cli("--prompt", "x", "--regex", "a", "--choices", "a,b")
    assert res.returncode == 2 and "exclude" in res.stderr


def test_choices_column_must_be_a_list_of_strings(tmp_path: Path) -> None:
    from batchgen.pipeline.shards import validate_input

    write_input(tmp_path)
    validate_input(validate_spec(base(tmp_path, classify={"choices_column": "opts"})))
    for column, message in (("answer", "list<string>"), ("nope", "not in")):
        with pytest.raises(SpecError) as e:
            validate_input(validate_spec(base(tmp_path, classify={"choices_column": column})))
        assert e.value.errors[0][0] == "classify.choices_column" and message in e.value.errors[0][1]
