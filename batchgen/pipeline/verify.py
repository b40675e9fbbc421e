"""``batchgen verify``: check that a job's output holds every input row exactly once.

    batchgen verify job.yaml [--set key=value]
    batchgen verify --input PATH --id-column COLUMN --output OUT

Reads only the input's id column and the output's id, ``finish_reason`` and ``error`` columns
(``shards/*.parquet``, exactly what a reader of the output sees), then reports, with counts and
a few examples:

- missing rows: input ids with no output row;
- duplicated rows: ids with more than one output row;
- unexpected rows: output ids that are not in the input;
- error rows (``finish_reason: error``) grouped by reason, and error rows without a reason;
- whether ``_SUCCESS`` exists and, if so, whether ``summary.parquet`` agrees with the rows.

Exit status: 0 when the output is complete and duplicate-free (error rows are a valid outcome
of a row and do not fail it); 1 when rows are missing, duplicated or unexpected, an error row
has no reason, or the summary disagrees; 2 when the arguments, spec or data cannot be used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchgen.pipeline import writer
from batchgen.pipeline.shards import list_input_files
from batchgen.pipeline.spec import InputSpec, SpecError, load_spec
from batchgen.pipeline.storage import resolve_filesystem, with_retries


@dataclass
class VerifyReport:
    """What :func:`verify_output` found. ``*_examples`` hold up to ``examples`` ids (or pairs)."""

    input_path: str
    output_path: str
    input_rows: int
    output_rows: int
    output_files: int
    missing: int
    duplicated_ids: int
    duplicate_rows: int  # output rows beyond the first of each duplicated id
    unexpected: int
    error_rows: int
    errors_without_reason: int
    success_file: bool
    summary_rows: Optional[int] = None  # summary.parquet's row total, when _SUCCESS exists
    summary_errors: Optional[int] = None
    missing_examples: list[Any] = field(default_factory=list)
    duplicate_examples: list[tuple[Any, int]] = field(default_factory=list)
    unexpected_examples: list[Any] = field(default_factory=list)
    error_reasons: list[tuple[str, int]] = field(default_factory=list)
    error_examples: list[tuple[Any, str]] = field(default_factory=list)

    @property
    def summary_agrees(self) -> bool:
        """False only when a finished job's summary.parquet disagrees with the rows found."""
        if self.summary_rows is None:
            return True
        return self.summary_rows == self.output_rows and self.summary_errors == self.error_rows

    @property
    def ok(self) -> bool:
        """Complete, duplicate-free, every error row with a reason, summary consistent."""
        return (self.missing == 0 and self.duplicate_rows == 0 and self.unexpected == 0
                and self.errors_without_reason == 0 and self.summary_agrees)


def _reason(error: str) -> str:
    """The kind of an error message: its text before the first colon (``prompt_too_long``,
    ``failed 3 attempts``, ``column 'prompt' is null``), so similar rows group together."""
    return error.split(":", 1)[0].strip()[:80] or "(blank)"


def _read_input_ids(input_path: str, id_column: str) -> pa.ChunkedArray:
    # list_input_files reads only `path`; the spec's other (required) fields do not matter here.
    files = list_input_files(InputSpec.model_construct(path=input_path, id_column=id_column))
    chunks = []
    for f in files:
        fs, path = resolve_filesystem(f.uri)
        if id_column not in f.schema.names:
            raise SpecError("input.id_column", f"column {id_column!r} not in {f.uri}")
        table = with_retries(fs, f"reading {f.uri}",
                                    lambda: pq.read_table(path, columns=[id_column], filesystem=fs))
        chunks += table.column(0).chunks
    return pa.chunked_array(chunks, type=files[0].schema.field(id_column).type)


def _read_output(output_path: str, id_column: str) -> tuple[pa.Table, int, pafs.FileSystem, str]:
    fs, root = resolve_filesystem(output_path)
    ids = sorted(writer.committed_shards(fs, root))
    paths = [f"{root}/{writer.SHARDS_DIR}/{shard_id}.parquet" for shard_id in ids]
    columns = [id_column, "finish_reason", "error"]
    if not paths:
        return pa.table({c: pa.array([], pa.string()) for c in columns}), 0, fs, root
    dataset = ds.dataset(paths, filesystem=fs, format="parquet")
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise SpecError("output.path", f"{output_path}: shard files lack column(s) {missing} "
                                       "(not a batchgen output, or another id column)")
    table = with_retries(fs, f"reading {output_path}", lambda: dataset.to_table(columns=columns))
    return table, len(paths), fs, root


