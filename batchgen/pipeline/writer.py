"""Output side of a job: the Parquet results, published so that readers never see half a file.

Layout under ``output.path``::

    manifest.json            spec, input and model fingerprints, provenance, the shard plan
                             (written first)
    runs.json                one entry per run that did work (see batchgen.pipeline.jobsummary)
    shards/<shard_id>.parquet one per committed shard
    summary.parquet          one row per shard (counts, timings, replica)
    _SUCCESS                 JSON, written last: the job is complete
    parts/<shard_id>/...     pieces of a shard that was split to corner a poison row; merged
                             into shards/<shard_id>.parquet, then deleted (never output)

A shard is *committed* when ``shards/<shard_id>.parquet`` exists. Publishing is atomic: on a
local disk the file is written under a hidden ``.tmp-<uuid>-...`` name in the same directory and
renamed; on object stores (S3, GCS) the finished bytes go up in one ``open_output_stream`` (one
PUT, or a multipart upload that only becomes visible when complete). A writer killed midway
leaves at most a hidden temp file, which every listing here (and ``pyarrow.dataset``, which skips
names starting with ``.`` or ``_``) ignores. The whole output reads as one dataset with
``pyarrow.dataset.dataset(f"{out}/shards", format="parquet")``.

Object stores fail transiently (500s, resets, throttling). Beyond the SDK's own retries, every
storage call here on a non-local filesystem goes through :func:`storage.with_retries` (exponential
backoff with jitter); an error that outlasts it is raised to the caller, which for a replica
fails the attempt (the shard goes back to the queue), not the job.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchgen import __version__
from batchgen.pipeline.manifest import manifest_problem
from batchgen.pipeline.outdir import delete_ours, foreign_entries, symlink_problem
from batchgen.pipeline.provenance import fingerprint_changes, provenance
from batchgen.pipeline.records import SUMMARY_SCHEMA, ShardSummary
from batchgen.pipeline.shards import Shard
from batchgen.pipeline.spec import JobSpec, result_fields, spec_fingerprint
from batchgen.pipeline.storage import (  # noqa: F401 (OutputError: callers catch it from here)
    TMP_PREFIX, OutputError, is_local, join as _join, publish_bytes, publish_json, read_json, resolve_filesystem, with_retries,
)

SHARDS_DIR = "shards"
PARTS_DIR = "parts"
MANIFEST = "manifest.json"
SUMMARY = "summary.parquet"
SUCCESS = "_SUCCESS"
RUNS = "runs.json"

log = logging.getLogger("batchgen")
_FORMAT = "batchgen-output/1"
_SUMMARY_KEY = b"batchgen.shard_summary"
#: Parquet key-value metadata of every shard file: the manifest's provenance block (JSON).
PROVENANCE_KEY = b"batchgen.provenance"

_SUMMARY_TIMES = [f.name for f in SUMMARY_SCHEMA if pa.types.is_timestamp(f.type)]


# --------------------------------------------------------------------------------------- schema

def output_schema(spec: JobSpec, id_type: pa.DataType, keep_types: Mapping[str, pa.DataType]) -> pa.Schema:
    """Schema of every shard file: id (input name and type), keep columns, then the results.

    ``finish_reason`` is ``stop``, ``length`` or ``error``; ``error`` is null for good rows;
    ``logprobs`` (the sampled tokens' log-probabilities) exists only with ``sampling.logprobs``,
    ``token_ids`` (the generated ids, a stop token included) only with ``output.token_ids``,
    ``truncated_tokens`` (prompt tokens dropped from the front to fit the context) only with
    ``input.truncate_prompt``.
    Non-nullable fields make the Parquet writer refuse a table with nulls there.
    """
    keep = spec.input.keep_columns
    if set(keep_types) != set(keep):
        raise ValueError(f"keep_types has {sorted(keep_types)}, the spec keeps {keep}")
    fields = [pa.field(spec.input.id_column, id_type, nullable=False)]
    fields += [pa.field(c, keep_types[c]) for c in keep]
    fields += [
        pa.field("completion", pa.string()),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("completion_tokens", pa.int32(), nullable=False),
        pa.field("error", pa.string()),
    ]
    if spec.sampling.logprobs:
        fields.append(pa.field("logprobs", pa.list_(pa.float32())))
    if spec.output.token_ids:
        fields.append(pa.field("token_ids", pa.list_(pa.int32())))
    if spec.input.truncate_prompt:
        # What truncate_prompt cut from the front of the row's prompt (0: it fit): never silent.
        fields.append(pa.field("truncated_tokens", pa.int32(), nullable=False))
    if spec.classify is not None:
        # The best choice, each choice's score (in the order given) and the softmax over them.
        fields += [pa.field("label", pa.string()), pa.field("label_logprobs", pa.list_(pa.float64())),
                   pa.field("label_probs", pa.list_(pa.float64()))]
    return pa.schema(fields)


# --------------------------------------------------------------------------------------- publishing

def publish_shard(fs: pafs.FileSystem, out_root: str, shard_id: str, table: pa.Table,
                  summary: ShardSummary | Mapping[str, Any] | None = None,
                  before_commit: Callable[[], None] | None = None) -> str:
    """Atomically write ``table`` as ``<out_root>/shards/<shard_id>.parquet``; returns that path.

    ``summary`` (this shard's row of ``summary.parquet``; a dict: keys from :data:`SUMMARY_SCHEMA`) is
    stored in the file's footer, so the summary of a resumed job still covers shards committed by
    earlier runs (see :func:`read_shard_summaries`). Republishing a shard (a retried attempt)
    replaces the file as a whole. ``before_commit``: see :func:`publish_bytes`.

    Raises:
        ValueError: for an invalid shard id or an unknown summary key (checked before writing).
    """
    _check_id("shard id", shard_id)
    data = _parquet_bytes(table, shard_id, summary, _provenance(fs, out_root))
    path = _join(out_root, SHARDS_DIR, f"{shard_id}.parquet")
    publish_bytes(fs, path, data, before_commit)
    return path


def _check_id(what: str, value: str) -> None:
    if not value or value.startswith((".", "_")) or "/" in value:
        raise ValueError(f"invalid {what} {value!r}")


def _provenance(fs: pafs.FileSystem, out_root: str) -> bytes | None:
    """The manifest's provenance block as JSON bytes (None without a manifest or block).

    Read at every publish rather than passed down: replicas get it with no change to how they
    are started, and one small GET per shard costs nothing beside a shard's generation."""
    manifest = read_manifest(fs, out_root)
    block = (manifest or {}).get("provenance")
    return None if block is None else json.dumps(block, sort_keys=True).encode()


def _summary(summary: ShardSummary | Mapping[str, Any] | None, shard_id: str) -> ShardSummary | None:
    """``summary`` as the record of ``shard_id`` (a dict is checked for unknown keys)."""
    if summary is None:
        return None
    if isinstance(summary, ShardSummary):
        return summary.with_id(shard_id)
    return ShardSummary.from_dict({**summary, "shard_id": shard_id})


def _parquet_bytes(table: pa.Table, shard_id: str, summary: ShardSummary | Mapping[str, Any] | None,
                   prov: bytes | None = None) -> bytes:
    """``table`` as a Parquet file, with ``summary`` (checked first) and ``prov`` in its footer."""
    if prov is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), PROVENANCE_KEY: prov})
    record = _summary(summary, shard_id)
    if record is not None:
        metadata = {**(table.schema.metadata or {}), _SUMMARY_KEY: json.dumps(record.to_dict(), default=str)}
        table = table.replace_schema_metadata(metadata)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


