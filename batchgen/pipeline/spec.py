"""The job spec: a YAML (or JSON) file validated by pydantic models.

Every section forbids unknown keys, so a typo (``max_token:``) is an error, not a silently
ignored setting. All problems are reported as a :class:`SpecError` whose lines read
``field.path: what is wrong``.

Relative paths. ``model.path``, ``model.tokenizer``, ``input.path`` and ``output.path`` are kept
exactly as written and are resolved against the *current working directory of the process that
opens them* (see :func:`resolve_path`). That is the directory ``python -m batchgen run`` is started
in and, under ``ray job submit --working-dir .``, the unpacked working dir that the driver and
every replica run in (there a relative ``output.path`` is refused: see
:mod:`batchgen.pipeline.paths`). Keeping them as written also keeps :func:`spec_fingerprint` unchanged when
the same job directory is unpacked at a different place, so a resumed job is not refused. A
driver that ships the spec to processes with another CWD calls :meth:`JobSpec.with_resolved_paths`
first.

This module imports neither ray nor pyarrow: the engine side may use :func:`row_seed`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re

import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from batchgen.limits import MAX_CONTEXT
from batchgen.pipeline.spec_errors import field_errors, model_in, unknown_field_message
from batchgen.pipeline.spec_tasks import LABEL_COLUMNS, ClassifySpec, check_constraint_fields, load_json_schema
from batchgen.prompts import PRESETS, Preset, PromptError, check_no_marker, get_preset, parse_template

#: Output columns written next to the id and keep columns; input columns may not use these names.
RESULT_COLUMNS: tuple[str, ...] = (
    "completion", "finish_reason", "prompt_tokens", "completion_tokens", "error", "logprobs", "token_ids",
    "truncated_tokens",
    *LABEL_COLUMNS,
)
#: Sampling fields that a row may override from one of its (numeric) columns.
OVERRIDABLE = ("max_tokens", "temperature", "top_p", "top_k", "seed")
OverrideName = Literal["max_tokens", "temperature", "top_p", "top_k", "seed"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: ``input.template`` that is a bare name (no braces, no spaces) names a preset, not a template.
_PRESET_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")


class SpecError(Exception):
    """A job spec (or its input/output) is invalid; ``errors`` holds ``(field_path, message)`` pairs."""

    def __init__(self, errors: Sequence[tuple[str, str]] | str, message: str | None = None,
                 source: str | None = None) -> None:
        # SpecError("input.path", "no such file") is the common single-error form.
        if isinstance(errors, str):
            errors = [(errors, message or "")]
        self.errors: list[tuple[str, str]] = list(errors)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"{path}: {msg}" if path else msg for path, msg in self.errors]
        if self.source:
            return f"invalid job spec {self.source}:\n" + "\n".join("  " + line for line in lines)
        return "\n".join(lines)


def _field_error(field: str, message: str) -> PydanticCustomError:
    """A model-level validation error that points at ``field`` (relative to the model) instead of
    at the model itself; :func:`_convert` appends the field to the error location."""
    # The message travels in the context, never in the template, so braces in it are not formatted.
    return PydanticCustomError("batchgen_field", "{message}", {"batchgen_field": field, "message": message})


# --------------------------------------------------------------------------------------- models

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Section):
    """Which checkpoint to run and how the engine holds it."""

    path: str = Field(min_length=1, description="Meta (params.json) or HF (config.json) layout dir")
    tokenizer: str | None = Field(None, description="tokenizer.model; default: found next to the checkpoint")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tensor_parallel: int = Field(1, ge=1)
    max_seq_len: int | None = Field(None, ge=1, le=MAX_CONTEXT,
                                    description="context length; default: from the checkpoint. At most the "
                                                "checkpoint's own context (max_position_embeddings; 4096 for a "
                                                "Meta params.json, which records none) unless allow_longer_context")
    allow_longer_context: bool = Field(False, description="let max_seq_len exceed the checkpoint's own context "
                                                          "(positions it was never trained on), up to 2**20")
    kv_cache_memory_gb: float | None = Field(None, gt=0, allow_inf_nan=False,
                                             description="KV cache budget per GPU (per replica on a CPU) in GiB (2**30 "
                                                         "bytes); default: 90% of free GPU memory, 2 GiB on a CPU")
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    cuda_graphs: bool = Field(True, description="replay decode steps from CUDA graphs on a single-GPU replica; "
                                                "false runs every step eagerly")
    prefix_caching: bool = Field(True, description="share the KV blocks of prompt prefixes between rows (a "
                                                   "template's instructions are prefilled once); false "
                                                   "prefills every row in full")
    compile_decode: bool = Field(False, description="compile the replayed decode steps with torch.compile: "
                                                    "faster steps on a GPU for a minute or more of compiling "
                                                    "per replica; no effect where nothing replays")
    attention_backend: Literal["default", "flex"] = Field(
        "default", description="attention over the paged KV cache: default (SDPA; replayed GPU decode steps gather "
                               "each row's blocks, up to 128 MiB a layer) or flex (FlexAttention reads the blocks in "
                               "place, replayed steps included; compiled per batch bucket with torch.compile)")
    adapters: dict[str, str] = Field(default_factory=dict,
                                     description="LoRA adapters: name -> PEFT adapter directory (local, s3:// or "
                                                 "gs://); rows pick one by input.adapter_column, or with one "
                                                 "adapter and no column every row runs it, merged at load")

    @field_validator("adapters")
    @classmethod
    def _check_adapters(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not _NAME_RE.match(name):
                raise ValueError(f"adapter name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit")
            if not path:
                raise ValueError(f"adapter {name!r}: the path is empty")
        return value


class InputSpec(_Section):
    """Where the rows are and how a row becomes a prompt.

    A row's prompt comes from exactly one of ``prompt_column`` (the cell as is), ``template`` (a
    ``{column}`` template, or the name of a preset in :data:`batchgen.prompts.PRESETS` whose slots
    ``template_columns`` may map to other columns) or ``messages_column`` (a conversation, rendered
    in the Llama-2-chat format). ``chat: true`` wraps a text prompt as one Llama-2-chat user turn
    (with ``system`` as its system message). In every chat mode a cell holding ``[INST]``,
    ``[/INST]``, ``<<SYS>>`` or ``<</SYS>>`` becomes an error row.
    """

    path: str = Field(min_length=1)
    id_column: str = Field(min_length=1)
    prompt_column: str | None = Field(None, min_length=1)
    template: str | None = Field(None, description="a template with {column} placeholders, or a preset name: "
                                                   + ", ".join(PRESETS))
    template_columns: dict[str, str | None] = Field(
        default_factory=dict, description="a preset's slot -> the column that fills it (null: leave it unused)")
    messages_column: str | None = Field(None, min_length=1, description="list<struct<role, content>> column")
    chat: bool = False
    system: str | None = None
    keep_columns: list[str] = Field(default_factory=list)
    truncate_prompt: bool = False
    adapter_column: str | None = Field(None, min_length=1, description="each row's LoRA adapter name (one of "
                                                                       "model.adapters); null or '' = the base model")

    @field_validator("template")
    @classmethod
    def _check_template(cls, value: str | None) -> str | None:
        if value is not None and _PRESET_NAME_RE.match(value):
            get_preset(value)  # a bare name is a preset: an unknown one lists the known ones
        elif value is not None:
            parse_template(value)
        return value

    @field_validator("keep_columns")
    @classmethod
    def _check_keep(cls, value: list[str]) -> list[str]:
        from collections import Counter  # here, so that this fix stays inside the validator

        # One counting pass: list.count per column was O(n^2) (40k columns took 35 s).
        dupes = sorted(c for c, n in Counter(value).items() if n > 1)
        if dupes:
            raise ValueError(f"listed more than once: {', '.join(map(repr, dupes))}")
        reserved = [c for c in value if c in RESULT_COLUMNS]
        if reserved:
            raise ValueError(f"{', '.join(map(repr, reserved))} would clash with an output column "
                             f"({', '.join(RESULT_COLUMNS)})")
        return value

    @model_validator(mode="after")
    def _check_prompt_source(self) -> "InputSpec":
        sources = [name for name in ("prompt_column", "template", "messages_column") if getattr(self, name) is not None]
        if len(sources) != 1:
            got = " and ".join(sources) + " are set" if sources else "none is set"
            raise _field_error("prompt_column",
                               f"set exactly one of prompt_column, template or messages_column ({got})")
        preset = self.preset()
        if self.template_columns and preset is None:
            raise _field_error("template_columns", "only a template preset (" + ", ".join(PRESETS)
                                                   + ") takes template_columns")
        if preset is not None:
            for slot, column in self.template_columns.items():
                if slot not in preset.columns:
                    raise _field_error(f"template_columns.{slot}", f"preset {preset.name!r} has no slot {slot!r} "
                                                                   f"(its slots: {', '.join(preset.columns)})")
                if column is None and slot in preset.required:
                    raise _field_error(f"template_columns.{slot}", f"preset {preset.name!r} needs its {slot!r} column")
                if column is not None and not column:
                    raise _field_error(f"template_columns.{slot}", "column name is empty")
        if self.system is not None:
            if self.messages_column is not None:
                raise _field_error("system", "a conversation carries its own system message; input.system does "
                                             "not apply to messages_column")
            if not self.is_chat:
                raise _field_error("system", "a system prompt needs chat: true (or the llama-2-chat preset)")
            if not self.system.strip():
                raise _field_error("system", "is empty; leave it out for no system message")
            try:
                check_no_marker(self.system, "the system prompt")
            except PromptError as exc:
                raise _field_error("system", str(exc)) from None
        if self.is_chat and self.template is not None and preset is None:
            literal = "".join(text for text, _ in self.template_parts())
            try:
                check_no_marker(literal, "the template's text")
            except PromptError as exc:
                raise _field_error("template", f"{exc}; chat: true adds the chat format itself") from None
        if self.id_column in RESULT_COLUMNS:
            raise _field_error("id_column", f"{self.id_column!r} would clash with an output column")
        if self.id_column in self.keep_columns:
            raise _field_error("keep_columns", f"the id column {self.id_column!r} is always kept; "
                                               "do not list it")
        return self

    def preset(self) -> Preset | None:
        """The template preset named by ``template``, or None (a ``{column}`` template, or no template)."""
        if self.template is not None and _PRESET_NAME_RE.match(self.template):
            return get_preset(self.template)
        return None

    def preset_columns(self) -> dict[str, str | None]:
        """The preset's slots and the column filling each (None: unused); empty without a preset."""
        preset = self.preset()
        return {} if preset is None else {**preset.columns, **self.template_columns}

    @property
    def is_chat(self) -> bool:
        """Whether prompts are Llama-2-chat conversations (chat: true, a chat preset or messages_column)."""
        preset = self.preset()
        return self.chat or self.messages_column is not None or (preset is not None and preset.chat)

    def template_parts(self) -> list[tuple[str, str | None]]:
        """The parsed template (see :func:`parse_template`); empty for a preset or without a template."""
        return parse_template(self.template) if self.template is not None and self.preset() is None else []

    def text_columns(self) -> list[str]:
        """Columns whose cells end up in the prompt, in order of first use (the messages column too)."""
        if self.prompt_column is not None:
            return [self.prompt_column]
        if self.messages_column is not None:
            return [self.messages_column]
        if self.preset() is not None:
            return list(dict.fromkeys(c for c in self.preset_columns().values() if c is not None))
        return list(dict.fromkeys(f for _, f in self.template_parts() if f))


