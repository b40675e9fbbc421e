"""Prompt size caps applied while rows become prompts, before anything is tokenised.

A cell of text bigger than a context can ever hold (:func:`batchgen.limits.max_prompt_bytes`)
becomes a ``prompt_too_long`` error row at once: it is neither copied out of Arrow nor
tokenised (a 10 MB cell took seconds to tokenise and a 2 GB one would outlive its lease). The
engine applies the same cap to text it is handed directly (``LLM.add_request``).

Also here: the bound on ``model.max_seq_len`` by the checkpoint's own context (:func:`check_context`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from batchgen.limits import DEFAULT_CONTEXT_CAP, MAX_CONTEXT, context_cap, max_prompt_bytes, text_too_long
from batchgen.pipeline.spec import ModelSpec, SpecError


def cap_binary_cells(column: pa.ChunkedArray, name: str, context: Optional[int]
                     ) -> tuple[pa.ChunkedArray, dict[int, str]]:
    """``column`` (binary or large_binary) with every cell over :func:`max_prompt_bytes` of
    ``context`` set to null, and each such cell's error by row index. Sizes are read from the
    Arrow offsets: an oversized value is never copied into Python. ``context`` None: no cap."""
    if context is None or len(column) == 0:
        return column, {}
    over = pc.fill_null(pc.greater(pc.binary_length(column), max_prompt_bytes(context)), False)
    rows = pc.indices_nonzero(over).to_pylist()
    if not rows:
        return column, {}
    sizes = pc.binary_length(column.take(rows)).to_pylist()
    errors = {i: text_too_long(n, context, f"column {name!r}", "bytes") for i, n in zip(rows, sizes)}
    return pc.if_else(over, pa.scalar(None, column.type), column), errors


def conversation_too_long(messages: Sequence[Optional[dict]], column: str, context: Optional[int]) -> Optional[str]:
    """The error of a conversation whose contents together hold more text than ``context``
    tokens can (each character is at least a byte), or None."""
    if context is None:
        return None
    size = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
    return text_too_long(size, context, f"the conversation in column {column!r}") if size > max_prompt_bytes(context) else None


def prompt_text_too_long(prompt: Optional[str], context: Optional[int]) -> Optional[str]:
    """The error of a rendered prompt (a template of several cells, each under the cap) that is
    over the cap as a whole, or None."""
    if context is None or prompt is None or len(prompt) <= max_prompt_bytes(context):
        return None
    return text_too_long(len(prompt), context, "the rendered prompt")


def check_context(model: ModelSpec, recorded: Optional[int]) -> None:
    """Refuse a ``model.max_seq_len`` longer than the checkpoint's own context (``recorded``:
    what its config records, None for none) unless ``model.allow_longer_context`` is set.

    Checked by ``validate`` and before ``run`` starts anything, so a typo such as 10**9 never
    reaches a replica (whose RoPE tables would take gigabytes, on every retry).

    Raises:
        SpecError: on ``model.max_seq_len``, saying what the bound is and how to exceed it.
    """
    want = model.max_seq_len
    cap = context_cap(recorded)
    if want is None or want <= cap or model.allow_longer_context:
        return
    source = (f"the checkpoint's max_position_embeddings / max_seq_len is {recorded}" if recorded is not None else
              f"the checkpoint records no context length (Meta's params.json), so batchgen assumes at most "
              f"{DEFAULT_CONTEXT_CAP}")
    raise SpecError("model.max_seq_len", f"{want} is longer than the model's context: {source}. Positions past it "
                                         "were never trained; to use them all the same set "
                                         f"model.allow_longer_context: true (up to {MAX_CONTEXT})")


__all__ = ["cap_binary_cells", "check_context", "conversation_too_long", "prompt_text_too_long"]