# --------------------------------------------------------------------------------------- parts

def publish_part(fs: pafs.FileSystem, out_root: str, shard_id: str, part_id: str, table: pa.Table,
                 summary: ShardSummary | Mapping[str, Any] | None = None,
                 before_commit: Callable[[], None] | None = None) -> str:
    """Atomically write one piece of a split shard as ``parts/<shard_id>/<part_id>.parquet``.

    Parts are never output: :func:`merge_parts` turns a complete set into the shard's file.
    """
    _check_id("shard id", shard_id)
    _check_id("part id", part_id)
    path = _join(out_root, PARTS_DIR, shard_id, f"{part_id}.parquet")
    publish_bytes(fs, path, _parquet_bytes(table, part_id, summary), before_commit)
    return path


def row_counts(table: pa.Table) -> dict[str, int]:
    """``rows``, ``rows_ok``, ``rows_error``, ``prompt_tokens``, ``completion_tokens`` of an output table."""
    errors = pc.sum(pc.equal(table["finish_reason"], "error")).as_py() or 0
    return {"rows": table.num_rows, "rows_ok": table.num_rows - errors, "rows_error": errors,
            "prompt_tokens": pc.sum(table["prompt_tokens"]).as_py() or 0,
            "completion_tokens": pc.sum(table["completion_tokens"]).as_py() or 0}