class SamplingSpec(_Section):
    """How tokens are drawn; every row's draws derive from ``(seed, row id)``."""

    max_tokens: int = Field(128, gt=0)
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    seed: int = Field(0, ge=0, lt=2**63)
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    overrides: dict[OverrideName, Annotated[str, Field(min_length=1)]] = Field(
        default_factory=dict, description="sampling field -> numeric input column with per-row values")
    # Structured output (one at most): see batchgen.pipeline.spec_tasks and the README.
    json_schema: dict[str, Any] | None = Field(None, description="a JSON schema (inline, or a path to a .json file)")
    regex: str | None = Field(None, min_length=1, description="a regex every completion matches as a whole")
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1,
                                                                      description="the completion is one of these")

    @field_validator("json_schema", mode="before")
    @classmethod
    def _load_schema(cls, value: Any) -> Any:
        return load_json_schema(value)

    @model_validator(mode="after")
    def _check_constraint(self) -> "SamplingSpec":
        check_constraint_fields(self)
        return self

    def constraint(self) -> tuple[str, Any] | None:
        """The (kind, value) of the structured-output constraint, if any."""
        return next(((f, getattr(self, f)) for f in ("json_schema", "regex", "choice")
                     if getattr(self, f) is not None), None)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        # `stop: "\n"` is the natural way to write a single stop string.
        return [value] if isinstance(value, str) else value


