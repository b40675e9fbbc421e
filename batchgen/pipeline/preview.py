"""``batchgen preview SPEC``: the first rows' prompts as the model will see them, with token
counts, without loading weights or starting Ray.

The rows go through the pipeline's own prompt building (:func:`shards.build_prompts`: template or
prompt column, presets, conversations, per-row errors, overrides) and the engine input a replica
builds from a row (:meth:`shards.PromptRow.engine_input`: Meta's chat rendering in chat modes,
else the text with a BOS). Control tokens are shown as ``<s>``/``</s>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from batchgen.limits import prompt_too_long, truncate_prompt_ids
from batchgen.pipeline.rows import build_prompts
from batchgen.pipeline.shards import list_input_files, plan_shards, read_shard, validate_input
from batchgen.pipeline.spec import JobSpec, SpecError


def _tokenizer(spec: JobSpec) -> Any:
    from batchgen.tokenizer import TOKENIZER_FILE, Tokenizer

    path = Path(spec.model.tokenizer) if spec.model.tokenizer else Path(spec.model.path) / TOKENIZER_FILE
    if not path.is_file():
        raise SpecError("model.tokenizer", f"no tokenizer at {path}; set model.tokenizer to the tokenizer's file")
    return Tokenizer(path)


def _context_len(spec: JobSpec) -> Optional[int]:
    if spec.model.max_seq_len is not None:
        return spec.model.max_seq_len
    from batchgen.checkpoint import CheckpointError, load_args

    try:
        return load_args(spec.model.path).max_seq_len
    except CheckpointError:
        return None


def render(tokenizer: Any, ids: list[int]) -> str:
    """``ids`` as text, with BOS/EOS shown as ``<s>``/``</s>``."""
    out, run = [], []
    for t in ids:
        if t in (tokenizer.bos_id, tokenizer.eos_id):
            out.append(tokenizer.decode(run))
            out.append("<s>" if t == tokenizer.bos_id else "</s>")
            run = []
        else:
            run.append(t)
    out.append(tokenizer.decode(run))
    return "".join(out)


def preview(spec: JobSpec, rows: int = 5) -> list[dict[str, Any]]:
    """The first ``rows`` input rows as ``{"id", "prompt", "prompt_tokens", "note"}`` (``prompt``
    rendered as the model sees it; ``note`` says why a row would fail or be truncated).

    Raises:
        SpecError: the input or tokenizer cannot be read.
    """
    files = list_input_files(spec.input)
    validate_input(spec, files)
    tokenizer = _tokenizer(spec)
    context = _context_len(spec)
    out: list[dict[str, Any]] = []
    for shard in plan_shards(spec.input, spec.execution.shard_rows, files):
        if len(out) >= rows:
            break
        table = read_shard(shard, spec.input_columns()).slice(0, rows - len(out))
        for row in build_prompts(table, spec, context=context):
            if row.prompt is None:
                out.append({"id": row.row_id, "prompt": None, "prompt_tokens": 0, "note": f"error: {row.error}"})
                continue
            ids = row.engine_input(tokenizer)
            if isinstance(ids, str):
                ids = tokenizer.encode(ids, bos=True)
            note = None
            if context is not None and len(ids) >= context:
                if spec.input.truncate_prompt:
                    kept = truncate_prompt_ids(ids, context, spec.sampling.max_tokens, tokenizer.bos_id)
                    note = (f"longer than the context ({context}): {len(ids) - len(kept)} of its {len(ids)} "
                            f"tokens are cut from the front (truncated_tokens), {len(kept)} kept")
                else:
                    note = f"error: {prompt_too_long(len(ids), context)}"
            out.append({"id": row.row_id, "prompt": render(tokenizer, ids), "prompt_tokens": len(ids), "note": note})
    return out
