"""Input side of a job: find the Parquet files, cut them into shards, check them (the rows of a
shard become prompts in :mod:`batchgen.pipeline.rows`).

Everything here goes through ``pyarrow.fs``, so local paths, ``s3://`` and ``gs://`` behave the
same. Planning reads only Parquet footers; validation reads only the id column.

A *shard* is a run of whole row groups of one file, about ``shard_rows`` rows long; a row group
bigger than ``2 * shard_rows`` is split by row ranges. Its id is derived from the file's path
relative to the input root and its row-group/row range, so planning the same input twice (from
any machine, at any place the input is mounted) gives the same ids: that is what resume relies on.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchgen.pipeline.listing import GlobMatcher, list_files
from batchgen.pipeline.rows import INT_OVERRIDES, column_type_problem
from batchgen.pipeline.spec import InputSpec, JobSpec, SpecError
from batchgen.pipeline.storage import join_uri, resolve_filesystem

_GLOB_CHARS = "*?["


# --------------------------------------------------------------------------------------- listing

@dataclass(frozen=True)
class InputFile:
    """One input Parquet file and what its footer says (read once, when listing)."""

    uri: str  # openable with resolve_filesystem
    relpath: str  # relative to the input root, '/'-separated; the basis of shard ids
    size: int
    row_group_rows: tuple[int, ...]
    schema: pa.Schema = field(compare=False)
    footer_digest: str  # sha256 of the footer's contents (row counts, offsets, statistics)

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


def list_input_files(input_spec: InputSpec) -> list[InputFile]:
    """The Parquet files of ``input.path``, sorted by path, with their footers read.

    ``input.path`` is a file, a directory (every ``*.parquet`` below it; names starting with ``.``
    or ``_`` are skipped like ``pyarrow.dataset`` does), or a glob (``*``, ``?``, ``[...]`` within a
    path segment, ``**`` across segments; ``.``/``_`` names only where the pattern spells them out).

    Raises:
        SpecError: ``input.path: ...`` when nothing matches or a file is not readable Parquet.
    """
    uri = input_spec.path
    if any(c in uri for c in _GLOB_CHARS):
        root_uri, found = _glob(uri)
    else:
        fs, path = resolve_filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise SpecError("input.path", f"no such file or directory: {uri}")
        if info.type == pafs.FileType.File:
            # Its name alone is the relative path, so its shard ids do not depend on where it lies.
            return [_read_footer(uri, path.rsplit("/", 1)[-1], info.size)]
        root_uri, found = uri, _list_parquet(fs, path)
        if not found:
            raise SpecError("input.path", f"no *.parquet files under {uri}")
    found.sort()
    return [_read_footer(join_uri(root_uri, rel), rel, size) for rel, size in found]


def _list_parquet(fs: pafs.FileSystem, root: str) -> list[tuple[str, int]]:
    """``(relative path, size)`` of every visible ``*.parquet`` below ``root``."""
    return [(rel, size) for rel, size in list_files(fs, root, recursive=True)
            if rel.lower().endswith(".parquet") and not any(p.startswith((".", "_")) for p in rel.split("/"))]


def _glob(uri: str) -> tuple[str, list[tuple[str, int]]]:
    """Split ``uri`` at the last ``/`` before its first glob character, list below, match the rest."""
    first = min(uri.index(c) for c in _GLOB_CHARS if c in uri)
    cut = uri.rfind("/", 0, first)
    root_uri, pattern = (uri[:cut + 1], uri[cut + 1:]) if cut >= 0 else ("./", uri)
    fs, root = resolve_filesystem(root_uri)
    matcher = GlobMatcher(pattern)
    literal = set(pattern.split("/"))
    found = []
    for rel, size in list_files(fs, root, recursive="/" in pattern):
        # As in a directory, '.'/'_' names are skipped, unless the pattern spells them out.
        hidden = any(p.startswith((".", "_")) and p not in literal for p in rel.split("/"))
        if not hidden and matcher.match(rel):
            found.append((rel, size))
    if not found:
        raise SpecError("input.path", f"pattern {uri!r} matched no files")
    return root_uri, found


#: Row groups one input file may have. Each is a planning unit: a footer with 50,000 of them
#: is ~10 MB that every shard read parses again (about a second each), so such a file is refused
#: with advice before any work, rather than planned into a slow job.
MAX_ROW_GROUPS_PER_FILE = 10_000


def _read_footer(uri: str, relpath: str, size: int) -> InputFile:
    fs, path = resolve_filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            meta, raw = _footer_bytes(f)
            schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:
        raise SpecError("input.path", f"{uri}: not a readable Parquet file ({exc})") from None
    if meta.num_row_groups > MAX_ROW_GROUPS_PER_FILE:
        raise SpecError("input.path", f"{uri}: {meta.num_row_groups} row groups, more than the "
                                      f"{MAX_ROW_GROUPS_PER_FILE} batchgen plans per file (each is "
                                      f"{meta.num_rows / meta.num_row_groups:.0f} rows on average); rewrite it "
                                      "with bigger row groups, e.g. pyarrow.parquet.write_table(..., "
                                      "row_group_size=100_000)")
    # The digest hashes the footer as stored: linear in its size, where hashing a dict of every
    # row group's statistics took ~16 s for 50,000 row groups.
    digest = hashlib.sha256(raw).hexdigest()
    rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return InputFile(uri=uri, relpath=relpath, size=size, row_group_rows=rows, schema=schema,
                     footer_digest=digest)


def _footer_bytes(f: pa.NativeFile) -> tuple[pq.FileMetaData, bytes]:
    """The parsed footer of an open Parquet file and its bytes (the footer, its length, ``PAR1``).

    One read of the file's last 64 KiB, as pyarrow's own reader does, and a second only for a
    bigger footer: an object store sees no more requests than for ``pq.ParquetFile(f).metadata``.
    """
    size = f.size()
    tail = f.read_at(min(size, 1 << 16), size - min(size, 1 << 16))
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise pa.ArrowInvalid("no Parquet magic bytes at the end of the file")
    length = int.from_bytes(tail[-8:-4], "little")
    if length + 12 > size:
        raise pa.ArrowInvalid(f"the footer claims {length} bytes of a {size}-byte file")
    if length + 8 > len(tail):
        tail = f.read_at(length + 8, size - length - 8)
    raw = tail[-(length + 8):]
    return pq.read_metadata(pa.BufferReader(b"PAR1" + raw)), raw


def input_fingerprint(files: Sequence[InputFile]) -> str:
    """sha256 of every file's relative path, size and footer: changes when any file is added,
    removed or rewritten, but not when the whole input is copied elsewhere (mtimes are ignored)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.relpath):
        h.update(f"{f.relpath}\x1f{f.size}\x1f{f.footer_digest}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------- shards

@dataclass(frozen=True)
class Shard:
    """A unit of work: rows ``[row_offset, row_offset + num_rows)`` of the concatenation of
    ``row_groups`` of the file ``path`` (``row_offset`` is non-zero only for a split row group)."""

    shard_id: str
    path: str
    relpath: str
    row_groups: tuple[int, ...]
    row_offset: int
    num_rows: int
    row_start: int  # index in the file of the shard's first row


def _make_shard(f: InputFile, groups: tuple[int, ...], offset: int, rows: int, split: bool,
                first_row: int) -> Shard:
    """The shard of ``groups`` of ``f``; ``first_row``: the file's rows before ``groups[0]``."""
    start = first_row + offset
    if split:
        key = f"{f.relpath}:rg{groups[0]}:rows{offset}-{offset + rows}"
        label = f"rg{groups[0]}-r{offset}-{offset + rows}"
    else:
        key = f"{f.relpath}:rg{groups[0]}-{groups[-1]}"
        label = f"rg{groups[0]}" if len(groups) == 1 else f"rg{groups[0]}-{groups[-1]}"
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", f.relpath.rsplit("/", 1)[-1].removesuffix(".parquet"))
    stem = stem.lstrip("._-")[:48] or "part"
    shard_id = f"{stem}-{label}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return Shard(shard_id=shard_id, path=f.uri, relpath=f.relpath, row_groups=groups, row_offset=offset,
                 num_rows=rows, row_start=start)