class OutputSpec(_Section):
    """Where results go and what to do with earlier results there."""

    path: str = Field(min_length=1)
    mode: Literal["resume", "overwrite", "error_if_exists"] = "resume"
    token_ids: bool = Field(False, description="also write each completion's token ids (column token_ids)")


class ExecutionSpec(_Section):
    """How the work is spread over replicas; none of this changes the results."""

    replicas: int | Literal["auto"] = "auto"
    shard_rows: int = Field(1000, ge=1)
    max_attempts: int = Field(3, ge=1)
    lease_timeout_s: float = Field(600.0, gt=0, allow_inf_nan=False)
    heartbeat_s: float = Field(10.0, gt=0, allow_inf_nan=False)

    @field_validator("replicas", mode="before")
    @classmethod
    def _check_replicas(cls, value: Any) -> Any:
        # A plain union would report one confusing error per member; say it once.
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be 'auto' or an integer >= 1, got {value!r}")

    @model_validator(mode="after")
    def _check_heartbeat(self) -> "ExecutionSpec":
        if self.heartbeat_s >= self.lease_timeout_s:
            raise _field_error("heartbeat_s", f"must be less than lease_timeout_s ({self.lease_timeout_s:g}), "
                                              "or every lease would expire between heartbeats")
        return self


class JobSpec(_Section):
    """A whole job: ``name``, ``model``, ``input``, ``sampling``, ``output``, ``execution``."""

    name: str = "job"
    model: ModelSpec
    input: InputSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    output: OutputSpec
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    classify: ClassifySpec | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _check_adapter_column(self) -> "JobSpec":
        col = self.input.adapter_column
        if col is not None and not self.model.adapters:
            raise _field_error("input.adapter_column", "names adapters, but model.adapters lists none")
        if col is not None and col == self.input.id_column:
            raise _field_error("input.adapter_column", f"{col!r} is the id column")
        return self

    @model_validator(mode="after")
    def _check_overrides(self) -> "JobSpec":
        for name, column in self.sampling.overrides.items():
            if column == self.input.id_column:
                raise _field_error(f"sampling.overrides.{name}", f"{column!r} is the id column")
        if self.classify is not None and self.sampling.constraint() is not None:
            raise _field_error("classify", f"a classify job scores its choices; sampling.{self.sampling.constraint()[0]} "
                                           "(structured output) does not apply")
        return self

    def input_columns(self) -> list[str]:
        """Every input column a shard needs: id, prompt text, keep and override columns (no repeats)."""
        cols = [self.input.id_column, *self.input.text_columns(), *self.input.keep_columns,
                *self.sampling.overrides.values(), *([self.input.adapter_column] if self.input.adapter_column else [])]
        if self.classify is not None and self.classify.choices_column is not None:
            cols.append(self.classify.choices_column)
        return list(dict.fromkeys(cols))

    def with_resolved_paths(self, base: str | os.PathLike[str] | None = None) -> "JobSpec":
        """A copy whose relative local paths are absolute (against ``base`` or the CWD)."""
        model = self.model.model_copy(update={
            "path": resolve_path(self.model.path, base),
            "tokenizer": None if self.model.tokenizer is None else resolve_path(self.model.tokenizer, base),
            "adapters": {name: resolve_path(p, base) for name, p in self.model.adapters.items()},
        })
        return self.model_copy(update={
            "model": model,
            "input": self.input.model_copy(update={"path": resolve_path(self.input.path, base)}),
            "output": self.output.model_copy(update={"path": resolve_path(self.output.path, base)}),
        })


