"""Before a run: check the model, fingerprint it, check the input, plan shards, prepare the output.

Everything here reads files only (configs, Parquet footers, weight-file headers and a few sampled
byte ranges); nothing starts Ray or loads a model. ``batchgen validate`` and ``batchgen run`` go
through the same checks, so validate refuses what run would.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from batchgen.pipeline import writer
from batchgen.pipeline.provenance import model_fingerprint
from batchgen.pipeline.shards import (
    InputReport, Shard, list_input_files, plan_shards, validate_input,
)
from batchgen.pipeline.spec import JobSpec, SpecError, is_uri, spec_fingerprint
from batchgen.pipeline.storage import resolve_filesystem

log = logging.getLogger("batchgen")


@dataclass
class JobPlan:
    """What a run has to do: all shards of the input, and those not yet committed."""

    shards: list[Shard]
    todo: list[Shard]
    input_fp: str
    spec_fp: str
    rows_total: int
    dead: dict[str, list[str]] = field(default_factory=dict)
    report: Optional[InputReport] = None
    model_fp: Optional[dict] = None  # provenance.model_fingerprint; None where the model is not here


def check_model(spec: JobSpec) -> None:
    """Check that ``model.path`` is a checkpoint directory whose weight files hold every tensor
    its config needs, in the right shape, and that a tokenizer exists (prompts are text),
    reading config files and weight-file headers only.

    Raises:
        SpecError: ``model.path: ...`` or ``model.tokenizer: ...``.
    """
    from batchgen.checkpoint import CheckpointError, detect_layout, load_args, recorded_context
    from batchgen.pipeline.limits import check_context
    from batchgen.pipeline.modelcheck import check_weights
    from batchgen.tokenizer import TOKENIZER_FILE

    path = spec.model.path
    if is_uri(path) and not path.startswith("file://"):
        raise SpecError("model.path", f"{path}: the model must be a local directory on every replica's node")
    path = path.removeprefix("file://")
    try:
        args = load_args(path)
        layout = detect_layout(path)
        recorded = recorded_context(path)
    except CheckpointError as exc:
        raise SpecError("model.path", str(exc)) from None
    check_context(spec.model, recorded)  # before any replica allocates RoPE tables that long
    check_weights(path, args, layout)  # headers only: a checkpoint that would fail to load is refused now
    if spec.model.adapters:
        from batchgen.pipeline.adapters import check_adapters

        check_adapters(spec, args)  # adapters are small: each is loaded and checked against the model
    if spec.model.tokenizer is not None:
        if not Path(spec.model.tokenizer).is_file():
            raise SpecError("model.tokenizer", f"no such file: {spec.model.tokenizer}")
    elif not (Path(path) / TOKENIZER_FILE).is_file():
        raise SpecError("model.tokenizer", f"no {TOKENIZER_FILE} in {path}, and prompts are text: "
                                           "set model.tokenizer to the tokenizer's file")


def plan_job(spec: JobSpec, model_check: bool = True) -> JobPlan:
    """Check the model and input, plan shards and prepare the output directory (no Ray, no
    model load). Nothing is written before every check has passed.

    With ``model_check`` the model is also fingerprinted (:mod:`provenance`), so that a resume
    with other weights under the same path is refused; without it (the model is not on this
    node) the fingerprint is not recorded."""
    model_fp = None
    if model_check:
        check_model(spec)
        model_fp = fingerprint_model(spec)
    else:
        log.warning("model.path %s is not on the driver's node: the model fingerprint is not recorded, and a "
                    "resume cannot check that the weights are unchanged", spec.model.path)
    files = list_input_files(spec.input)
    report = validate_input(spec, files)
    shards = plan_shards(spec.input, spec.execution.shard_rows, files)
    committed = writer.prepare_output(spec, shards, report.fingerprint, model_fp)
    todo = [s for s in shards if s.shard_id not in committed]
    if todo:  # pieces of shards that an earlier run split but never merged are redone
        fs, root = resolve_filesystem(spec.output.path)
        writer.discard_parts(fs, root)
    return JobPlan(shards, todo, report.fingerprint, spec_fingerprint(spec), sum(s.num_rows for s in shards),
                   report=report, model_fp=model_fp)


def fingerprint_model(spec: JobSpec) -> dict:
    """The model's fingerprint (:func:`provenance.model_fingerprint`) for a local ``model.path``.

    Raises:
        SpecError: a model file cannot be read.
    """
    from batchgen.pipeline.adapters import local_adapters

    path = spec.model.path.removeprefix("file://")
    adapters = list(local_adapters(spec).values())  # the job's adapters are part of its model
    try:
        return model_fingerprint(path, spec.model.tokenizer, adapters=adapters)
    except OSError as exc:
        raise SpecError("model.path", f"cannot fingerprint {path}: {exc}") from None


def check_job(spec: JobSpec) -> tuple[JobPlan, Optional[set[str]]]:
    """Every check :func:`plan_job` makes, writing nothing (``batchgen validate``): the model
    directory (when it is on this node), the input, and whether ``output.mode`` can be applied
    (a resume's spec, input and model fingerprints). Returns the plan and the shards a resume
    would keep (None: nothing to resume).

    Raises:
        SpecError: what :func:`plan_job` would refuse.
    """
    model_fp = None
    if not is_uri(spec.model.path) or spec.model.path.startswith("file://"):
        if Path(spec.model.path.removeprefix("file://")).exists() or not _on_cluster():
            check_model(spec)
            model_fp = fingerprint_model(spec)
    else:
        check_model(spec)  # refuses the URI
    files = list_input_files(spec.input)
    report = validate_input(spec, files)
    shards = plan_shards(spec.input, spec.execution.shard_rows, files)
    committed = writer.check_output(spec, shards, report.fingerprint, model_fp)
    todo = [s for s in shards if s.shard_id not in (committed or set())]
    return JobPlan(shards, todo, report.fingerprint, spec_fingerprint(spec), sum(s.num_rows for s in shards),
                   report=report, model_fp=model_fp), committed


def _on_cluster() -> bool:
    # As run_job decides: on a cluster the model may live on the GPU nodes only.
    return bool(os.environ.get("RAY_ADDRESS"))
