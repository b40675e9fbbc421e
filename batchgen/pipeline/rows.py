"""Rows of a shard as prompts: each input row becomes a :class:`PromptRow` for the engine.

Poison rows (null or empty prompts, invalid UTF-8, malformed conversations, chat markers in
cells, out-of-range sampling overrides) become rows with an ``error`` here, never an exception,
so that one bad row never fails its shard. The column type checks live here too: validation
(:func:`batchgen.pipeline.shards.validate_input`) refuses before any work a column that no row
could use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from batchgen.pipeline.limits import cap_binary_cells, conversation_too_long, prompt_text_too_long
from batchgen.pipeline.spec import JobSpec, check_sampling_value, row_seed
from batchgen.pipeline.spec_tasks import row_choices
from batchgen.prompts import PromptError, chat_turns, check_no_marker, encode_chat, render_chat_text, render_preset, single_turn

#: Sampling overrides that need an integer column (the others take any number).
INT_OVERRIDES = frozenset({"max_tokens", "top_k", "seed"})


# --------------------------------------------------------------------------------------- column types

def is_text_type(t: pa.DataType) -> bool:
    """Whether ``t`` is a string or binary type (its cells can be decoded as text)."""
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t))


def column_type_problem(kind: str, t: pa.DataType) -> str | None:
    """Why a column of type ``t`` cannot play role ``kind`` (None when it can)."""
    base = t.value_type if pa.types.is_dictionary(t) else t
    if kind == "id" and not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
        return f"has type {t}; an id column must be integer or string"
    if kind == "text" and not (is_text_type(base) or pa.types.is_integer(base) or pa.types.is_floating(base)
                               or pa.types.is_decimal(base) or pa.types.is_boolean(base)):
        return f"has type {t}; only text and number columns can go into a prompt"
    if kind == "messages" and not is_messages_type(t):
        return f"has type {t}; a messages column must be list<struct<role: string, content: string>>"
    if kind == "int" and not pa.types.is_integer(t):
        return f"has type {t}; this override needs an integer column"
    if kind == "number" and not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        return f"has type {t}; this override needs a numeric column"
    if kind == "choices" and not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and is_text_type(t.value_type)):
        return f"has type {t}; a choices column must be list<string>"
    return None


def is_messages_type(t: pa.DataType) -> bool:
    """Whether ``t`` is a list of structs with string ``role`` and ``content`` fields (others ignored)."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    item = t.value_type
    names = [item.field(i).name for i in range(item.num_fields)]
    for name in ("role", "content"):
        if name not in names:
            return False
        ft = item.field(name).type
        base = ft.value_type if pa.types.is_dictionary(ft) else ft
        if not (pa.types.is_string(base) or pa.types.is_large_string(base) or pa.types.is_string_view(base)):
            return False
    return True


# --------------------------------------------------------------------------------------- prompts

@dataclass
class PromptRow:
    """One row ready for the engine; poison rows carry ``error`` and no prompt, never an exception.

    ``overrides`` holds the row's validated sampling overrides (only non-null cells). ``seed`` is
    the row's own seed, :func:`~batchgen.pipeline.spec.row_seed` of (the seed override or
    ``sampling.seed``, row id): seed the row's generator with it directly. In chat modes
    ``messages`` is the validated conversation, which the engine side encodes with
    :func:`batchgen.prompts.encode_chat`; ``prompt`` is then the user text (single-turn) or the
    conversation's readable rendering (``messages_column``). Otherwise ``prompt`` is the text as is.
    """

    row_id: int | str
    prompt: str | None
    error: str | None
    overrides: dict[str, int | float] = field(default_factory=dict)
    seed: int = 0
    messages: list[dict[str, str]] | None = None
    choices: list[str] | None = None  # classify.choices_column: this row's choices

    def engine_input(self, tokenizer: Any) -> str | list[int] | None:
        """What the engine gets for this row: chat conversations as token ids (Meta's rendering),
        else the text. One function for replicas and ``preview``, so that what ``preview`` shows
        is what runs. Without a tokenizer the text goes on (the engine reports that it cannot
        encode it)."""
        if self.messages is not None and tokenizer is not None:
            return encode_chat(tokenizer, self.messages)
        return self.prompt