def merge_parts(fs: pafs.FileSystem, out_root: str, shard_id: str, part_ids: Sequence[str],
                summary: ShardSummary | Mapping[str, Any] | None = None) -> str:
    """Publish the parts ``part_ids`` (in that order) as ``shards/<shard_id>.parquet`` in one
    atomic write, then delete the shard's parts; returns the shard's path. The summary's row
    and token counts are taken from the merged rows (see :func:`row_counts`).

    The caller names the parts (those its queue committed), so a stray part file, say from a
    replica of an earlier, killed run, can never be merged twice.
    """
    tables = []
    for part_id in part_ids:
        path = _join(out_root, PARTS_DIR, shard_id, f"{part_id}.parquet")
        tables.append(with_retries(fs, f"reading {path}", lambda p=path: pq.read_table(p, filesystem=fs)))
    merged = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    # Counted from the rows themselves, so the summary always matches the file.
    summary = replace(_summary(summary or {}, shard_id), **row_counts(merged))
    path = publish_shard(fs, out_root, shard_id, merged, summary=summary)
    discard_parts(fs, out_root, [shard_id])
    return path


def discard_parts(fs: pafs.FileSystem, out_root: str, shard_ids: Iterable[str] | None = None) -> None:
    """Delete the parts of ``shard_ids`` (default: all parts). A run starts with this: parts of a
    shard that was never merged are redone, not trusted."""
    dirs = ([_join(out_root, PARTS_DIR)] if shard_ids is None
            else [_join(out_root, PARTS_DIR, s) for s in shard_ids])
    for d in dirs:
        def delete(d: str = d) -> None:
            if fs.get_file_info(d).type != pafs.FileType.NotFound:
                fs.delete_dir(d)
        with_retries(fs, f"deleting {d}", delete)


def remove_leftovers(fs: pafs.FileSystem, out_root: str) -> int:
    """Delete temp files that killed writers left behind (hidden ``.tmp-*`` names in the output
    root and ``shards/``) and all parts; returns how many temp files went. Call it only once
    every shard is committed: a live writer's temp file would be pulled from under it."""
    removed = 0
    for d in (out_root, _join(out_root, SHARDS_DIR)):
        selector = pafs.FileSelector(d, allow_not_found=True)
        for info in with_retries(fs, f"listing {d}", lambda s=selector: fs.get_file_info(s)):
            if info.type == pafs.FileType.File and info.base_name.startswith(TMP_PREFIX):
                try:
                    fs.delete_file(info.path)
                    removed += 1
                except FileNotFoundError:  # its writer finished or cleaned up meanwhile
                    pass
    discard_parts(fs, out_root)
    return removed