def plan_shards(input_spec: InputSpec, shard_rows: int, files: Sequence[InputFile] | None = None) -> list[Shard]:
    """Cut the input into shards of about ``shard_rows`` rows (Parquet footers only).

    Consecutive row groups of a file are joined while the run stays within ``shard_rows``; a row
    group of up to ``2 * shard_rows`` rows is a shard on its own, a bigger one is split into
    ``ceil(rows / shard_rows)`` near-equal row ranges. Empty row groups are skipped.
    """
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    files = list_input_files(input_spec) if files is None else files
    shards: list[Shard] = []
    for f in files:
        # Rows before each row group, summed once (a sum per shard was quadratic in row groups).
        before = [0, *itertools.accumulate(f.row_group_rows)]
        run: list[int] = []
        run_rows = 0

        def flush() -> None:
            nonlocal run, run_rows
            if run:
                shards.append(_make_shard(f, tuple(run), 0, run_rows, split=False, first_row=before[run[0]]))
            run, run_rows = [], 0

        for g, n in enumerate(f.row_group_rows):
            if n == 0:
                continue
            if n > 2 * shard_rows:
                flush()
                pieces = math.ceil(n / shard_rows)
                offset = 0
                for k in range(pieces):
                    size = n // pieces + (1 if k < n % pieces else 0)
                    shards.append(_make_shard(f, (g,), offset, size, split=True, first_row=before[g]))
                    offset += size
                continue
            if run and run_rows + n > shard_rows:
                flush()
            run.append(g)
            run_rows += n
        flush()
    ids = [s.shard_id for s in shards]
    if len(set(ids)) != len(ids):  # only a sha256 prefix collision could cause this
        raise RuntimeError("shard id collision; please report this input layout")
    return shards