def _text_cells(column: pa.ChunkedArray, name: str, context: int | None = None) -> list[tuple[str | None, str | None]]:
    """Each cell of ``column`` as ``(text, None)`` or ``(None, why not)``; with ``context``, a
    cell bigger than that context can hold is an error before it is decoded (limits.py)."""
    t = column.type
    if pa.types.is_dictionary(t):
        column, t = column.cast(t.value_type), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        # Decode ourselves: Parquet does not guarantee valid UTF-8 in string columns either.
        column, t = column.cast(pa.large_string()).cast(pa.large_binary()), pa.large_binary()
    if pa.types.is_binary_view(t):
        column, t = column.cast(pa.large_binary()), pa.large_binary()
    oversized: dict[int, str] = {}
    if is_text_type(t):
        column, oversized = cap_binary_cells(column, name, context)
    values = column.to_pylist()
    if is_text_type(t):
        out: list[tuple[str | None, str | None]] = []
        for i, v in enumerate(values):
            if i in oversized:
                out.append((None, oversized[i]))
                continue
            if v is None:
                out.append((None, f"column {name!r} is null"))
                continue
            try:
                out.append((v.decode("utf-8"), None))
            except UnicodeDecodeError as exc:
                out.append((None, f"column {name!r} is not valid UTF-8 ({exc.reason} at byte {exc.start})"))
        return out
    problem = column_type_problem("text", t)
    if problem:
        return [(None, f"column {name!r} {problem}")] * len(values)
    return [(None, f"column {name!r} is null") if v is None else (str(v), None) for v in values]


def _message_cells(column: pa.ChunkedArray, name: str) -> list[tuple[list | None, str | None]]:
    """Each cell of a messages column as ``(list of {role, content} dicts, None)`` or ``(None, why not)``.

    Struct fields other than role and content are dropped; the conversation is not validated here.
    """
    problem = column_type_problem("messages", column.type)
    if problem:
        return [(None, f"column {name!r} {problem}")] * len(column)
    try:
        values = column.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException):
        values = None  # some cell is not valid UTF-8: find which, cell by cell
    out: list[tuple[list | None, str | None]] = []
    for i in range(len(column)):
        if values is not None:
            v = values[i]
        else:
            try:
                v = column[i].as_py()
            except (UnicodeDecodeError, pa.ArrowException) as exc:
                out.append((None, f"column {name!r} is not valid UTF-8 ({exc})"))
                continue
        if v is None:
            out.append((None, f"column {name!r} is null"))
            continue
        out.append(([m if m is None else {"role": m.get("role"), "content": m.get("content")} for m in v], None))
    return out


def _marker_error(text: str, column: str) -> str | None:
    """Why a chat prompt may not hold ``text`` from ``column`` (a chat marker), or None."""
    try:
        check_no_marker(text, f"column {column!r}")
    except PromptError as exc:
        return str(exc)
    return None


def _template_error(why: str) -> str:
    """A template cell's problem as the row's error (``prompt_too_long`` keeps its prefix)."""
    return why if why.startswith("prompt_too_long") else f"template {why}"