def read_shard_summaries(fs: pafs.FileSystem, out_root: str, shard_ids: Iterable[str] | None = None
                         ) -> list[ShardSummary]:
    """The summary rows stored by :func:`publish_shard` in committed shards (footers only).

    Only ``shard_ids`` when given (leftovers of another plan are skipped). A shard published
    without a summary gets its ``shard_id`` and ``rows`` from its footer.
    """
    ids = committed_shards(fs, out_root)
    if shard_ids is not None:
        ids &= set(shard_ids)
    rows = []
    for shard_id in sorted(ids):
        path = _join(out_root, SHARDS_DIR, f"{shard_id}.parquet")
        meta = with_retries(fs, f"reading {path}", lambda p=path: _footer(fs, p))
        stored = (meta.metadata or {}).get(_SUMMARY_KEY)
        rows.append(ShardSummary.from_dict(json.loads(stored)) if stored
                    else ShardSummary(shard_id=shard_id, rows=meta.num_rows))
    return rows


def _footer(fs: pafs.FileSystem, path: str) -> pq.FileMetaData:
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata


def read_manifest(fs: pafs.FileSystem, out_root: str) -> dict[str, Any] | None:
    """The manifest under ``out_root``, checked to have the manifest's shape (None when absent).

    Raises:
        OutputError: it is not valid JSON, or not a manifest (:func:`manifest.check_manifest`).
    """
    path = _join(out_root, MANIFEST)
    obj = read_json(fs, path)
    if obj is not None and (problem := manifest_problem(obj, path)) is not None:
        raise OutputError("output.path", problem)
    return obj


def committed_shards(fs: pafs.FileSystem, out_root: str) -> set[str]:
    """Ids of the shards whose output file exists (only ``shards/*.parquet``, no hidden names)."""
    selector = pafs.FileSelector(_join(out_root, SHARDS_DIR), allow_not_found=True)
    ids = set()
    for info in with_retries(fs, f"listing {selector.base_dir}", lambda: fs.get_file_info(selector)):
        name = info.base_name
        if info.type == pafs.FileType.File and name.endswith(".parquet") and not name.startswith((".", "_")):
            ids.add(name.removesuffix(".parquet"))
    return ids


# --------------------------------------------------------------------------------------- job level

def _now() -> str:
    # The same ISO-8601 UTC form as every other timestamp batchgen writes (jobsummary.iso).
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _top_level(fs: pafs.FileSystem, root: str, uri: str) -> list[str]:
    """Names directly under ``root`` ([] when it does not exist)."""
    info = with_retries(fs, f"reading {uri}", lambda: fs.get_file_info(root))
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        raise OutputError("output.path", f"{uri} exists and is not a directory")
    listing = with_retries(fs, f"listing {uri}", lambda: fs.get_file_info(pafs.FileSelector(root)))
    return sorted(i.base_name for i in listing)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def _spec_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = _flatten(dict(old)), _flatten(dict(new))
    return [f"{key}: {a.get(key, '(default)')!r} -> {b.get(key, '(default)')!r}"
            for key in sorted(a.keys() | b.keys()) if a.get(key, "(default)") != b.get(key, "(default)")]


def _check_manifest(manifest: Mapping[str, Any], spec: JobSpec, input_fp: str, shards: Sequence[Shard],
                    uri: str, model_fp: Mapping[str, Any] | None = None) -> None:
    advice = "use mode: overwrite to start again, or another output.path"
    if manifest.get("spec_fingerprint") != spec_fingerprint(spec):
        changes = _spec_diff(manifest.get("result_fields", {}), result_fields(spec))
        raise OutputError("output.mode", f"resume refused: {uri} holds results of a different spec "
                                         f"({'; '.join(changes) or 'fingerprint differs'}); {advice}")
    old_model = manifest.get("model_fingerprint")
    if old_model is not None and model_fp is not None and old_model.get("digest") != model_fp.get("digest"):
        changes = fingerprint_changes(old_model, model_fp)
        raise OutputError("model.path", f"resume refused: the model at {spec.model.path} is not the one {uri} "
                                        f"was started with ({'; '.join(changes)}); {advice}")
    if manifest.get("input_fingerprint") != input_fp:
        raise OutputError("output.mode", f"resume refused: the input changed since {uri} was started "
                                         f"(files added, removed or rewritten); {advice}")
    old_ids = [s["shard_id"] for s in manifest.get("shards", [])]
    if sorted(old_ids) != sorted(s.shard_id for s in shards):
        was = manifest.get("shard_rows")
        raise OutputError("output.mode", f"resume refused: the shard plan of {uri} differs (it was made with "
                                         f"execution.shard_rows: {was}, now {spec.execution.shard_rows}); set it "
                                         f"back to {was} or {advice}")


