"""Careless and hostile inputs get caps and clear errors before work (issue 23, "Inputs" 1, 2, 4,
6, 7, 9): oversized cells, context lengths past the checkpoint's, absurd config dimensions,
malformed manifests, symlinked or foreign output contents, truncation that kept nothing, and the
network addresses a library caller's Ray and the tensor-parallel rendezvous listen on."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batchgen import checkpoint
from batchgen.checkpoint import CheckpointError, load_args, load_model
from batchgen.engine import LLM, SamplingParams
from batchgen.limits import MAX_BYTES_PER_TOKEN, MAX_CONTEXT, max_prompt_bytes, truncate_prompt_ids
from batchgen.pipeline import writer
from batchgen.pipeline.outdir import is_ours
from batchgen.pipeline.planning import check_model
from batchgen.pipeline.worker import output_table
from batchgen.pipeline.rows import build_prompts
from batchgen.pipeline.shards import list_input_files, plan_shards
from batchgen.pipeline.spec import SpecError
from batchgen.pipeline.writer import OutputError
from specs import make_spec
from reference import sharp_model

REPO = Path(__file__).resolve().parents[1]
LOCAL = pafs.LocalFileSystem()


# ------------------------------------------------------------------ 1. cell bytes, before tokenising

@pytest.fixture(scope="module")
def demo_llm(model_dir: Path) -> LLM:
    return LLM(model_dir, device="cpu", max_num_seqs=4)  # context 64: the cap is 64 * 64 bytes


def test_text_over_the_byte_cap_is_refused_without_tokenising(demo_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    cap = max_prompt_bytes(demo_llm.max_model_len)
    assert cap == 64 * MAX_BYTES_PER_TOKEN
    calls: list[int] = []
    real = demo_llm.tokenizer.encode
    monkeypatch.setattr(demo_llm.tokenizer, "encode", lambda text, **kw: calls.append(len(text)) or real(text, **kw))
    outs = demo_llm.generate(["x" * (cap + 1), "1+2="], SamplingParams(max_tokens=2))
    assert outs[0].finish_reason == "error" and outs[0].error.startswith("prompt_too_long: the prompt has 4097 characters")
    assert "was not tokenised" in outs[0].error
    assert calls == [4], calls  # only the short prompt reached the tokenizer
    assert outs[1].ok


def test_prompt_too_long_says_how_to_truncate(demo_llm: LLM) -> None:
    out = demo_llm.generate(["1+2= " * 40], SamplingParams(max_tokens=2))[0]
    assert out.error.startswith("prompt_too_long: ") and out.error.endswith(
        ", the context holds 64 (set input.truncate_prompt: true to keep the last tokens)")


def test_oversized_cells_become_error_rows_before_decoding(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    cap = max_prompt_bytes(16)
    table = pa.table({"id": [1, 2, 3], "text": ["ok", "é" * (cap // 2 + 1), "y" * cap]})
    rows = build_prompts(table, spec, context=16)
    assert rows[0].prompt == "ok" and rows[2].prompt == "y" * cap  # exactly the cap still runs
    assert rows[1].prompt is None and rows[1].error.startswith(
        f"prompt_too_long: column 'text' has {cap + 2} bytes, more than a context of 16 tokens can hold")
    assert build_prompts(table, spec)[1].prompt is not None  # no context given: no cap


def test_template_of_small_cells_over_the_cap_and_a_big_conversation(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, input={"prompt_column": None, "template": "{a} and {b}"})
    half = max_prompt_bytes(8) // 2
    rows = build_prompts(pa.table({"id": [1, 2], "a": ["x" * half, "big" * half], "b": ["y" * half, "z"]}), spec, context=8)
    assert rows[0].error.startswith("prompt_too_long: the rendered prompt has")
    assert rows[1].error.startswith("prompt_too_long: column 'a' has")  # not "template prompt_too_long"
    conv = pa.array([[{"role": "user", "content": "x" * half}, {"role": "assistant", "content": "y" * half},
                      {"role": "user", "content": "hi"}], [{"role": "user", "content": "hi"}]])
    chat = make_spec(tmp_path, input={"prompt_column": None, "messages_column": "m"})
    rows = build_prompts(pa.table({"id": [1, 2], "m": conv}), chat, context=8)
    assert rows[0].error.startswith("prompt_too_long: the conversation in column 'm' has") and rows[1].error is None


# ------------------------------------------------------------------ 7. truncate_prompt keeps a sensible prompt

def test_truncation_keeps_half_the_context_and_the_bos() -> None:
    ids = [1] + list(range(3, 203))  # BOS + 200 tokens
    assert truncate_prompt_ids(ids, 64, 4, 1) == [1] + ids[-59:]  # 60 kept, BOS first
    kept = truncate_prompt_ids(ids, 64, 1000, 1)  # max_tokens past the context: half the context
    assert len(kept) == 32 and kept[0] == 1 and kept[1:] == ids[-31:]
    assert truncate_prompt_ids(list(range(3, 203)), 64, 1000, 1) == list(range(3, 203))[-32:]


def test_truncated_rows_say_what_was_cut(demo_llm: LLM, tmp_path: Path) -> None:
    params = SamplingParams(max_tokens=500, ignore_eos=True, truncate_prompt=True)
    long, short = demo_llm.generate(["1+2= " * 40, "1+2="], params)
    assert long.ok and len(long.prompt_token_ids) == 32 and long.prompt_token_ids[0] == demo_llm.bos_id
    assert long.truncated_tokens == len(demo_llm.tokenizer.encode("1+2= " * 40, bos=True)) - 32
    assert len(long.token_ids) == 32 and long.finish_reason == "length"  # the rest of the context
    assert short.truncated_tokens == 0
    spec = make_spec(tmp_path, input={"truncate_prompt": True})
    table = output_table(spec, pa.table({"id": [1, 2, 3]}), [long, short, "bad row"])
    assert table.column("truncated_tokens").to_pylist() == [long.truncated_tokens, 0, 0]
    assert "truncated_tokens" not in output_table(make_spec(tmp_path), pa.table({"id": [1]}), [short]).column_names
    with pytest.raises(SpecError, match="clash with an output column"):
        make_spec(tmp_path, input={"keep_columns": ["truncated_tokens"]})


# ------------------------------------------------------------------ 2. context length

def test_max_seq_len_has_a_hard_ceiling_in_the_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="model.max_seq_len: Input should be less than or equal to 1048576"):
        make_spec(tmp_path, model={"max_seq_len": 10**9})
    with pytest.raises(ValueError, match="max_model_len must be in"):
        LLM(model=sharp_model(), max_model_len=MAX_CONTEXT + 1, device="cpu")


def test_max_seq_len_is_bounded_by_the_checkpoints_context(tmp_path: Path, shared_dir: Path) -> None:
    hf = str(shared_dir / "models" / "stories260K-hf")  # max_position_embeddings 512, no tokenizer
    tok = str(REPO / "batchgen" / "demo" / "model" / "tokenizer.model")
    with pytest.raises(SpecError, match=r"model.max_seq_len: 513 is longer than the model's context: the "
                                        r"checkpoint's .* is 512.*model.allow_longer_context: true"):
        check_model(make_spec(tmp_path, model={"path": hf, "tokenizer": tok, "max_seq_len": 513}))
    check_model(make_spec(tmp_path, model={"path": hf, "tokenizer": tok, "max_seq_len": 512}))
    check_model(make_spec(tmp_path, model={"path": hf, "tokenizer": tok, "max_seq_len": 4096,
                                          "allow_longer_context": True}))
    meta = str(shared_dir / "models" / "stories260K-meta")  # params.json records no context
    check_model(make_spec(tmp_path, model={"path": meta, "tokenizer": tok, "max_seq_len": 4096}))
    with pytest.raises(SpecError, match="records no context length .* at most 4096"):
        check_model(make_spec(tmp_path, model={"path": meta, "tokenizer": tok, "max_seq_len": 4097}))


# ------------------------------------------------------------------ 4. config dimensions

def _hf_copy(shared_dir: Path, tmp_path: Path, **config: Any) -> Path:
    d = tmp_path / "model"
    shutil.copytree(shared_dir / "models" / "stories260K-hf", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **config}))
    return d


@pytest.mark.parametrize("config, message", [
    ({"hidden_size": 4_000_000_000}, "hidden_size=4000000000 is over 65536"),
    ({"num_hidden_layers": 2000}, "num_hidden_layers=2000 is over 1024"),
    ({"max_position_embeddings": 10**9}, "max_position_embeddings=1000000000 is over 1048576"),
    ({"hidden_size": 65536, "num_attention_heads": 512, "num_key_value_heads": 512, "num_hidden_layers": 1000,
      "intermediate_size": 200_000}, "a model of 5.65e\\+13 parameters, over 1e\\+12"),
])
def test_absurd_config_dims_are_refused_before_any_model_is_built(
        shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict, message: str) -> None:
    d = _hf_copy(shared_dir, tmp_path, **config)
    built: list[Any] = []
    monkeypatch.setattr(checkpoint, "empty_model", lambda *a, **k: built.append(a))
    with pytest.raises(CheckpointError, match=message):
        load_args(d)
    with pytest.raises(CheckpointError, match=message):
        load_model(d, device="cpu")
    assert built == []
    with pytest.raises(SpecError, match="model.path: .*" + message):
        check_model(make_spec(tmp_path, model={"path": str(d)}))


def test_a_checkpoint_missing_layers_builds_the_meta_model_once(shared_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    d = _hf_copy(shared_dir, tmp_path, num_hidden_layers=40)
    real, built = checkpoint.empty_model, []
    monkeypatch.setattr(checkpoint, "empty_model", lambda *a, **k: built.append(a) or real(*a, **k))
    with pytest.raises(CheckpointError, match="missing 315 key"):
        load_model(d, device="cpu")
    # One full meta model, for the shapes to check against; the model itself is never built.
    assert [a[0].n_layers for a in built].count(40) == 1


# ------------------------------------------------------------------ 4. malformed manifest.json

@pytest.fixture
def planned(tmp_path: Path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": list(range(20)), "text": ["t"] * 20}), tmp_path / "in" / "a.parquet",
                   row_group_size=10)
    spec = make_spec(tmp_path)
    files = list_input_files(spec.input)
    return spec, plan_shards(spec.input, 10, files)


@pytest.mark.parametrize("manifest, field", [
    ({"shards": [1]}, "shards.0"), ([], "a JSON list, not an object"), ({"num_shards": "3"}, "num_shards"),
    ({"shards": [{"shard_id": "a", "rows": "x"}]}, "shards.0.rows"), ({"model_fingerprint": 7}, "model_fingerprint"),
])
def test_a_malformed_manifest_is_named_in_status_and_resume(planned, tmp_path: Path, manifest: Any, field: str) -> None:
    spec, shards = planned
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OutputError, match=f"output.path: .*manifest.json .*{field}"):
        writer.job_status(str(out))
    with pytest.raises(OutputError, match=f"output.path: .*manifest.json .*{field}"):
        writer.prepare_output(spec, shards, "f" * 64)
    res = subprocess.run([sys.executable, "-m", "batchgen", "status", str(out)], capture_output=True, text=True,
                         timeout=60) if field == "shards.0" else None
    if res is not None:  # once through the CLI: no traceback, exit 2
        assert res.returncode == 2 and "manifest.json" in res.stderr and "Traceback" not in res.stderr


def test_a_valid_manifest_of_an_older_version_still_resumes(planned) -> None:
    spec, shards = planned
    writer.prepare_output(spec, shards, "f" * 64)
    path = Path(spec.output.path) / "manifest.json"
    doc = json.loads(path.read_text())
    for key in ("model_fingerprint", "provenance", "created"):
        doc.pop(key)
    path.write_text(json.dumps(doc))
    assert writer.prepare_output(spec, shards, "f" * 64) == set()
    assert writer.job_status(spec.output.path)["total_shards"] == 2


# ------------------------------------------------------------------ 6. output directory trust

def test_batchgen_names_are_recognised(planned) -> None:
    _, shards = planned
    sid = shards[0].shard_id
    for ours in ("manifest.json", "_SUCCESS", "runs.json", "summary.parquet", "shards", f"shards/{sid}.parquet",
                 "parts", f"parts/{sid}", f"parts/{sid}/{sid}@0-5.parquet",
                 f"shards/.tmp-{'0' * 32}-{sid}.parquet.partial"):
        assert is_ours(ours), ours
    for foreign in ("notes.txt", "shards/notes.parquet", "shards/sub", f"shards/sub/{sid}.parquet",
                    f"parts/{sid}/notes.txt", f"parts/{sid}/{sid}@0-5.parquet/x", "shards/.DS_Store"):
        assert not is_ours(foreign), foreign


def test_a_symlinked_shards_directory_is_refused(planned, tmp_path: Path) -> None:
    spec, shards = planned
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(elsewhere, tmp_path / "out" / "shards")
    for mode in ("resume", "overwrite"):
        over = spec.model_copy(update={"output": spec.output.model_copy(update={"mode": mode})})
        with pytest.raises(OutputError, match=f"holds a symlink, shards -> {elsewhere}"):
            writer.prepare_output(over, shards, "f" * 64)
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("foreign", ["shards/notes.txt", "parts/x-0123456789/keep.csv", "shards/sub/a.parquet"])
def test_overwrite_never_deletes_foreign_files_inside_its_directories(planned, tmp_path: Path, foreign: str) -> None:
    spec, shards = planned
    writer.prepare_output(spec, shards, "f" * 64)
    out = Path(spec.output.path)
    sid = shards[0].shard_id
    writer.publish_bytes(LOCAL, str(out / "shards" / f"{sid}.parquet"), b"x")
    writer.publish_bytes(LOCAL, str(out / "parts" / sid / f"{sid}@0-5.parquet"), b"x")
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("precious")
    over = spec.model_copy(update={"output": spec.output.model_copy(update={"mode": "overwrite"})})
    named = "shards/sub" if "/sub/" in foreign else foreign  # a foreign directory is named, not walked
    with pytest.raises(OutputError, match=f"holds files batchgen did not write \\(.*{named}"):
        writer.prepare_output(over, shards, "f" * 64)
    assert (out / foreign).read_text() == "precious" and (out / "shards" / f"{sid}.parquet").exists()
    (out / foreign).unlink()
    if (out / foreign).parent.name == "sub":
        (out / foreign).parent.rmdir()
    assert writer.prepare_output(over, shards, "e" * 64) == set()
    assert [str(p.relative_to(out)) for p in out.rglob("*")] == ["manifest.json"]  # emptied directories too


# ------------------------------------------------------------------ 9. loopback only

def test_the_tensor_parallel_rendezvous_listens_on_loopback_only() -> None:
    from batchgen.engine.tp import TPError
    from batchgen.pipeline.tp_replica import _join_group, _Rank

    host, port = _Rank().endpoint()
    assert host == "127.0.0.1"
    with socket.socket() as s:
        s.bind((host, port))  # free there
    infos = [{"pid": 1, "ip": "10.0.0.1", "gpus": []}, {"pid": 2, "ip": "10.0.0.2", "gpus": []}]
    with pytest.raises(TPError, match="must share one node"):
        _join_group(0, (host, port), infos, 1.0, 1.0)


def test_a_library_run_job_starts_ray_on_loopback(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "text": ["1+2=", "3+4="]}), tmp_path / "in" / "a.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({
        "name": "loopback", "model": {"path": str(model_dir)},
        "input": {"path": str(tmp_path / "in"), "id_column": "id", "prompt_column": "text"},
        "sampling": {"max_tokens": 2}, "output": {"path": str(tmp_path / "out")},
        "execution": {"replicas": 1}}))
    # ray imported first and no loopback switch in the environment: what a library caller does.
    probe = ("import sys, ray\n"
             "from batchgen.pipeline.driver import run_job\n"
             "from batchgen.pipeline.spec import load_spec\n"
             "summary = run_job(load_spec(sys.argv[1]), dashboard=False)\n"
             "print('RESULT', summary['rows'], ray.util.get_node_ip_address(), "
             "ray.get_runtime_context().gcs_address)\n"
             # Every socket the Ray processes listen on (psutil comes with the test extras' peft).
             # A child may exit while it is read (Ray's short-lived workers): skip it.
             "import psutil\n"
             "ips = set()\n"
             "for p in psutil.Process().children(recursive=True):\n"
             "    try:\n"
             "        ips |= {c.laddr.ip for c in p.net_connections(kind='inet') if c.status == 'LISTEN'}\n"
             "    except (psutil.Error, OSError):\n"
             "        pass\n"
             "print('LISTEN', *sorted(ips))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    res = subprocess.run([sys.executable, "-c", probe, str(job)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    rows, node_ip, gcs = res.stdout.split("RESULT", 1)[1].split("\n", 1)[0].split()
    assert (rows, node_ip) == ("2", "127.0.0.1") and gcs.startswith("127.0.0.1:")
    listening = res.stdout.split("LISTEN", 1)[1].split()
    assert listening and set(listening) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening


def test_symlinks_inside_shards_are_refused_and_foreign_ones_beside_the_output_are_not(planned, tmp_path: Path) -> None:
    spec, shards = planned
    writer.prepare_output(spec, shards, "f" * 64)
    out = Path(spec.output.path)
    (tmp_path / "notes").mkdir()
    os.symlink(tmp_path / "notes", out / "my-notes")  # not batchgen's: a resume leaves it be
    assert writer.prepare_output(spec, shards, "f" * 64) == set()
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"x")
    (out / "shards").mkdir(exist_ok=True)
    os.symlink(fake, out / "shards" / f"{shards[0].shard_id}.parquet")  # would pass as committed
    with pytest.raises(OutputError, match=f"holds a symlink, shards/{shards[0].shard_id}.parquet"):
        writer.prepare_output(spec, shards, "f" * 64)


def test_overwrite_on_an_object_store_also_keeps_foreign_objects(planned) -> None:
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    boto3 = pytest.importorskip("boto3")
    from batchgen.pipeline.outdir import delete_ours, foreign_entries

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        port = server.get_host_and_port()[1]
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="bucket")
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                               access_key="testing", secret_key="testing")
        sid = planned[1][0].shard_id
        names = ["manifest.json", f"shards/{sid}.parquet", f"parts/{sid}/{sid}@0-5.parquet", "shards/notes.txt"]
        for name in names:
            writer.publish_bytes(fs, f"bucket/out/{name}", b"x")
        retry = lambda what, call: writer.with_retries(fs, what, call)  # noqa: E731
        assert foreign_entries(fs, "bucket/out", False, retry) == ["shards/notes.txt"]
        delete_ours(fs, "bucket/out", False, retry)
        left = [i.path for i in fs.get_file_info(pafs.FileSelector("bucket/out", recursive=True))
                if i.type == pafs.FileType.File]
        assert left == ["bucket/out/shards/notes.txt"]
    finally:
        server.stop()