def build_prompts(table: pa.Table, spec: JobSpec, context: int | None = None) -> list[PromptRow]:
    """Render every row of ``table`` (from :func:`read_shard`) into a :class:`PromptRow`.

    Text comes from ``input.prompt_column``, the template or its preset; numbers are formatted
    with ``str()``. Conversations come from ``input.messages_column``. Null, empty or
    whitespace-only prompts, null template cells, invalid UTF-8, malformed conversations, chat
    markers inside cells in chat mode and out-of-range sampling overrides become per-row errors.
    With ``context`` (the engine's context length), text more than that context can ever hold
    is a ``prompt_too_long`` error row before it is decoded or tokenised (:mod:`limits`).
    """
    inp = spec.input
    ids = table.column(inp.id_column).to_pylist()
    preset = inp.preset()
    if inp.messages_column is not None:
        conversations = _message_cells(table.column(inp.messages_column), inp.messages_column)
        cells = {}
    else:
        cells = {c: _text_cells(table.column(c), c, context) for c in inp.text_columns()}
    nulls = {c: table.column(c).is_null().to_pylist() for c in cells}
    parts = inp.template_parts()
    override_values = {name: table.column(col).to_pylist() for name, col in spec.sampling.overrides.items()}
    choices_col = spec.classify.choices_column if spec.classify is not None else None
    choice_cells = table.column(choices_col).to_pylist() if choices_col is not None else None
    rows: list[PromptRow] = []
    for i, row_id in enumerate(ids):
        error: str | None = None
        prompt: str | None = None
        messages: list[dict[str, str]] | None = None
        used: list[str] = []  # the text columns that went into the prompt, for the chat-marker check
        if row_id is None:
            error = f"id column {inp.id_column!r} is null"
        elif inp.messages_column is not None:
            messages, error = conversations[i]
            if messages is not None and (error := conversation_too_long(messages, inp.messages_column, context)):
                messages = None
            if messages is not None:
                try:
                    chat_turns(messages)
                    prompt = render_chat_text(messages)
                except PromptError as exc:
                    messages, error = None, f"column {inp.messages_column!r}: {exc}"
        elif inp.prompt_column is not None:
            prompt, error = cells[inp.prompt_column][i]
            used = [inp.prompt_column]
            if prompt is not None and not prompt.strip():
                prompt, error = None, f"column {inp.prompt_column!r} is empty"
        elif preset is not None:
            values: dict[str, str | None] = {}
            for slot, col in inp.preset_columns().items():
                if col is None:
                    continue
                text, why = cells[col][i]
                if why is not None and (slot in preset.required or not nulls[col][i]):
                    error = _template_error(why)
                    break
                if slot in preset.required and not text.strip():
                    error = f"template column {col!r} is empty"
                    break
                if inp.is_chat and text is not None and (why := _marker_error(text, col)) is not None:
                    error = why
                    break
                values[slot] = text
                used.append(col)
            if error is None:
                try:
                    rendered = render_preset(preset.name, values, inp.system)
                except PromptError as exc:
                    error = f"template {preset.name}: {exc}"
                else:
                    if isinstance(rendered, str):
                        prompt = rendered
                    else:
                        messages, prompt = rendered, rendered[-1]["content"]
        else:
            pieces = []
            for literal, col in parts:
                pieces.append(literal)
                if col is not None:
                    text, error = cells[col][i]
                    if error:
                        error = _template_error(error)
                        break
                    pieces.append(text)
                    used.append(col)
            if error is None:
                prompt = "".join(pieces)
                if not prompt.strip():
                    prompt, error = None, "the rendered template is empty"
        if error is None and (error := prompt_text_too_long(prompt, context)) is not None:
            prompt, messages = None, None
        if error is None and inp.is_chat and inp.messages_column is None:
            # A cell may not forge chat turns (Meta's reference refuses such prompts too).
            error = next((e for c in dict.fromkeys(used) if (e := _marker_error(cells[c][i][0] or "", c))), None)
            if error is not None:
                prompt, messages = None, None
            elif messages is None:
                messages = single_turn(prompt, inp.system)
        overrides: dict[str, int | float] = {}
        for name, values_ in override_values.items():
            if values_[i] is None or error:
                continue
            try:
                overrides[name] = check_sampling_value(name, values_[i])
            except ValueError as exc:
                prompt, messages, error = None, None, f"override from column {spec.sampling.overrides[name]!r}: {exc}"
        choices = None
        if choice_cells is not None and error is None:
            choices, error = row_choices(choice_cells[i], choices_col)
            if error is not None:
                prompt, messages = None, None
        seed = row_seed(int(overrides.get("seed", spec.sampling.seed)), row_id) if row_id is not None else 0
        rows.append(PromptRow(row_id=row_id, prompt=prompt, error=error, overrides=overrides, seed=seed,
                              messages=messages, choices=choices))
    return rows