# --------------------------------------------------------------------------------------- helpers

def is_uri(path: str) -> bool:
    """True for ``scheme://...`` paths (s3, gs, file, ...), which are never made relative to the CWD."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def resolve_path(path: str, base: str | os.PathLike[str] | None = None) -> str:
    """``path`` with ``~`` expanded and, if local and relative, joined to ``base`` (default: the CWD).

    URIs are returned unchanged. A trailing slash is kept, since for ``input.path`` it is harmless
    and for globs it is part of the pattern.
    """
    if is_uri(path):
        return path
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return expanded
    return os.path.join(os.fspath(base) if base is not None else os.getcwd(), expanded)


def row_seed(seed: int, row_id: int | str) -> int:
    """The seed of one row's random draws: a stable 63-bit hash of ``(seed, row id)``.

    Independent of batching, replica and attempt, so a retried shard samples the same tokens.
    Integer and string ids hash differently (``5`` vs ``"5"``).
    """
    tag = "i" if isinstance(row_id, int) else "s"
    digest = hashlib.sha256(f"{seed}\x1f{tag}\x1f{row_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


_SAMPLING_ADAPTERS: dict[str, TypeAdapter] = {
    name: TypeAdapter(Annotated[SamplingSpec.model_fields[name].annotation,
                                *SamplingSpec.model_fields[name].metadata])
    for name in OVERRIDABLE
}


def check_sampling_value(name: str, value: Any) -> int | float:
    """Validate one per-row override value with the same bounds as the spec field ``name``.

    Raises:
        ValueError: naming the field and what is wrong (e.g. ``max_tokens: Input should be greater than 0``).
    """
    try:
        return _SAMPLING_ADAPTERS[name].validate_python(value)
    except ValidationError as exc:
        raise ValueError(f"{name}={value!r}: {exc.errors()[0]['msg']}") from None


def result_fields(spec: JobSpec) -> dict[str, Any]:
    """The spec fields that change what a job produces (model identity, input, sampling, output
    columns).

    Values equal to their defaults are left out, so writing a default explicitly, or a new field
    with a default in a later version, does not change the fingerprint.
    """
    return {
        "model": spec.model.model_dump(include={"path", "tokenizer", "dtype", "max_seq_len"},
                                       exclude_defaults=True),
        "input": spec.input.model_dump(exclude_defaults=True),
        "sampling": spec.sampling.model_dump(exclude_defaults=True),
        # Output columns change what a shard file holds; added only when set, so that specs
        # written before the field existed keep their fingerprint.
        **({"output": {"token_ids": True}} if spec.output.token_ids else {}),
        **({"classify": spec.classify.model_dump(exclude_defaults=True)} if spec.classify is not None else {}),
    }


def spec_fingerprint(spec: JobSpec) -> str:
    """sha256 (hex) of the canonical JSON of :func:`result_fields` (not name, output path/mode, execution)."""
    payload = {"v": 1, **result_fields(spec)}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------------------- loading

def _convert(exc: ValidationError, source: str | None = None) -> SpecError:
    """Turn a pydantic ``ValidationError`` into a :class:`SpecError` with dotted field paths."""
    return SpecError(field_errors(exc, JobSpec), source=source)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set key.sub=value`` to the raw spec dict (value parsed by ``yaml.safe_load``).

    The key path must name a field of the spec (free-form keys are allowed only inside
    ``sampling.overrides``); anything else is a :class:`SpecError`.
    """
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError("--set", f"expected key.path=value, got {assignment!r}")
    parts = key.split(".")
    model: type[BaseModel] | None = JobSpec
    node = data
    for i, part in enumerate(parts):
        prefix = ".".join(parts[: i + 1])
        if model is None:  # inside a free-form dict: any key is fine, pydantic checks the values
            field_model = None
        elif part not in model.model_fields:
            raise SpecError(prefix, f"{unknown_field_message(model, part)} (in --set {assignment})")
        else:
            field_model = model_in(model.model_fields[part].annotation)
        if i == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise SpecError(key, f"cannot parse --set value {raw!r}: {exc}") from None
            return
        is_dict_field = model is not None and typing.get_origin(model.model_fields[part].annotation) is dict
        if field_model is None and not is_dict_field:
            raise SpecError(prefix, f"is a value, not a section (in --set {assignment})")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(prefix, f"is {type(child).__name__} in the spec file, not a section")
        node, model = child, field_model


