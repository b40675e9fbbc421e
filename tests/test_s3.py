"""A job whose input and output live on S3 that misbehaves: every row still lands exactly once.

The S3 API is moto's server on 127.0.0.1. In front of it runs a small loopback HTTP proxy (the
endpoint batchgen is given) that, counting requests, answers some with ``500 InternalError``
without passing them on, drops the connection of others (before or after moto has acted),
and slows some down; and it refuses every upload of one chosen shard file many times in a
row, more than the retries of one attempt can absorb, so that attempt fails and the queue
retries the shard. All of it is deterministic: no random faults.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import http.client
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from batchgen.pipeline import verify
from batchgen.pipeline.driver import run_job
from batchgen.pipeline.shards import plan_shards
from batchgen.pipeline.spec import validate_spec

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
boto3 = pytest.importorskip("boto3", reason="boto3 is a test dependency")

REPO = Path(__file__).resolve().parents[1]
BUCKET = "batchgen-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
#: The S3 client's tries per request in this test (BATCHGEN_S3_MAX_ATTEMPTS; batchgen's default is 10).
SDK_TRIES = 3
#: Uploads of the chosen shard file refused in a row: more than one attempt's 5 tries x 3 SDK tries.
REFUSED_UPLOADS = 5 * SDK_TRIES + 1


class FaultProxy(ThreadingHTTPServer):
    """Forwards every request to ``upstream`` (moto), except that request number n (from 1):

    - ``n % 9 == 0``: answers 500 InternalError, upstream untouched;
    - ``n % 17 == 0``: drops the connection without an answer, upstream untouched;
    - ``n % 19 == 0``: forwards it, then drops the connection (the caller cannot know it worked);
    - ``n % 5 == 0``: waits 50 ms first;

    and the first ``refuse_times`` PUTs of a path ending in ``refuse_suffix`` get a 500.
    ``faults`` counts what was injected.
    """

    daemon_threads = True

    def __init__(self, upstream_port: int, refuse_suffix: Optional[str] = None, refuse_times: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_port = upstream_port
        self.refuse_suffix, self.refuse_times = refuse_suffix, refuse_times
        self.lock = threading.Lock()
        self.requests = 0
        self.faults: Counter[str] = Counter()

    def decide(self, method: str, path: str) -> str:
        with self.lock:
            self.requests += 1
            n = self.requests
            if (self.refuse_suffix and method == "PUT" and path.split("?")[0].endswith(self.refuse_suffix)
                    and self.faults["refused"] < self.refuse_times):
                verdict = "refused"
            elif n % 9 == 0:
                verdict = "error"
            elif n % 17 == 0:
                verdict = "drop"
            elif n % 19 == 0 and method != "POST":  # never lose the answer of a multipart step
                verdict = "lose-answer"
            elif n % 5 == 0:
                verdict = "slow"
            else:
                verdict = "pass"
            self.faults[verdict] += 1
            return verdict


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        verdict = self.server.decide(self.command, self.path)
        if verdict in ("error", "refused"):
            payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                       b"<Message>injected by the test proxy</Message></Error>")
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has no body, or it would garble the next one
                self.wfile.write(payload)
            return
        if verdict == "drop":
            self.close_connection = True
            return
        if verdict == "slow":
            time.sleep(0.05)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if verdict == "lose-answer":
            self.close_connection = True
            return
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        # HEAD answers carry the object's length but no body.
        self.send_header("Content-Length", resp.getheader("Content-Length", str(len(data))))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


# --------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        port = server.get_host_and_port()[1]
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield port
    finally:
        server.stop()


def direct_s3(port: int) -> pafs.S3FileSystem:
    """A filesystem on moto itself, bypassing the faulty proxy (for setting up and checking)."""
    return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                             access_key="testing", secret_key="testing")


def write_input(fs: pafs.FileSystem, rows: int = 40) -> list[int]:
    from batchgen.demo.task import make_examples

    prompts: list[Optional[str]] = [p for p, _ in make_examples(rows, seed=9, split="heldout")]
    prompts[6] = None  # a poison row on S3 too
    ids = [100 + i for i in range(rows)]
    half = rows // 2
    for name, lo, hi in (("a.parquet", 0, half), ("b.parquet", half, rows)):
        pq.write_table(pa.table({"id": ids[lo:hi], "prompt": prompts[lo:hi]}), f"{BUCKET}/in/{name}",
                       filesystem=fs, row_group_size=5)
    return ids


# --------------------------------------------------------------------------------------- test

def test_job_on_flaky_s3_completes_exactly_once(model_dir: Path, moto_port: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("BATCHGEN_S3_ENDPOINT", f"http://127.0.0.1:{moto_port}")
    monkeypatch.setenv("BATCHGEN_S3_MAX_ATTEMPTS", str(SDK_TRIES))
    ids = write_input(direct_s3(moto_port))
    spec = validate_spec({
        "name": "s3-chaos",
        "model": {"path": str(model_dir), "dtype": "float32"},
        "input": {"path": f"s3://{BUCKET}/in", "id_column": "id", "prompt_column": "prompt"},
        "sampling": {"max_tokens": 4},
        "output": {"path": f"s3://{BUCKET}/out"},
        "execution": {"replicas": 2, "shard_rows": 5, "max_attempts": 3, "heartbeat_s": 1, "lease_timeout_s": 60},
    })
    shards = plan_shards(spec.input, 5)
    victim = shards[2].shard_id  # its first attempt cannot publish, however hard it retries

    proxy = FaultProxy(moto_port, refuse_suffix=f"/out/shards/{victim}.parquet", refuse_times=REFUSED_UPLOADS)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
    monkeypatch.setenv("BATCHGEN_S3_ENDPOINT", endpoint)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "BATCHGEN_S3_ENDPOINT": endpoint,
                                       "BATCHGEN_S3_MAX_ATTEMPTS": str(SDK_TRIES), **CREDENTIALS}})
    try:
        summary = run_job(spec, progress_every_s=2)
    finally:
        ray.shutdown()
        proxy.shutdown()
        thread.join()
        proxy.server_close()

    # The proxy really misbehaved, on every kind of fault.
    print(f"proxy: {proxy.requests} requests, faults {dict(proxy.faults)}")
    assert proxy.faults["refused"] == REFUSED_UPLOADS, proxy.faults
    assert min(proxy.faults[k] for k in ("error", "drop", "lose-answer", "slow")) >= 3, proxy.faults
    assert summary["rows"] == len(ids) and summary["rows_error"] == 1 and summary["shards"] == len(shards)

    # Read back from moto directly: every row once, the poison row as an error.
    fs = direct_s3(moto_port)
    monkeypatch.setenv("BATCHGEN_S3_ENDPOINT", f"http://127.0.0.1:{moto_port}")
    report = verify.verify_output(f"s3://{BUCKET}/in", "id", f"s3://{BUCKET}/out")
    assert report.ok and report.output_rows == len(ids) and report.error_rows == 1, verify.format_report(report)
    assert report.summary_rows == len(ids)
    rows = {s["shard_id"]: s for s in pq.read_table(f"{BUCKET}/out/summary.parquet", filesystem=fs).to_pylist()}
    assert rows[victim]["attempts"] >= 2  # the refused upload failed an attempt, not the job
    assert all(rows[s.shard_id]["attempts"] == 1 for s in shards if s.shard_id != victim)
    listing = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/out", recursive=True))]
    assert not [p for p in listing if "/parts/" in p or "/.tmp-" in p], listing
    assert json.loads(fs.open_input_stream(f"{BUCKET}/out/_SUCCESS").read())["rows"] == len(ids)
