"""Storage: where a path or URI lives, and reading and writing it so that failures stay small.

One module for every part of the pipeline that touches files (input listing and shards, the
output writer, replicas, ``verify``, the job summary):

- :func:`resolve_filesystem` maps a local path, ``s3://`` or ``gs://`` URI to a ``pyarrow.fs``
  filesystem and a path in it (with the S3 endpoint and retry settings batchgen supports);
- :func:`with_retries` retries transient object-store errors with backoff (exponential, with
  jitter); an error that outlasts it is raised to the caller, which for a replica fails the
  attempt (the shard goes back to the queue), not the job;
- :func:`publish_bytes` makes a file hold exactly some bytes, or leaves it as it was: a temp file
  and a rename locally, one upload on object stores (which appear only once complete);
- :func:`read_json` / :func:`publish_json` for the small JSON documents of the output.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import time
import uuid
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from batchgen.pipeline.spec import SpecError, is_uri

#: Environment variables that point ``s3://`` at another endpoint (MinIO, moto...), first wins.
S3_ENDPOINT_ENV = ("BATCHGEN_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
#: Transient object-store errors (500s, throttling, resets) are retried by the S3 client itself,
#: with AWS's standard backoff, by default well beyond its own default of 3 tries.
S3_MAX_ATTEMPTS_ENV = "BATCHGEN_S3_MAX_ATTEMPTS"
S3_MAX_ATTEMPTS = 10

#: Tries of one storage call on an object store (on top of the SDK's own), and the first wait.
IO_ATTEMPTS = 5
IO_BACKOFF_S = 0.2
# Errors that another try cannot fix: raised at once.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
#: Name prefix of the hidden temp files a local publish writes before its rename.
TMP_PREFIX = ".tmp-"

log = logging.getLogger("batchgen")
T = TypeVar("T")


class OutputError(SpecError):
    """The output location cannot be used as asked (mode, fingerprints, foreign files, bad JSON)."""


# --------------------------------------------------------------------------------------- filesystems

def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The ``pyarrow.fs`` filesystem and in-filesystem path for a local path or URI.

    Local relative paths are taken against the CWD (see :mod:`batchgen.pipeline.spec`). For
    ``s3://`` an endpoint from ``BATCHGEN_S3_ENDPOINT``/``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``
    (e.g. ``http://127.0.0.1:9000``) overrides AWS; credentials come from the usual AWS variables.
    """
    if not is_uri(uri) or uri.startswith("file://"):
        local = uri.removeprefix("file://")
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        path = (parsed.netloc + parsed.path).rstrip("/")
        endpoint = next((os.environ[k] for k in S3_ENDPOINT_ENV if os.environ.get(k)), None)
        if endpoint:
            return _s3_with_endpoint(endpoint, _aws_region()), path
        return _s3_for_bucket(parsed.netloc), path
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/") or path


def _aws_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _s3_with_endpoint(endpoint: str, region: str) -> pafs.S3FileSystem:
    # Not cached: it is cheap (no network) and must pick up credentials set after import (tests).
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    # Path-style addressing (arrow's default with an endpoint override) is what MinIO/moto expect.
    return pafs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme, region=region,
                             retry_strategy=_s3_retries())


@functools.lru_cache(maxsize=16)
def _s3_for_bucket(bucket: str) -> pafs.FileSystem:
    # Cached per bucket: without a region in the URI, we ask AWS where the bucket lives.
    return pafs.S3FileSystem(region=pafs.resolve_s3_region(bucket), retry_strategy=_s3_retries())


def _s3_retries() -> pafs.S3RetryStrategy:
    """The S3 client's retries: ``BATCHGEN_S3_MAX_ATTEMPTS`` tries per request (default 10)."""
    raw = os.environ.get(S3_MAX_ATTEMPTS_ENV, "").strip()
    try:
        attempts = int(raw) if raw else S3_MAX_ATTEMPTS
        if attempts < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{S3_MAX_ATTEMPTS_ENV}={raw!r}: expected an integer >= 1") from None
    return pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)


def join_uri(base: str, *parts: str) -> str:
    """``base`` and ``parts`` joined with ``/`` (URIs) or ``os.path.join`` (local paths)."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def join(root: str, *parts: str) -> str:
    """A path inside a ``pyarrow.fs`` filesystem: those paths are '/'-separated on every one."""
    return "/".join([root.rstrip("/"), *parts])


def is_local(fs: pafs.FileSystem) -> bool:
    """Whether ``fs`` is the local disk (possibly under a ``SubTreeFileSystem``)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return True
    return isinstance(fs, pafs.SubTreeFileSystem) and is_local(fs.base_fs)


# --------------------------------------------------------------------------------------- retries

def with_retries(fs: pafs.FileSystem, what: str, call: Callable[[], T], attempts: int = IO_ATTEMPTS,
                 backoff_s: float = IO_BACKOFF_S) -> T:
    """``call()``, tried up to ``attempts`` times while an object store fails with an ``OSError``.

    Waits ``backoff_s * 2**n`` (times a random 0.5-1.5, so that replicas do not retry in step)
    between tries. Local filesystems are called once: their errors (disk full, permissions)
    do not go away by waiting. Errors such as a missing file are raised at once. The last
    error is raised with a note saying how many tries were made.
    """
    if is_local(fs):
        return call()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except _PERMANENT:
            raise
        except OSError as exc:
            if attempt == attempts:
                exc.add_note(f"batchgen: {what} failed {attempts} times; giving up")
                raise
            delay = backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s failed (%s); try %d of %d in %.1fs", what, str(exc).splitlines()[0][:200],
                        attempt + 1, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


# --------------------------------------------------------------------------------------- bytes and JSON

def publish_bytes(fs: pafs.FileSystem, path: str, data: bytes,
                  before_commit: Callable[[], None] | None = None) -> None:
    """Make ``path`` hold exactly ``data``, or leave it as it was: never a partial file.

    ``before_commit`` (a crash-test hook) runs once the bytes are staged and before they become
    visible: after the temp file is written (local) or the bytes are handed to the upload
    (object stores).
    """
    if is_local(fs):
        parent, _, name = path.rpartition("/")
        fs.create_dir(parent, recursive=True)
        # Hidden and not ending in .parquet, so a leftover from a killed writer matches no listing.
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}.partial"
        try:
            with fs.open_output_stream(tmp) as out:
                out.write(data)
            if before_commit is not None:
                before_commit()
            fs.move(tmp, path)  # rename(2): atomic within a directory
        except BaseException:
            if fs.get_file_info(tmp).type == pafs.FileType.File:
                fs.delete_file(tmp)
            raise
        return

    # Object stores have no atomic rename (move = copy + delete); an upload of finished bytes is
    # atomic there, since an object appears only once its PUT / multipart upload completes.
    # Every try uploads all the bytes again, so a retry after an unclear failure is harmless.
    def upload() -> None:
        out = fs.open_output_stream(path)
        try:
            out.write(data)
            if before_commit is not None:
                before_commit()
        finally:
            out.close()

    with_retries(fs, f"writing {path}", upload)


def publish_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON to ``path``."""
    publish_bytes(fs, path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(fs: pafs.FileSystem, path: str) -> Any | None:
    """The JSON document at ``path``, or None when there is none.

    Raises:
        OutputError: when it exists but is not valid JSON.
    """
    def read() -> bytes | None:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read()

    raw = with_retries(fs, f"reading {path}", read)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OutputError("output.path", f"{path} is not valid JSON ({exc})") from None
