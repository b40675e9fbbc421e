"""The spec's classification section and structured-output fields (a part of :mod:`batchgen.pipeline.spec`).

``classify`` scores choices instead of generating (see ``batchgen.engine.scoring`` for the
definition); ``sampling.json_schema`` / ``sampling.regex`` / ``sampling.choice`` constrain what is
generated (``batchgen.engine.constraints``). A constraint the grammar engine cannot compile is
refused here, at ``validate``, without loading a tokenizer.

Imports neither ray nor pyarrow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

#: Output columns of a classify job (beside the usual ones).
LABEL_COLUMNS: tuple[str, ...] = ("label", "label_logprobs", "label_probs")
CONSTRAINT_FIELDS: tuple[str, ...] = ("json_schema", "regex", "choice")


def _error(field: str, message: str) -> PydanticCustomError:
    # The same shape as spec._field_error: reported as ``<section>.<field>: message``.
    return PydanticCustomError("batchgen_field", "{message}", {"batchgen_field": field, "message": message})


class ClassifySpec(BaseModel):
    """Score each choice as the prompt's continuation: ``choices`` for every row, or ``choices_column``
    (a list<string> column, per row); ``normalize: tokens`` divides each sum by its token count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    choices: list[str] | None = Field(None, min_length=1)
    choices_column: str | None = Field(None, min_length=1, description="list<string> column of per-row choices")
    normalize: Literal["none", "tokens"] = "none"

    @model_validator(mode="after")
    def _one_source(self) -> "ClassifySpec":
        if (self.choices is None) == (self.choices_column is None):
            raise _error("choices", "set exactly one of choices or choices_column")
        if self.choices is not None:
            check_choices(self.choices, "choices")
        return self


def check_choices(choices: Any, what: str) -> list[str]:
    """A valid choice list (non-empty strings, no repeats), or ValueError naming what is wrong."""
    if isinstance(choices, (str, bytes)) or not isinstance(choices, (list, tuple)) or not choices:
        raise _error(what, f"must be a non-empty list of strings, got {choices!r}")
    for k, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            raise _error(what, f"item {k} must be a non-empty string, got {c!r}")
    dupes = sorted({c for c in choices if list(choices).count(c) > 1})
    if dupes:
        raise _error(what, f"listed more than once: {', '.join(map(repr, dupes))}")
    return list(choices)


def row_choices(cell: Any, column: str) -> tuple[list[str] | None, str | None]:
    """(choices, None) for a row's ``choices_column`` cell, or (None, the row's error)."""
    if cell is None:
        return None, f"column {column!r} (classify.choices_column) is null"
    try:
        return check_choices(cell, "x"), None
    except PydanticCustomError as e:
        return None, f"column {column!r} (classify.choices_column) {e}"


def load_json_schema(value: Any) -> Any:
    """``sampling.json_schema`` as given: a mapping stays, a string names a ``.json`` file, read here
    (against the CWD) so that the spec carries the schema itself to every replica and into its
    fingerprint. Raises ValueError (a field validator's error) naming the file and the problem."""
    if not isinstance(value, str):
        return value
    path = Path(value)
    if path.suffix.lower() != ".json":
        raise ValueError(f"a string must name a .json file, got {value!r}; write an inline schema as a mapping")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {value}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{value} is not valid JSON: {e}") from None


def check_constraint_fields(sampling: Any) -> tuple[str, Any] | None:
    """The sampling section's constraint as (kind, value), refused when several are set or the grammar
    engine cannot compile it."""
    set_ = [f for f in CONSTRAINT_FIELDS if getattr(sampling, f) is not None]
    if len(set_) > 1:
        raise _error(set_[1], f"json_schema, regex and choice exclude each other ({' and '.join(set_)} are set)")
    if not set_:
        return None
    from batchgen.engine.constraints import ConstraintError, check_constraint  # llguidance: only when used

    kind = set_[0]
    value = getattr(sampling, kind)
    try:
        check_constraint(kind, value)  # type: ignore[arg-type]
    except ConstraintError as e:
        raise _error(kind, str(e)) from None
    return kind, value