def _manifest(spec: JobSpec, shards: Sequence[Shard], input_fp: str,
              model_fp: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "model_fingerprint": None if model_fp is None else dict(model_fp),
        "provenance": provenance(spec_fingerprint(spec), spec.sampling.model_dump(mode="json"), model_fp, input_fp),
        "format": _FORMAT,
        "batchgen_version": __version__,
        "name": spec.name,
        "created": _now(),
        "spec_fingerprint": spec_fingerprint(spec),
        "input_fingerprint": input_fp,
        "result_fields": result_fields(spec),
        "shard_rows": spec.execution.shard_rows,
        "num_shards": len(shards),
        "total_rows": sum(s.num_rows for s in shards),
        "shards": [{"shard_id": s.shard_id, "input_file": s.relpath, "row_groups": list(s.row_groups),
                    "row_offset": s.row_offset, "row_start": s.row_start, "rows": s.num_rows} for s in shards],
    }


def check_output(spec: JobSpec, shards: Sequence[Shard], input_fp: str,
                 model_fp: Mapping[str, Any] | None = None) -> set[str] | None:
    """Check that ``output.mode`` can be applied at ``output.path``, writing nothing (``batchgen
    validate`` and :func:`prepare_output` both call it); returns the ids of the shards a resume
    would keep, or None when there is no earlier run to resume.

    Raises:
        OutputError: with ``output.path`` / ``output.mode`` / ``model.path`` and what to do.
    """
    uri = spec.output.path
    fs, root = resolve_filesystem(uri)
    entries = _top_level(fs, root, uri)
    mode = spec.output.mode
    if mode == "error_if_exists" and entries:
        raise OutputError("output.path", f"{uri} is not empty ({', '.join(entries[:5])}); "
                                         "mode: error_if_exists refuses it (use resume or overwrite)")
    # A shards/ symlink would take the output (and an overwrite's deletions) elsewhere.
    if is_local(fs) and (problem := symlink_problem(root)) is not None:
        raise OutputError("output.path", f"{uri} {problem}")
    if mode == "overwrite" and entries:
        foreign = foreign_entries(fs, root, is_local(fs), _retry(fs))  # in shards/ and parts/ too
        if foreign:
            raise OutputError("output.path", f"{uri} holds files batchgen did not write "
                                             f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); "
                                             "mode: overwrite deletes only batchgen's own files, so it refuses: "
                                             "move them away or use another output.path")
    manifest = read_manifest(fs, root) if mode == "resume" else None
    if manifest is not None:
        _check_manifest(manifest, spec, input_fp, shards, uri, model_fp)
        return committed_shards(fs, root) & {s.shard_id for s in shards}
    if mode == "resume" and (committed_shards(fs, root) or SUCCESS in entries or SUMMARY in entries):
        raise OutputError("output.path", f"{uri} holds batchgen results but no {MANIFEST}, so they cannot "
                                         "be matched to this spec; use mode: overwrite")
    return None


def _retry(fs: pafs.FileSystem) -> Callable[[str, Callable[[], Any]], Any]:
    """:func:`storage.with_retries` on ``fs`` as a ``(what, call)`` function, for outdir's helpers."""
    return lambda what, call: with_retries(fs, what, call)


