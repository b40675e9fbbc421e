"""Output: schema, atomic publishing, output modes and fingerprint checks, summary and status."""

from __future__ import annotations

import dataclasses

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batchgen.pipeline import writer
from batchgen.pipeline.shards import Shard, input_fingerprint, list_input_files, plan_shards
from batchgen.pipeline.spec import JobSpec, SpecError
from batchgen.pipeline.writer import OutputError
from specs import make_spec

LOCAL = pafs.LocalFileSystem()


@pytest.fixture
def job(tmp_path: Path) -> tuple[JobSpec, list[Shard], str]:
    """A 30-row input in three 10-row row groups (three shards) and its fingerprint."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(30)], "text": ["t"] * 30}),
                   tmp_path / "in" / "part-0.parquet", row_group_size=10)
    spec = make_spec(tmp_path)
    files = list_input_files(spec.input)
    return spec, plan_shards(spec.input, spec.execution.shard_rows, files), input_fingerprint(files)


def result_table(spec: JobSpec, ids: list[str]) -> pa.Table:
    schema = writer.output_schema(spec, pa.string(), {})
    n = len(ids)
    return pa.table({"id": ids, "completion": ["out"] * n, "finish_reason": ["stop"] * n,
                     "prompt_tokens": [3] * n, "completion_tokens": [1] * n, "error": [None] * n}, schema=schema)


def commit(spec: JobSpec, shard: Shard, **summary: Any) -> None:
    ids = [f"r{shard.row_start + i}" for i in range(shard.num_rows)]
    writer.publish_shard(LOCAL, spec.output.path, shard.shard_id, result_table(spec, ids),
                         summary={"input_file": shard.relpath, "row_start": shard.row_start,
                                  "rows": shard.num_rows, **summary})


def names(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


# ------------------------------------------------------------------------------------------ schema

def test_output_schema(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, input={"keep_columns": ["title", "stars"]})
    schema = writer.output_schema(spec, pa.int64(), {"stars": pa.int8(), "title": pa.large_string()})
    assert schema.names == ["id", "title", "stars", "completion", "finish_reason", "prompt_tokens",
                            "completion_tokens", "error"]
    assert schema.field("id").type == pa.int64() and not schema.field("id").nullable
    assert schema.field("title").type == pa.large_string() and schema.field("stars").type == pa.int8()
    assert schema.field("prompt_tokens").type == pa.int32() and schema.field("error").nullable
    with_lp = writer.output_schema(make_spec(tmp_path, sampling={"logprobs": True}), pa.string(), {})
    assert with_lp.field("logprobs").type == pa.list_(pa.float32())
    with_ids = writer.output_schema(make_spec(tmp_path, output={"token_ids": True}), pa.string(), {})
    assert with_ids.field("token_ids").type == pa.list_(pa.int32()) and "token_ids" not in with_lp.names
    with pytest.raises(ValueError, match="keep_types"):
        writer.output_schema(spec, pa.int64(), {"stars": pa.int8()})


# ------------------------------------------------------------------------------------------ publishing

def test_publish_shard_is_atomic_and_leaves_no_temp(job: tuple[JobSpec, list[Shard], str], tmp_path: Path) -> None:
    spec, shards, _ = job
    table = result_table(spec, ["r0", "r1"])
    path = writer.publish_shard(LOCAL, spec.output.path, shards[0].shard_id, table)
    assert path == f"{spec.output.path}/shards/{shards[0].shard_id}.parquet"
    assert names(tmp_path / "out" / "shards") == [f"{shards[0].shard_id}.parquet"]
    assert pq.read_table(path).equals(table)
    # A retried attempt replaces the whole file.
    writer.publish_shard(LOCAL, spec.output.path, shards[0].shard_id, result_table(spec, ["r9"]))
    assert pq.read_table(path).column("id").to_pylist() == ["r9"]
    assert names(tmp_path / "out" / "shards") == [f"{shards[0].shard_id}.parquet"]


def test_failed_publish_removes_its_temp_and_keeps_the_target(tmp_path: Path) -> None:
    target = tmp_path / "out" / "doc.json"
    target.mkdir(parents=True)  # a directory in the way: the final rename fails
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        writer.publish_json(LOCAL, str(target), {"a": 1})
    assert names(tmp_path / "out") == ["doc.json"] and names(target) == ["keep"]


def test_publish_refuses_bad_ids_and_summary_keys_before_writing(job: tuple[JobSpec, list[Shard], str],
                                                                 tmp_path: Path) -> None:
    spec, shards, _ = job
    table = result_table(spec, ["r0"])
    for bad in (".tmp-x", "_x", "a/b", ""):
        with pytest.raises(ValueError, match="invalid shard id"):
            writer.publish_shard(LOCAL, spec.output.path, bad, table)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rows_okay'\]"):
        writer.publish_shard(LOCAL, spec.output.path, shards[0].shard_id, table, summary={"rows_okay": 1})
    assert names(tmp_path / "out") == []


def test_non_nullable_result_fields_are_enforced(job: tuple[JobSpec, list[Shard], str]) -> None:
    spec, shards, _ = job
    bad = pa.table({"id": ["r0"], "completion": [None], "finish_reason": [None], "prompt_tokens": [0],
                    "completion_tokens": [0], "error": ["boom"]}, schema=writer.output_schema(spec, pa.string(), {}))
    with pytest.raises(pa.ArrowInvalid, match="finish_reason"):
        writer.publish_shard(LOCAL, spec.output.path, shards[0].shard_id, bad)


def test_stale_temp_files_are_never_read_as_output(job: tuple[JobSpec, list[Shard], str], tmp_path: Path) -> None:
    spec, shards, input_fp = job
    writer.prepare_output(spec, shards, input_fp)
    commit(spec, shards[0])
    shard_dir = tmp_path / "out" / "shards"
    # What a killed writer leaves behind, and other names that are not committed shards.
    (shard_dir / f".tmp-0123abcd-{shards[1].shard_id}.parquet.partial").write_bytes(b"PAR1 half")
    (shard_dir / f".tmp-99-{shards[2].shard_id}.parquet").write_bytes(b"PAR1 half")
    (shard_dir / "_ignored.parquet").write_bytes(b"x")
    assert writer.committed_shards(LOCAL, spec.output.path) == {shards[0].shard_id}
    assert writer.job_status(spec.output.path)["committed_shards"] == 1
    assert writer.prepare_output(spec, shards, input_fp) == {shards[0].shard_id}
    assert ds.dataset(str(shard_dir), format="parquet").to_table().num_rows == shards[0].num_rows
    assert [r.shard_id for r in writer.read_shard_summaries(LOCAL, spec.output.path)] == [shards[0].shard_id]


# ------------------------------------------------------------------------------------------ modes

def test_fresh_output_gets_a_manifest(job: tuple[JobSpec, list[Shard], str], tmp_path: Path) -> None:
    spec, shards, input_fp = job
    assert writer.prepare_output(spec, shards, input_fp) == set()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input_fingerprint"] == input_fp and manifest["num_shards"] == 3
    assert manifest["total_rows"] == 30 and manifest["shard_rows"] == 10
    assert [s["shard_id"] for s in manifest["shards"]] == [s.shard_id for s in shards]
    assert manifest["shards"][1] == {"shard_id": shards[1].shard_id, "input_file": "part-0.parquet",
                                     "row_groups": [1], "row_offset": 0, "row_start": 10, "rows": 10}


def test_resume_returns_committed_shards(job: tuple[JobSpec, list[Shard], str], tmp_path: Path) -> None:
    spec, shards, input_fp = job
    writer.prepare_output(spec, shards, input_fp)
    commit(spec, shards[0])
    commit(spec, shards[2])
    assert writer.prepare_output(spec, shards, input_fp) == {shards[0].shard_id, shards[2].shard_id}
    # Execution settings, output mode and name are not part of the results: still the same job.
    same = make_spec(tmp_path, execution={"replicas": 3, "max_attempts": 9}, name="renamed")
    assert writer.prepare_output(same, shards, input_fp) == {shards[0].shard_id, shards[2].shard_id}


def test_resume_refuses_a_changed_spec_and_says_what_changed(job: tuple[JobSpec, list[Shard], str],
                                                            tmp_path: Path) -> None:
    spec, shards, input_fp = job
    writer.prepare_output(spec, shards, input_fp)
    changed = make_spec(tmp_path, sampling={"max_tokens": 32, "temperature": 0.5})
    with pytest.raises(OutputError) as info:
        writer.prepare_output(changed, shards, input_fp)
    text = str(info.value)
    assert text.startswith("output.mode: resume refused:")
    assert "sampling.max_tokens: '(default)' -> 32" in text and "sampling.temperature: '(default)' -> 0.5" in text
    assert "use mode: overwrite" in text
    assert isinstance(info.value, SpecError)


def test_resume_refuses_changed_input_or_shard_plan(job: tuple[JobSpec, list[Shard], str], tmp_path: Path) -> None:
    spec, shards, input_fp = job
    writer.prepare_output(spec, shards, input_fp)
    with pytest.raises(OutputError, match="the input changed since"):
        writer.prepare_output(spec, shards, "0" * 64)
    bigger = make_spec(tmp_path, execution={"shard_rows": 20})
    with pytest.raises(OutputError, match=r"shard_rows: 10, now 20\); set it back to 10"):
        writer.prepare_output(bigger, plan_shards(bigger.input, 20), input_fp)
    # A shard_rows that cuts the same shards is the same plan: resume goes on.
    assert writer.prepare_output(make_spec(tmp_path, execution={"shard_rows": 6}), plan_shards(spec.input, 6),
                                 input_fp) == set()


def test_resume_refuses_results_without_a_manifest(job: tuple[JobSpec, list[Shard], str]) -> None:
    spec, shards, input_fp = job
    commit(spec, shards[0])
    with pytest.raises(OutputError, match="no manifest.json"):
        writer.prepare_output(spec, shards, input_fp)


def test_resume_clears_success_when_a_shard_went_missing(job: tuple[JobSpec, list[Shard], str],
                                                         tmp_path: Path) -> None:
    spec, shards, input_fp = job
    writer.prepare_output(spec, shards, input_fp)
    for s in shards:
        commit(spec, s)
    writer.write_success(LOCAL, spec.output.path, {"rows": 30})
    assert len(writer.prepare_output(spec, shards, input_fp)) == 3
    assert (tmp_path / "out" / "_SUCCESS").exists()  # complete: nothing to redo, marker stays
    (tmp_path / "out" / "shards" / f"{shards[1].shard_id}.parquet").unlink()
    assert writer.prepare_output(spec, shards, input_fp) == {shards[0].shard_id, shards[2].shard_id}
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_overwrite_deletes_previous_results_only(job: tuple[JobSpec, list[Shard], str], tmp_path: Path) -> None:
    spec, shards, input_fp = job
    writer.prepare_output(spec, shards, input_fp)
    commit(spec, shards[0])
    writer.write_summary(LOCAL, spec.output.path, [{"shard_id": shards[0].shard_id}])
    writer.write_success(LOCAL, spec.output.path, {})
    over = make_spec(tmp_path, output={"mode": "overwrite"}, sampling={"max_tokens": 5})
    assert writer.prepare_output(over, shards, "f" * 64) == set()
    assert names(tmp_path / "out") == ["manifest.json"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["input_fingerprint"] == "f" * 64
    (tmp_path / "out" / "my-notes.txt").write_text("precious")
    with pytest.raises(OutputError, match=r"holds files batchgen did not write \(my-notes.txt\)"):
        writer.prepare_output(over, shards, input_fp)
    assert (tmp_path / "out" / "my-notes.txt").read_text() == "precious"


def test_error_if_exists(job: tuple[JobSpec, list[Shard], str], tmp_path: Path) -> None:
    spec, shards, input_fp = job
    strict = make_spec(tmp_path, output={"mode": "error_if_exists"})
    (tmp_path / "out").mkdir()  # an empty directory is fine
    assert writer.prepare_output(strict, shards, input_fp) == set()
    with pytest.raises(OutputError, match=r"output.path: .*out is not empty \(manifest.json\); mode: error_if_exists"):
        writer.prepare_output(strict, shards, input_fp)


def test_output_path_that_is_a_file(job: tuple[JobSpec, list[Shard], str], tmp_path: Path) -> None:
    spec, shards, input_fp = job
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        writer.prepare_output(spec, shards, input_fp)


# ------------------------------------------------------------------------------------------ summary

def utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def test_summary_success_and_status_round_trip(job: tuple[JobSpec, list[Shard], str], tmp_path: Path) -> None:
    spec, shards, input_fp = job
    out = spec.output.path
    assert writer.job_status(out)["exists"] is False
    writer.prepare_output(spec, shards, input_fp)
    commit(spec, shards[2], rows_ok=9, rows_error=1, prompt_tokens=30, completion_tokens=10, seconds=1.5,
           started=1795000000.25, finished=1795000001.75, attempts=2, replica="replica-1", host="h")
    commit(spec, shards[0], rows_ok=10, rows_error=0, attempts=1)
    status = writer.job_status(out)
    assert (status["total_shards"], status["committed_shards"], status["total_rows"], status["committed_rows"],
            status["complete"], status["success"]) == (3, 2, 30, 20, False, None)

    rows = writer.read_shard_summaries(LOCAL, out, [s.shard_id for s in shards])
    assert {r.shard_id: r.rows_ok for r in rows} == {shards[0].shard_id: 10, shards[2].shard_id: 9}
    writer.write_summary(LOCAL, out, rows)
    summary = pq.read_table(tmp_path / "out" / "summary.parquet")
    assert summary.schema == writer.SUMMARY_SCHEMA
    as_rows = summary.to_pylist()
    assert [r["row_start"] for r in as_rows] == [0, 20]  # in input order
    assert as_rows[1] == {"shard_id": shards[2].shard_id, "input_file": "part-0.parquet", "row_start": 20,
                          "row_groups": None, "rows": 10, "rows_ok": 9, "rows_error": 1, "prompt_tokens": 30,
                          "completion_tokens": 10, "seconds": 1.5, "attempts": 2, "replica": "replica-1",
                          "host": "h", "started": utc(1795000000.25), "finished": utc(1795000001.75)}
    assert as_rows[0]["started"] is None  # a shard committed without times (an older writer)
    with pytest.raises(ValueError, match="unknown field"):
        writer.write_summary(LOCAL, out, [{"shard_id": "x", "row": 1}])

    commit(spec, shards[1])
    writer.write_success(LOCAL, out, {"rows": 30, "rows_ok": 29})
    status = writer.job_status(out)
    assert status["complete"] is True and status["committed_shards"] == 3 and status["committed_rows"] == 30
    assert status["success"]["rows_ok"] == 29 and "finished" in status["success"]
    assert status["name"] == spec.name
    assert names(tmp_path / "out") == ["_SUCCESS", "manifest.json", "shards", "summary.parquet"]
    # The shards read back as one dataset with the output schema.
    table = ds.dataset(str(tmp_path / "out" / "shards"), format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(f"r{i}" for i in range(30))


def test_shard_without_stored_summary_still_counts_its_rows(job: tuple[JobSpec, list[Shard], str]) -> None:
    spec, shards, _ = job
    writer.publish_shard(LOCAL, spec.output.path, shards[0].shard_id, result_table(spec, ["a", "b"]))
    assert [r.to_dict() for r in writer.read_shard_summaries(LOCAL, spec.output.path)] == [{"shard_id": shards[0].shard_id,
                                                                                     "rows": 2}]


def test_corrupt_manifest_is_a_clear_error(job: tuple[JobSpec, list[Shard], str], tmp_path: Path) -> None:
    spec, shards, input_fp = job
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{not json")
    with pytest.raises(OutputError, match="manifest.json is not valid JSON"):
        writer.prepare_output(spec, shards, input_fp)


def test_shard_summary_round_trips_and_refuses_unknown_fields(job: tuple[JobSpec, list[Shard], str]) -> None:
    from batchgen.pipeline.records import SUMMARY_SCHEMA, ShardSummary

    _, shards, _ = job
    assert [f.name for f in dataclasses.fields(ShardSummary)] == SUMMARY_SCHEMA.names
    s = ShardSummary.for_shard(shards[1], rows=10, rows_ok=9, rows_error=1, attempts=2, replica="r", host="h",
                               started=5.0, finished=7.5)
    assert (s.shard_id, s.input_file, s.row_start) == (shards[1].shard_id, shards[1].relpath, shards[1].row_start)
    assert ShardSummary.from_dict(s.to_dict()) == s and "seconds" not in s.to_dict()  # not recorded: left out
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rowz'\]"):
        ShardSummary.from_dict({"shard_id": "x", "rowz": 1})
    with pytest.raises(ValueError, match="without a shard_id"):
        ShardSummary.from_dict({"rows": 1})
    pieces = [ShardSummary("a@0-5", seconds=1.0, started=3.0, finished=4.0, attempts=1, replica="r1", host="h"),
              ShardSummary("a@5-10", seconds=2.0, started=2.0, finished=9.0, attempts=2, replica="r0", host="h")]
    merged = ShardSummary.merged(shards[0], pieces, spent_attempts=3)
    assert (merged.shard_id, merged.seconds, merged.started, merged.finished, merged.attempts, merged.replica,
            merged.host) == (shards[0].shard_id, 3.0, 2.0, 9.0, 6, "r0,r1", "h")