_FOOTERS: dict[tuple[str, int | None, int | None], pq.FileMetaData] = {}


def _footer(uri: str, size: int | None, mtime_ns: int | None, f: pa.NativeFile) -> pq.FileMetaData:
    """The parsed footer of ``uri``, kept for the file's current size and mtime.

    A replica reads a file's shards one after another; without this each read parses the whole
    footer again (about a second for 50,000 row groups). Only the last few files are kept.
    """
    key = (uri, size, mtime_ns)
    if mtime_ns is None:  # no way to tell a rewritten file: parse it every time
        return pq.ParquetFile(f).metadata
    meta = _FOOTERS.get(key)
    if meta is None:
        meta = pq.ParquetFile(f).metadata
        while len(_FOOTERS) >= 4:
            del _FOOTERS[next(iter(_FOOTERS))]
        _FOOTERS[key] = meta
    return meta


def read_shard(shard: Shard, columns: Sequence[str]) -> pa.Table:
    """The shard's rows, only ``columns``, in file order.

    Raises:
        RuntimeError: when the file no longer has the planned rows (it changed after planning).
    """
    fs, path = resolve_filesystem(shard.path)
    info = fs.get_file_info(path)
    with fs.open_input_file(path) as f:
        meta = _footer(shard.path, info.size, info.mtime_ns, f)
        if max(shard.row_groups) >= meta.num_row_groups:
            raise RuntimeError(f"{shard.path} changed since the job was planned: it has {meta.num_row_groups} "
                               f"row groups, the plan reads row groups {shard.row_groups}")
        table = pq.ParquetFile(f, metadata=meta).read_row_groups(list(shard.row_groups), columns=list(columns))
    if table.num_rows < shard.row_offset + shard.num_rows:
        raise RuntimeError(f"{shard.path} changed since the job was planned: row groups {shard.row_groups} "
                           f"have {table.num_rows} rows, expected at least {shard.row_offset + shard.num_rows}")
    return table.slice(shard.row_offset, shard.num_rows)


# --------------------------------------------------------------------------------------- validation

@dataclass(frozen=True)
class InputReport:
    """What :func:`validate_input` found: the files, row count, and the types the output needs."""

    files: tuple[InputFile, ...]
    num_rows: int
    id_type: pa.DataType
    keep_types: dict[str, pa.DataType]
    fingerprint: str


def _column_roles(spec: JobSpec) -> list[tuple[str, str, str]]:
    """``(field_path, column, kind)`` for every column the job reads."""
    inp = spec.input
    roles = [("input.id_column", inp.id_column, "id")]
    if inp.messages_column is not None:
        roles.append(("input.messages_column", inp.messages_column, "messages"))
    elif inp.preset() is not None:
        # A mapped slot is reported at its own field; a default one at the preset's name.
        roles += [(f"input.template_columns.{slot}" if slot in inp.template_columns else "input.template", c, "text")
                  for slot, c in inp.preset_columns().items() if c is not None]
    else:
        text_field = "input.prompt_column" if inp.prompt_column is not None else "input.template"
        roles += [(text_field, c, "text") for c in inp.text_columns()]
    roles += [("input.keep_columns", c, "keep") for c in inp.keep_columns]
    roles += [(f"sampling.overrides.{name}", c, "int" if name in INT_OVERRIDES else "number")
              for name, c in spec.sampling.overrides.items()]
    if spec.classify is not None and spec.classify.choices_column is not None:
        roles.append(("classify.choices_column", spec.classify.choices_column, "choices"))
    if inp.adapter_column is not None:
        roles.append(("input.adapter_column", inp.adapter_column, "text"))
    return roles


