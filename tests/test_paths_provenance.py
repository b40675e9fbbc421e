"""Unit tests (no Ray): paths under Ray Jobs, the model fingerprint, the small CLI fixes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from batchgen.pipeline.paths import JOB_CONFIG_ENV, check_job_paths, in_ray_working_dir, ray_job_id
from batchgen.pipeline.provenance import (
    SAMPLE_BYTES, SAMPLES, fingerprint_changes, model_fingerprint, weight_file_fingerprint,
)
from batchgen.pipeline.spec import SpecError, load_spec, validate_spec

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "batchgen" / "demo" / "model"
JOB_ENV = {JOB_CONFIG_ENV: json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_x"}})}


def _spec(**paths: str):
    return validate_spec({"name": "p", "model": {"path": paths.get("model", "/models/m")},
                          "input": {"path": paths.get("input", "/data/in"), "id_column": "id", "prompt_column": "p"},
                          "output": {"path": paths.get("output", "/results/out")}})


# --------------------------------------------------------------------------------------- paths

def test_ray_job_is_detected_from_the_supervisors_env_or_the_working_dir() -> None:
    assert ray_job_id(JOB_ENV, "/home/u/repo") == "raysubmit_x"
    pkg = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
    assert ray_job_id({}, pkg) == "?" and in_ray_working_dir(pkg + "/out")
    assert ray_job_id({"RAY_ADDRESS": "127.0.0.1:6379"}, "/home/u/repo") is None  # a driver joining a cluster


def test_relative_output_is_refused_under_ray_jobs_with_what_to_write(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        check_job_paths(_spec(output="out/reviews/"), JOB_ENV, str(tmp_path))
    text = str(err.value)
    assert text.startswith("output.path:") and "deletes" in text and "s3://" in text
    assert "--set output.path=$PWD/out/reviews" in text
    # Absolute paths and URIs pass; outside Ray Jobs a relative path is the user's own CWD.
    for ok in ("/shared/out", "s3://bucket/out", "gs://b/out"):
        check_job_paths(_spec(output=ok), JOB_ENV, str(tmp_path))
    check_job_paths(_spec(output="out/reviews/"), {}, str(tmp_path))
    # An absolute path into Ray's working-dir copy is the same trap.
    pkg = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    with pytest.raises(SpecError, match="output.path"):
        check_job_paths(_spec(output=str(pkg / "out")), {}, str(pkg))


def test_relative_inputs_resolve_in_the_working_dir_or_say_what_is_not_uploaded(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.parquet").write_bytes(b"")
    (tmp_path / "models" / "m").mkdir(parents=True)
    check_job_paths(_spec(input="data/", model="models/m"), JOB_ENV, str(tmp_path))
    check_job_paths(_spec(input="data/*.parquet", model="models/m"), JOB_ENV, str(tmp_path))
    with pytest.raises(SpecError) as err:
        check_job_paths(_spec(input="demo-out/prompts.parquet", model="weights/7b"), JOB_ENV, str(tmp_path))
    assert [e[0] for e in err.value.errors] == ["model.path", "input.path"]
    assert "git-ignored" in str(err.value) and "absolute path" in str(err.value)


# --------------------------------------------------------------------------------------- fingerprint

def test_model_fingerprint_names_what_changed(tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(DEMO_MODEL, model)
    before = model_fingerprint(model)
    assert before == model_fingerprint(model)  # deterministic
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert model_fingerprint(copy)["digest"] == before["digest"]  # the checkpoint, not its location

    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "tokenizer.model").write_bytes((model / "tokenizer.model").read_bytes() + b"x")
    (model / "extra.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    after = model_fingerprint(model)
    assert after["digest"] != before["digest"]
    assert fingerprint_changes(before, after) == ["config.json changed", "weight file extra.safetensors added",
                                                  "tokenizer changed"]


def test_weight_fingerprint_reads_a_header_and_samples_and_sees_in_place_edits(tmp_path: Path) -> None:
    big = tmp_path / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20], "data_offsets": [0, 2**22]}}).encode()
    data = bytearray(os.urandom(2**22))
    big.write_bytes(len(header).to_bytes(8, "little") + header + data)
    fp = weight_file_fingerprint(big)
    assert fp["kind"] == "safetensors" and fp["size"] == 8 + len(header) + 2**22
    # A byte inside the first sample changes it; the documented blind spot is between samples.
    data[10] ^= 0xFF
    big.write_bytes(len(header).to_bytes(8, "little") + header + data)
    assert weight_file_fingerprint(big)["sha256"] != fp["sha256"]
    data[10] ^= 0xFF
    step = (len(data) - SAMPLE_BYTES) / (SAMPLES - 1)
    data[SAMPLE_BYTES + int(step) // 2 - SAMPLE_BYTES // 2] ^= 0xFF  # between samples 0 and 1
    big.write_bytes(len(header).to_bytes(8, "little") + header + data)
    assert weight_file_fingerprint(big)["sha256"] == fp["sha256"]


def test_a_zip_checkpoints_fingerprint_covers_every_byte_through_the_crcs(tmp_path: Path, monkeypatch) -> None:
    from batchgen.pipeline import provenance

    # Sample only the first and last byte: a change in between is seen through the CRCs alone.
    monkeypatch.setattr(provenance, "SAMPLES", 2)
    monkeypatch.setattr(provenance, "SAMPLE_BYTES", 1)

    def pth(payload: bytes) -> Path:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", b"pickle")
            z.writestr("archive/data/0", payload)
        path = tmp_path / "consolidated.00.pth"
        path.write_bytes(buf.getvalue())
        return path

    payload = bytearray(os.urandom(2**22))
    a = weight_file_fingerprint(pth(bytes(payload)))
    payload[2**21 + 12345] ^= 1
    b = weight_file_fingerprint(pth(bytes(payload)))
    assert a["kind"] == b["kind"] == "zip" and a["sha256"] != b["sha256"]


# --------------------------------------------------------------------------------------- CLI

def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "batchgen", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_spec_errors_are_printed_once_and_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {path: /m}\ninput: {path: /i, id_column: id}\noutput: {path: /o}\n")
    res = _cli("validate", str(bad))
    assert res.returncode == 2 and res.stderr.count("invalid job spec") == 1, res.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(SpecError) as err:
        load_spec(broken)
    assert str(broken) in str(err.value) and "<unicode string>" not in str(err.value)


def test_status_of_a_missing_output_exits_1(tmp_path: Path) -> None:
    res = _cli("status", str(tmp_path / "nothing"))
    assert res.returncode == 1 and json.loads(res.stdout)["exists"] is False


def test_help_shows_defaults_without_markup() -> None:
    from batchgen.pipeline.spec import SamplingSpec

    res = _cli("generate", "--help")
    assert res.returncode == 0
    options = res.stdout.split("options:", 1)[1]
    entry = options.split("--max-tokens", 1)[1].split("\n  --", 1)[0]
    assert f"(default: {SamplingSpec().max_tokens})" in " ".join(entry.split())
    top = _cli("--help")
    assert "``" not in top.stdout


def test_validate_refuses_a_directory_without_a_checkpoint_and_error_if_exists(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2], "p": ["a", "b"]}), tmp_path / "in.parquet")
    (tmp_path / "empty").mkdir()
    spec = {"model": {"path": str(tmp_path / "empty")},
            "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id", "prompt_column": "p"},
            "output": {"path": str(tmp_path / "out"), "mode": "error_if_exists"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    res = _cli("validate", str(tmp_path / "job.yaml"))
    assert res.returncode == 2 and "model.path" in res.stderr and "no model checkpoint" in res.stderr
    res = _cli("validate", str(tmp_path / "job.yaml"), "--set", f"model.path={tmp_path / 'misspelt'}")
    assert res.returncode == 2 and "not a directory" in res.stderr
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    res = _cli("validate", str(tmp_path / "job.yaml"), "--set", f"model.path={DEMO_MODEL}")
    assert res.returncode == 2 and "error_if_exists" in res.stderr, res.stderr
    res = _cli("validate", str(tmp_path / "job.yaml"), "--set", f"model.path={DEMO_MODEL}",
               "--set", "output.mode=resume")
    assert res.returncode == 0, res.stderr


def test_weight_headers_that_disagree_with_the_config_are_refused(tmp_path: Path, shared_dir: Path) -> None:
    from batchgen.checkpoint import detect_layout, load_args
    from batchgen.pipeline.modelcheck import check_weights

    for d in (DEMO_MODEL, shared_dir / "models" / "stories260K-hf", shared_dir / "models" / "stories260K-meta"):
        check_weights(d, load_args(d), detect_layout(d))  # real checkpoints pass
    model = tmp_path / "m"
    shutil.copytree(DEMO_MODEL, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 5, 400
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError) as err:
        check_weights(model, load_args(model), "hf")
    text = str(err.value)
    assert "mlp.gate_proj.weight in model.safetensors has shape [352, 128], the config implies [400, 128]" in text
    meta = tmp_path / "meta"
    shutil.copytree(shared_dir / "models" / "stories260K-meta", meta)
    params = json.loads((meta / "params.json").read_text())
    params["n_layers"] += 1
    (meta / "params.json").write_text(json.dumps(params))
    with pytest.raises(SpecError, match=r"layers\.5\.attention\.wq\.weight is missing"):
        check_weights(meta, load_args(meta), "meta")


def test_preview_shows_the_chat_wrapped_prompt_and_its_tokens_without_weights_or_ray(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchgen.tokenizer import Tokenizer

    pq.write_table(pa.table({"id": [1, 2, 3], "q": ["1+2", None, "9 " * 80]}), tmp_path / "in.parquet")
    spec = {"model": {"path": str(DEMO_MODEL)},
            "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id", "template": "{q}=", "chat": True,
                      "system": "Be brief."},
            "output": {"path": str(tmp_path / "out")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    probe = ("import sys; from batchgen.cli import main; rc = main(['preview', sys.argv[1], '--json']); "
             "print('ray' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "job.yaml")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0 and lines[-1] == "False", res.stdout + res.stderr
    rows = [json.loads(line) for line in lines[:-1]]
    tok = Tokenizer(DEMO_MODEL / "tokenizer.model")
    assert rows[0]["prompt_tokens"] == len(tok.encode_chat_prompt("1+2=", system="Be brief."))
    assert rows[0]["prompt"].startswith("<s>[INST] <<SYS>>") and rows[0]["prompt"].endswith("1+2= [/INST]")
    assert rows[1]["note"] == "error: template column 'q' is null"
    assert "prompt_too_long" in rows[2]["note"] and "input.truncate_prompt" in rows[2]["note"]
    assert not (tmp_path / "out").exists()
