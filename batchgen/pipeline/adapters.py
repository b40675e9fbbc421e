"""A job's LoRA adapters (``model.adapters``, ``input.adapter_column``) on the pipeline side.

Adapters on an object store are copied into a local cache directory first (through the pipeline's
own filesystems, :func:`~batchgen.pipeline.shards.resolve_filesystem`: the same endpoints,
credentials and retries as the input and output); the engine loads local directories only. Each
adapter is checked against the model before any work (``validate`` and ``run``): one that does not
fit is a :class:`~batchgen.pipeline.spec.SpecError` on ``model.adapters.<name>`` naming the file.

Modes: with one adapter and no ``adapter_column`` every row runs it, merged into the weights at
load (no per-step cost); otherwise all adapters stay resident, unmerged, and each row runs the
one its ``adapter_column`` cell names (null or "" = the base model; an unknown name is an error
row naming it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from batchgen.pipeline.storage import join_uri, resolve_filesystem
from batchgen.pipeline.spec import JobSpec, SpecError, is_uri

#: Where remote adapters are copied (default ``~/.cache/batchgen/adapters``).
CACHE_ENV = "BATCHGEN_ADAPTER_CACHE"
_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def cache_dir() -> Path:
    """The local directory remote adapters are copied into."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "batchgen" / "adapters")


def fetch_adapter(name: str, uri: str) -> Path:
    """A local directory holding adapter ``name`` from ``uri`` (local paths are returned as they are).

    A remote adapter's files (``adapter_config.json`` and its weights) are copied into
    :func:`cache_dir`, under a name derived from the URI; a copy whose sizes match the remote
    files is reused.

    Raises:
        SpecError: on ``model.adapters.<name>`` when the files cannot be read.
    """
    if not is_uri(uri) or uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    field = f"model.adapters.{name}"
    try:
        fs, root = resolve_filesystem(uri)
        infos = {i.base_name: i for i in fs.get_file_info([f"{root}/{f}" for f in _FILES])
                 if i.type == pafs.FileType.File}
    except (OSError, ValueError) as exc:
        raise SpecError(field, f"{uri}: cannot list the adapter's files ({exc})") from None
    if "adapter_config.json" not in infos:
        raise SpecError(field, f"{join_uri(uri, 'adapter_config.json')}: file is missing; expected a PEFT adapter "
                               "directory")
    local = cache_dir() / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"
    local.mkdir(parents=True, exist_ok=True)
    for base, info in infos.items():
        dest = local / base
        if dest.is_file() and dest.stat().st_size == info.size:
            continue
        tmp = dest.with_name(f".{base}.{os.getpid()}.tmp")  # renamed into place: no half file under the name
        try:
            with fs.open_input_stream(info.path) as src, open(tmp, "wb") as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
            os.replace(tmp, dest)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SpecError(field, f"{join_uri(uri, base)}: cannot download ({exc})") from None
    return local


def local_adapters(spec: JobSpec) -> dict[str, str]:
    """Each adapter's local directory (remote ones downloaded), by name."""
    return {name: str(fetch_adapter(name, uri)) for name, uri in spec.model.adapters.items()}


def merged(spec: JobSpec) -> bool:
    """Whether the job's one adapter is merged into the weights (no ``adapter_column``)."""
    return len(spec.model.adapters) == 1 and spec.input.adapter_column is None


def check_adapters(spec: JobSpec, args: Any) -> dict[str, str]:
    """Load every adapter against the model's ``args`` (a ``ModelArgs``) and return their local
    directories; one that does not fit is refused.

    Raises:
        SpecError: ``model.adapters.<name>: <file>: <what is wrong>``.
    """
    from batchgen.lora import AdapterError, load_adapter

    dirs = local_adapters(spec)
    problems = []
    for name, d in dirs.items():
        try:
            load_adapter(d, args, name)
        except AdapterError as exc:
            problems.append((f"model.adapters.{name}", str(exc)))
    if problems:
        raise SpecError(problems)
    return dirs


def row_adapters(spec: JobSpec, table: pa.Table) -> list[Optional[str]]:
    """Each row's adapter name from ``input.adapter_column`` (None: the base model, or the merged
    adapter); every row None without the column."""
    col = spec.input.adapter_column
    if col is None:
        return [None] * table.num_rows
    return [None if v is None or v == "" else str(v) for v in table.column(col).to_pylist()]


__all__ = ["CACHE_ENV", "cache_dir", "check_adapters", "fetch_adapter", "local_adapters", "merged", "row_adapters"]
