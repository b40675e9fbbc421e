"""LoRA adapters in jobs: the spec fields, refusals before any work, S3 adapters, an adapter column."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from batchgen.checkpoint import load_args
from batchgen.engine import LLM, SamplingParams
from batchgen.lora import load_adapter, save_adapter
from batchgen.model import ModelArgs
from batchgen.pipeline.adapters import CACHE_ENV, fetch_adapter
from batchgen.pipeline.driver import run_job
from batchgen.pipeline.planning import check_job, check_model
from batchgen.pipeline.spec import SpecError, load_spec, validate_spec
from reference import random_adapter

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "batchgen" / "demo" / "model"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapters")
    args = load_args(DEMO_MODEL)
    return {"a": save_adapter(random_adapter(args, 8, ("wq", "wk", "wv", "wo", "w1", "w3", "w2"), 1), args, d / "a"),
            "b": save_adapter(random_adapter(args, 4, ("wq", "wv"), 2), args, d / "b")}


def base_spec(tmp_path: Path, **model: Any) -> dict:
    return {"name": "lora-job", "model": {"path": str(DEMO_MODEL), "dtype": "float32", **model},
            "input": {"path": str(tmp_path / "in"), "id_column": "id", "prompt_column": "prompt"},
            "sampling": {"max_tokens": 10, "temperature": 0.0}, "output": {"path": str(tmp_path / "out")},
            "execution": {"replicas": 1, "shard_rows": 8, "heartbeat_s": 1, "lease_timeout_s": 60}}


def write_input(tmp_path: Path, n: int = 24, adapter_col: bool = True) -> tuple[list[str], list]:
    from batchgen.demo.task import make_examples

    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    prompts = [p for p, _ in make_examples(n, seed=5, split="heldout")]
    names = [[None, "a", "b", ""][i % 4] for i in range(n)]
    names[5] = "nope"
    cols = {"id": list(range(n)), "prompt": prompts}
    if adapter_col:
        cols["client"] = names
    pq.write_table(pa.table(cols), tmp_path / "in" / "part.parquet")
    return prompts, names


# --------------------------------------------------------------------------------------- spec


def test_spec_adapter_fields(tmp_path: Path) -> None:
    spec = validate_spec({**base_spec(tmp_path, adapters={"a": "rel/a"}),
                          "input": {**base_spec(tmp_path)["input"], "adapter_column": "client"}})
    assert spec.model.adapters == {"a": "rel/a"} and "client" in spec.input_columns()
    assert spec.with_resolved_paths("/base").model.adapters == {"a": "/base/rel/a"}
    with pytest.raises(SpecError, match="input.adapter_column: names adapters, but model.adapters lists none"):
        validate_spec({**base_spec(tmp_path), "input": {**base_spec(tmp_path)["input"], "adapter_column": "client"}})
    with pytest.raises(SpecError, match=r"model.adapters: .*adapter name 'a b'"):
        validate_spec(base_spec(tmp_path, adapters={"a b": "/x"}))


def test_adapters_that_do_not_fit_are_refused_naming_the_field_and_file(tmp_path: Path, adapters: dict,
                                                                        tiny_hf_config: Any) -> None:
    write_input(tmp_path)
    # An adapter made for another model (the tiny HF config: hidden 64, not 128).
    small = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=96)
    other = save_adapter(random_adapter(small, 4, ("wq",), 3), small, tmp_path / "other")
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (dora / f).write_bytes((adapters["a"] / f).read_bytes())
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    spec = validate_spec(base_spec(tmp_path, adapters={"good": str(adapters["a"]), "other": str(other),
                                                       "dora": str(dora), "gone": str(tmp_path / "missing")}))
    with pytest.raises(SpecError) as e:
        check_model(spec)
    msg = str(e.value)
    assert f"model.adapters.other: {other / 'adapter_model.safetensors'}: key" in msg and "expected (4, 128)" in msg
    assert f"model.adapters.dora: {dora / 'adapter_config.json'}: use_dora=true (DoRA) is not supported" in msg
    assert f"model.adapters.gone: {tmp_path / 'missing'}: not a directory" in msg
    assert "model.adapters.good" not in msg

    # The CLI's validate refuses it with exit 2 before any work, and so does run.
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(base_spec(tmp_path, adapters={"other": str(other)})))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for cmd in ("validate", "run"):
        res = subprocess.run([sys.executable, "-m", "batchgen", cmd, str(tmp_path / "job.yaml")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res.stderr
        assert "model.adapters.other" in res.stderr and str(other / "adapter_model.safetensors") in res.stderr
    assert not (tmp_path / "out").exists()


def test_model_fingerprint_includes_the_adapters(tmp_path: Path, adapters: dict) -> None:
    write_input(tmp_path)
    fp = {}
    for key, ads in (("none", {}), ("a", {"x": str(adapters["a"])}), ("b", {"x": str(adapters["b"])})):
        plan, _ = check_job(validate_spec(base_spec(tmp_path, adapters=ads)))
        fp[key] = plan.model_fp
    assert fp["none"]["adapters"] == [] and len(fp["a"]["adapters"]) == 1
    assert len({f["digest"] for f in fp.values()}) == 3


def test_adapter_from_s3_is_downloaded_and_loads_the_same(tmp_path: Path, adapters: dict,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    boto3 = pytest.importorskip("boto3", reason="boto3 is a test dependency")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        port = server.get_host_and_port()[1]
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                     "BATCHGEN_S3_ENDPOINT": f"http://127.0.0.1:{port}", CACHE_ENV: str(tmp_path / "cache")}.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(Bucket="ads")
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                               access_key="testing", secret_key="testing")
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            with fs.open_output_stream(f"ads/clients/a/{f}") as out:
                out.write((adapters["a"] / f).read_bytes())
        local = fetch_adapter("a", "s3://ads/clients/a")
        assert local.parent == tmp_path / "cache"
        args = load_args(DEMO_MODEL)
        assert load_adapter(local, args, "a").fingerprint == load_adapter(adapters["a"], args, "a").fingerprint
        # Through the job checks: the S3 adapter is fetched, loaded and checked like a local one.
        write_input(tmp_path)
        check_model(validate_spec(base_spec(tmp_path, adapters={"a": "s3://ads/clients/a"})))
        with pytest.raises(SpecError, match=r"model.adapters.z: s3://ads/clients/z/adapter_config.json: file is missing"):
            check_model(validate_spec(base_spec(tmp_path, adapters={"z": "s3://ads/clients/z"})))
    finally:
        server.stop()


def test_job_with_an_adapter_column_matches_the_engine(tmp_path: Path, adapters: dict) -> None:
    """Rows pick base or an adapter by a column, in one job; each row's completion is the engine's
    with that adapter; an unknown name is an error row naming it."""
    prompts, names = write_input(tmp_path)
    data = base_spec(tmp_path, adapters={k: str(v) for k, v in adapters.items()})
    data["input"]["adapter_column"] = "client"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(tmp_path / "job.yaml")
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        summary = run_job(spec, progress_every_s=1)
    finally:
        ray.shutdown()
    assert summary["rows"] == len(prompts) and summary["rows_error"] == 1
    rows = {r["id"]: r for r in pq.ParquetDataset(tmp_path / "out" / "shards").read().to_pylist()}
    assert rows[5]["finish_reason"] == "error" and "unknown adapter 'nope'" in rows[5]["error"]

    llm = LLM(DEMO_MODEL, dtype="float32", device="cpu", adapters=adapters)
    want = llm.generate(prompts, [SamplingParams(max_tokens=10, seed=0, adapter=n if n != "nope" else None)
                                  for n in names])
    for i, w in enumerate(want):
        if i != 5:
            assert rows[i]["completion"] == w.text, (i, names[i])
    # The adapters really change the answers.
    plain = {i: o.text for i, o in enumerate(llm.generate(prompts, SamplingParams(max_tokens=10)))}
    assert any(rows[i]["completion"] != plain[i] for i in range(len(prompts)) if names[i] == "a")
    assert all(rows[i]["completion"] == plain[i] for i in range(len(prompts)) if names[i] in (None, ""))