def verify_output(input_path: str, id_column: str, output_path: str, examples: int = 5) -> VerifyReport:
    """Compare the input's ids with the output's rows (see the module doc).

    Raises:
        SpecError: the input or output cannot be read as such (no files, no id column).
        OSError: storage errors that outlast the retries.
    """
    in_ids = _read_input_ids(input_path, id_column)
    out, files, fs, root = _read_output(output_path, id_column)
    out_ids = out.column(id_column)
    if out_ids.type != in_ids.type:
        out_ids = out_ids.cast(in_ids.type)

    counts = pa.table({"id": out_ids}).group_by("id", use_threads=False).aggregate([("id", "count")])
    dupes = counts.filter(pc.greater(counts["id_count"], 1))
    unique_out = counts["id"].combine_chunks()
    missing = in_ids.filter(pc.invert(pc.is_in(in_ids, value_set=unique_out)))
    unexpected = unique_out.filter(pc.invert(pc.is_in(unique_out, value_set=in_ids.combine_chunks())))

    is_error = pc.fill_null(pc.equal(out.column("finish_reason"), "error"), False)
    errors = out.filter(is_error)
    texts = errors.column("error").to_pylist()
    without_reason = sum(1 for t in texts if not t or not t.strip())
    reasons = Counter(_reason(t) for t in texts if t and t.strip())
    error_ids = errors.column(id_column).to_pylist()

    report = VerifyReport(
        input_path=input_path, output_path=output_path, input_rows=len(in_ids), output_rows=out.num_rows,
        output_files=files, missing=len(missing), duplicated_ids=dupes.num_rows,
        duplicate_rows=int(pc.sum(dupes["id_count"]).as_py() or 0) - dupes.num_rows, unexpected=len(unexpected),
        error_rows=errors.num_rows, errors_without_reason=without_reason,
        success_file=fs.get_file_info(f"{root}/{writer.SUCCESS}").type == pafs.FileType.File,
        missing_examples=missing.slice(0, examples).to_pylist(),
        duplicate_examples=list(zip(dupes["id"].slice(0, examples).to_pylist(),
                                    dupes["id_count"].slice(0, examples).to_pylist())),
        unexpected_examples=unexpected.slice(0, examples).to_pylist(),
        error_reasons=reasons.most_common(10),
        error_examples=list(zip(error_ids, texts))[:examples],
    )
    if report.success_file:
        summary_path = f"{root}/{writer.SUMMARY}"
        if fs.get_file_info(summary_path).type == pafs.FileType.File:
            summary = with_retries(fs, f"reading {summary_path}",
                                          lambda: pq.read_table(summary_path, filesystem=fs))
            report.summary_rows = int(pc.sum(summary["rows"]).as_py() or 0)
            report.summary_errors = int(pc.sum(summary["rows_error"]).as_py() or 0)
    return report


def format_report(r: VerifyReport) -> str:
    """The report as the lines ``batchgen verify`` prints."""
    lines = [
        f"input:      {r.input_rows} rows ({r.input_path})",
        f"output:     {r.output_rows} rows in {r.output_files} shard file(s) ({r.output_path}); "
        f"_SUCCESS {'present' if r.success_file else 'absent (job not finished)'}",
        f"missing:    {r.missing}" + (f"  e.g. {r.missing_examples}" if r.missing else ""),
        f"duplicated: {r.duplicate_rows} extra row(s) of {r.duplicated_ids} id(s)"
        + (f"  e.g. {[f'{i!r} x{n}' for i, n in r.duplicate_examples]}" if r.duplicated_ids else ""),
        f"unexpected: {r.unexpected}" + (f"  e.g. {r.unexpected_examples}" if r.unexpected else ""),
        f"errors:     {r.error_rows} row(s) with finish_reason=error"
        + (f", {r.errors_without_reason} WITHOUT a reason" if r.errors_without_reason else ""),
    ]
    lines += [f"  {n:>8}  {reason}" for reason, n in r.error_reasons]
    lines += [f"  e.g. id {i!r}: {text}" for i, text in r.error_examples]
    if r.summary_rows is not None:
        agree = "agrees" if r.summary_agrees else "DISAGREES"
        lines.append(f"summary:    {r.summary_rows} rows, {r.summary_errors} errors in summary.parquet ({agree})")
    lines.append("verdict:    " + ("OK: every input row appears exactly once" if r.ok else "FAILED"))
    return "\n".join(lines)


def add_verify_args(parser: argparse.ArgumentParser) -> None:
    """The ``verify`` command's arguments (a job spec, or --input/--id-column/--output)."""
    parser.add_argument("spec", nargs="?", help="job spec (YAML/JSON) whose input and output to compare")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE",
                        help="override a spec field (repeatable)")
    parser.add_argument("--input", help="input Parquet file, directory or glob (instead of, or over, the spec's)")
    parser.add_argument("--id-column", help="the input's id column")
    parser.add_argument("--output", help="the job's output.path")
    parser.add_argument("--examples", type=int, default=5, help="ids shown per problem (default 5)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_verify(args: argparse.Namespace) -> int:
    """Run ``verify`` with parsed ``args``; returns the exit status (see the module doc)."""
    input_path, id_column, output_path = args.input, args.id_column, args.output
    try:
        if args.spec:
            spec = load_spec(args.spec, args.set)
            input_path = input_path or spec.input.path
            id_column = id_column or spec.input.id_column
            output_path = output_path or spec.output.path
        if not (input_path and id_column and output_path):
            print("error: give a job spec, or all of --input, --id-column and --output", file=sys.stderr)
            return 2
        report = verify_output(input_path, id_column, output_path, examples=max(0, args.examples))
    except (SpecError, OSError, pa.ArrowException) as exc:
        print(f"error: cannot verify: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2, default=str))
    else:
        print(format_report(report))
    return 0 if report.ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m batchgen.pipeline.verify ...``: the same as ``batchgen verify``."""
    parser = argparse.ArgumentParser(prog="batchgen verify", description=__doc__.splitlines()[0])
    add_verify_args(parser)
    return run_verify(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