def validate_input(spec: JobSpec, files: Sequence[InputFile] | None = None) -> InputReport:
    """Check the input against the spec before any work is scheduled.

    Every needed column must exist in every file with a usable type (the id, keep columns: the
    same type in all files), and ids must be non-null and unique over the whole dataset; only the
    id column is read.

    Raises:
        SpecError: all problems found, e.g. ``input.template: column 'txt' not in data/x.parquet
            (columns: id, text)`` or ``input.id_column: duplicate ids: 'a17' (part-0.parquet,
            part-3.parquet) (1 duplicate)``.
    """
    files = tuple(list_input_files(spec.input) if files is None else files)
    errors: list[tuple[str, str]] = []
    names = [set(f.schema.names) for f in files]  # a list per lookup made 40k keep columns quadratic
    for field_path, column, kind in _column_roles(spec):
        missing = [f for f, has in zip(files, names) if column not in has]
        if missing:
            names = missing[0].schema.names
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            more = f" and {len(missing) - 1} more file(s)" if len(missing) > 1 else ""
            hint = ""
            if field_path == "input.template" and spec.input.preset() is not None:  # a preset's default column
                slot = next(k for k, c in spec.input.preset_columns().items() if c == column)
                hint = (f"; map the preset's {slot!r} slot to a column of yours" if slot in spec.input.preset().required
                        else f"; map the preset's optional {slot!r} slot to a column of yours, or to null")
                hint += " in input.template_columns"
            errors.append((field_path, f"column {column!r} not in {missing[0].uri}{more} (columns: {shown}){hint}"))
            continue
        first = files[0].schema.field(column).type
        problem = column_type_problem(kind, first)
        if problem:
            errors.append((field_path, f"column {column!r} {problem} (in {files[0].uri})"))
            continue
        if kind in ("id", "keep"):  # the output schema holds one type per column
            other = next((f for f in files if f.schema.field(column).type != first), None)
            if other is not None:
                errors.append((field_path, f"column {column!r} is {first} in {files[0].relpath} but "
                                           f"{other.schema.field(column).type} in {other.relpath}"))
    if errors:
        raise SpecError(errors)
    _check_ids(spec.input.id_column, files)
    id_type = files[0].schema.field(spec.input.id_column).type
    keep_types = {c: files[0].schema.field(c).type for c in spec.input.keep_columns}
    return InputReport(files=files, num_rows=sum(f.num_rows for f in files), id_type=id_type,
                       keep_types=keep_types, fingerprint=input_fingerprint(files))


def _check_ids(id_column: str, files: Sequence[InputFile]) -> None:
    tables = []
    for i, f in enumerate(files):
        fs, path = resolve_filesystem(f.uri)
        # ParquetFile reads the row groups in one go; pq.read_table's dataset path costs per row group.
        with fs.open_input_file(path) as fh:
            ids = pq.ParquetFile(fh).read(columns=[id_column]).column(0)
        if ids.null_count:
            rows = pc.indices_nonzero(ids.is_null()).to_pylist()
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            raise SpecError("input.id_column", f"{len(rows)} null id(s) in {f.relpath} (rows {shown})")
        tables.append(pa.table({"id": ids, "file": pa.nulls(len(ids), pa.int32()).fill_null(i)}))
    if not tables:
        return
    # use_threads=False keeps groups in order of first appearance, so the examples are stable.
    groups = pa.concat_tables(tables).group_by("id", use_threads=False).aggregate(
        [("file", "count"), ("file", "distinct")])
    dupes = groups.filter(pc.greater(groups["file_count"], 1))
    if dupes.num_rows == 0:
        return
    examples = []
    for row in dupes.slice(0, 5).to_pylist():
        where = [files[i].relpath for i in sorted(row["file_distinct"])]
        examples.append(f"{row['id']!r} ({', '.join(where)})" if len(where) > 1
                        else f"{row['id']!r} ({row['file_count']} rows in {where[0]})")
    more = ", ..." if dupes.num_rows > 5 else ""
    raise SpecError("input.id_column", f"duplicate ids: {', '.join(examples)}{more} "
                                       f"({dupes.num_rows} duplicate{'s' if dupes.num_rows > 1 else ''})")
