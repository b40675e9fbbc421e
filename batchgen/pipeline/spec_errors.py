"""Pydantic's validation errors as the messages a job spec's author reads.

Each error becomes a dotted path to the field (``input.template``, ``model.adapters.client-a``)
and a message; an unknown field lists the section's allowed fields and the closest one to what
was written (``did you mean 'max_tokens'?``).
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Sequence

from pydantic import BaseModel, ValidationError


def _section_model(root: type[BaseModel], loc: Sequence[str]) -> type[BaseModel] | None:
    """The pydantic model reached by following field names ``loc`` from ``root``."""
    model: type[BaseModel] = root
    for name in loc:
        field = model.model_fields.get(name)
        if field is None:
            return None
        found = model_in(field.annotation)
        if found is None:
            return None
        model = found
    return model


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field's annotation holds (``X``, ``X | None``, ``dict[str, X]``...), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None


def unknown_field_message(model: type[BaseModel] | None, name: str) -> str:
    """The message for ``name`` written in a section of ``model`` that has no such field."""
    if model is None:
        return "unknown field"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field; {hint}allowed: {', '.join(allowed)}"


def _format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic marks dict-key errors this way; the key itself is already there
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def field_errors(exc: ValidationError, root: type[BaseModel]) -> list[tuple[str, str]]:
    """``(dotted field path, message)`` of each of ``exc``'s errors, found validating ``root``: a
    field's own check may name a deeper path (``batchgen_field``), an unknown field gets the
    allowed ones and the closest match, and pydantic's "Value error, " prefix goes."""
    errors: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = list(err["loc"])
        msg = err["msg"]
        if err["type"] == "batchgen_field":
            loc += err["ctx"]["batchgen_field"].split(".")
        elif err["type"] == "extra_forbidden":
            msg = unknown_field_message(_section_model(root, [str(p) for p in loc[:-1]]), str(loc[-1]))
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        errors.append((_format_loc(loc), msg))
    return errors


__all__ = ["field_errors", "model_in", "unknown_field_message"]