def prepare_output(spec: JobSpec, shards: Sequence[Shard], input_fp: str,
                   model_fp: Mapping[str, Any] | None = None) -> set[str]:
    """Apply ``output.mode`` and write the manifest; returns the ids of shards already committed.

    ``model_fp`` (:func:`provenance.model_fingerprint`) goes into the manifest; a resume whose
    model fingerprint differs from the recorded one is refused, naming the files that changed.

    - ``resume``: continue a previous run of the same spec over the same input and shard plan
      (anything else is refused with what changed); a fresh location starts a new run.
    - ``overwrite``: delete a previous run's outputs first. Files that batchgen did not write
      there are never deleted: their presence is an error.
    - ``error_if_exists``: refuse a location that has anything in it.

    Raises:
        OutputError: with ``output.path`` / ``output.mode`` and a message saying what to do.
    """
    committed = check_output(spec, shards, input_fp, model_fp)
    fs, root = resolve_filesystem(spec.output.path)
    if committed is not None:
        if len(committed) < len(shards) and fs.get_file_info(_join(root, SUCCESS)).type == pafs.FileType.File:
            fs.delete_file(_join(root, SUCCESS))  # a shard went missing: the job is not complete now
        return committed
    if spec.output.mode == "overwrite":
        delete_ours(fs, root, is_local(fs), _retry(fs))  # file by file, by batchgen's own names
    publish_json(fs, _join(root, MANIFEST), _manifest(spec, shards, input_fp, model_fp))
    return set()


def write_summary(fs: pafs.FileSystem, out_root: str, rows: Iterable[ShardSummary | Mapping[str, Any]]) -> str:
    """Write ``summary.parquet``, one row per shard (fields: :data:`SUMMARY_SCHEMA`); returns its path.

    Raises:
        ValueError: for a key that is not a summary field (a typo would otherwise vanish).
    """
    records = [r if isinstance(r, ShardSummary) else ShardSummary.from_dict(r) for r in rows]
    records.sort(key=lambda r: (r.input_file or "", r.row_start or 0, r.shard_id))
    table_rows = []
    for r in records:
        row = {name: getattr(r, name) for name in SUMMARY_SCHEMA.names}
        for key in _SUMMARY_TIMES:  # footers hold epoch seconds (JSON has no time type)
            if row[key] is not None:
                row[key] = dt.datetime.fromtimestamp(float(row[key]), dt.timezone.utc)
        table_rows.append(row)
    table = pa.Table.from_pylist(table_rows, schema=SUMMARY_SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    path = _join(out_root, SUMMARY)
    publish_bytes(fs, path, buf.getvalue().to_pybytes())
    return path


def write_success(fs: pafs.FileSystem, out_root: str, summary: Mapping[str, Any]) -> None:
    """Write ``_SUCCESS`` (``summary``, with a ``finished`` time unless it has one): call it last,
    after every shard."""
    publish_json(fs, _join(out_root, SUCCESS), {"finished": _now(), **summary})


def job_status(out_uri: str) -> dict[str, Any]:
    """Progress of the job writing to ``out_uri`` (for ``batchgen status OUT``).

    Keys: ``output``, ``exists``, ``name``, ``created``, ``total_shards``, ``committed_shards``,
    ``total_rows``, ``committed_rows`` (from the manifest's plan; None without a manifest),
    ``complete`` (``_SUCCESS`` exists) and ``success`` (its content or None).

    Raises:
        OutputError: the manifest (or ``_SUCCESS``) is not valid JSON or not a manifest.
    """
    fs, root = resolve_filesystem(out_uri)
    exists = bool(_top_level(fs, root, out_uri))
    manifest = read_manifest(fs, root) or {}
    success = read_json(fs, _join(root, SUCCESS))
    committed = committed_shards(fs, root)
    planned = {s["shard_id"]: s["rows"] for s in manifest.get("shards", [])}
    if planned:
        committed &= planned.keys()  # leftovers of another plan are not this job's progress
    return {
        "output": out_uri,
        "exists": exists,
        "name": manifest.get("name"),
        "created": manifest.get("created"),
        "total_shards": manifest.get("num_shards"),
        "committed_shards": len(committed),
        "total_rows": manifest.get("total_rows"),
        "committed_rows": sum(planned[s] for s in committed) if planned else None,
        "complete": success is not None,
        "success": success,
    }