def _parse_text(text: str, path: Path) -> Any:
    try:
        if path.suffix.lower() == ".json" or (path.suffix.lower() not in (".yaml", ".yml")
                                              and text.lstrip().startswith("{")):
            return json.loads(text)
        stream = io.StringIO(text)
        stream.name = str(path)  # PyYAML names the stream in its errors ("<unicode string>" otherwise)
        return yaml.safe_load(stream)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError("", f"cannot parse {path}: {exc}") from None
    except RecursionError:
        # Both parsers recurse once per level: a hostile file (10**5 nested brackets) would end
        # in a traceback. No real spec nests more than a few levels.
        raise SpecError("", f"cannot parse {path}: nested too deeply (a spec is a few levels of "
                            "sections)") from None


def load_spec(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> JobSpec:
    """Read, override and validate a job spec file.

    ``overrides`` are ``key.path=value`` strings (the CLI's ``--set``), applied before validation.
    ``name`` defaults to the file name without its extension.

    Raises:
        SpecError: listing every problem as ``field.path: message``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError("", f"cannot read job spec {path}: {exc}") from None
    data = _parse_text(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError("", f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for assignment in overrides:
        try:
            apply_override(data, assignment)
        except RecursionError:  # a --set value as deeply nested as the file case above
            raise SpecError("--set", f"value nested too deeply (in --set {assignment[:60]}...)") from None
    if "name" not in data:
        data["name"] = re.sub(r"[^A-Za-z0-9._-]", "-", path.stem).lstrip("._-") or "job"
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _convert(exc, source=str(path)) from None
    except RecursionError:  # parsed, but deeper than validation can walk
        raise SpecError("", f"{path}: nested too deeply (a spec is a few levels of sections)") from None


def validate_spec(data: dict[str, Any], source: str | None = None) -> JobSpec:
    """Validate an already-parsed spec dict, raising :class:`SpecError` instead of pydantic's error."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _convert(exc, source=source) from None
