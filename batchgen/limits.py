"""Limits on what an input may ask for, checked before any work is spent on it.

One place for the bounds that keep a careless or hostile input from costing minutes, memory or
retries before it lands as an error: the text a prompt may hold before it is tokenised, the
context length a job may ask of a checkpoint, and the dimensions a checkpoint's config may
declare. Imported by the engine, the checkpoint loader and the pipeline alike (so it imports
neither torch, ray nor pyarrow).
"""

from __future__ import annotations

from typing import Any, Optional

#: The most bytes of UTF-8 text one token can stand for. SentencePiece caps a piece at
#: ``max_sentencepiece_length`` characters (16 by default, and in LLaMA's tokenizer), and a
#: character is at most 4 bytes of UTF-8, so a piece covers at most 64 bytes (LLaMA's longest,
#: ``▁административ``, covers 27; byte-fallback tokens cover 1). Text of more than
#: ``context * 64`` bytes therefore has more than ``context`` tokens and can never run: it is
#: refused without being tokenised. (A tokenizer whose normaliser collapses whitespace, or one
#: without byte fallback that maps a run of unknown characters to one ``<unk>``, could fit more
#: text into a context; LLaMA's does neither, and such text is refused all the same.)
MAX_BYTES_PER_TOKEN = 64

#: The hard ceiling on any context length (``model.max_seq_len``, a config's
#: ``max_position_embeddings``): 2**20 tokens, 8x the longest LLaMA-family context published
#: (Llama 3.1's 131,072). Past it the RoPE tables alone take hundreds of MB per replica.
MAX_CONTEXT = 1 << 20

#: The context assumed for a checkpoint that records none (Meta's ``params.json``): Llama 2's
#: 4096, the longest context of the Meta-layout models batchgen targets (LLaMA-1 was trained on
#: 2048). ``model.allow_longer_context: true`` lifts the bound up to :data:`MAX_CONTEXT`.
DEFAULT_CONTEXT_CAP = 4096

#: Bounds on a checkpoint config's dimensions, each far above any published LLaMA-family model
#: (Llama 3.1 405B: dim 16,384, 126 layers, 128 heads, FFN 53,248, vocab 128,256). A config past
#: them is a typo or a hostile file; refusing it at once saves building a model of that shape.
MAX_DIMS = {"dim": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
            "vocab_size": 1 << 20, "hidden_dim": 1 << 20, "max_seq_len": MAX_CONTEXT}
#: Parameters a config may imply in all: 10**12, 2.5x Llama 3.1 405B (2 TB in bf16).
MAX_PARAMETERS = 10**12


def max_prompt_bytes(context: int) -> int:
    """The most bytes of prompt text that can fit a context of ``context`` tokens (see
    :data:`MAX_BYTES_PER_TOKEN`); longer text is refused before tokenising."""
    return context * MAX_BYTES_PER_TOKEN


def prompt_too_long(tokens: int, context: int) -> str:
    """The error of a prompt of ``tokens`` tokens that does not fit a context of ``context``."""
    return (f"prompt_too_long: {tokens} tokens, the context holds {context} "
            "(set input.truncate_prompt: true to keep the last tokens)")


def text_too_long(size: int, context: int, what: str = "the prompt", unit: str = "characters") -> str:
    """The error of prompt text of ``size`` bytes (or characters, each at least a byte) that is
    refused untokenised: more than :func:`max_prompt_bytes` of ``context``. ``truncate_prompt``
    does not apply (the text is over a context's worth many times over); the message says so."""
    return (f"prompt_too_long: {what} has {size} {unit}, more than a context of {context} tokens can hold "
            f"({max_prompt_bytes(context)} bytes at {MAX_BYTES_PER_TOKEN} bytes a token at most); it was not "
            "tokenised, and input.truncate_prompt does not apply to text this long: shorten it before the job")


def context_cap(recorded: Optional[int]) -> int:
    """The longest context a job may ask of a checkpoint that records ``recorded`` (None: it
    records none) without ``model.allow_longer_context``."""
    return min(recorded, MAX_CONTEXT) if recorded is not None else DEFAULT_CONTEXT_CAP


#: Hugging Face ``config.json`` names of the ``ModelArgs`` fields, for messages about that file.
HF_CONFIG_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                  "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size",
                  "max_seq_len": "max_position_embeddings"}


def shape_problem(args: Any, hf: bool = False) -> Optional[str]:
    """Why a model shape (a ``ModelArgs``) is out of bounds (:data:`MAX_DIMS`,
    :data:`MAX_PARAMETERS`), or None; ``hf``: name fields as ``config.json`` does. Computed
    from the numbers: no model is built."""
    for key, limit in MAX_DIMS.items():
        value = getattr(args, key)
        if value is not None and value > limit:
            name = HF_CONFIG_KEYS.get(key, key) if hf else key
            return (f"{name}={value} is over {limit}, far above any LLaMA-family model; the config is "
                    "probably wrong (refused before building a model of that shape)")
    n = parameter_count(args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size, args.hidden_dim,
                        args.tie_word_embeddings)
    if n > MAX_PARAMETERS:
        return (f"the config describes a model of {n:.3g} parameters, over {MAX_PARAMETERS:.0e} (2.5x the "
                "largest LLaMA-family model); the config is probably wrong")
    return None


def parameter_count(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab_size: int,
                    hidden_dim: int, tied: bool = False) -> int:
    """Parameters of a LLaMA of this shape, computed (no model is built)."""
    head = dim // n_heads
    attn = dim * (n_heads * head) * 2 + dim * (n_kv_heads * head) * 2  # wq, wo, wk, wv
    layer = attn + 3 * dim * hidden_dim + 2 * dim  # w1, w2, w3, two norms
    return vocab_size * dim * (1 if tied else 2) + n_layers * layer + dim


#: ``truncate_prompt`` keeps at least this share of the context for the prompt.
MIN_TRUNCATED_PROMPT_SHARE = 0.5


def truncate_prompt_ids(ids: list[int], context: int, max_tokens: int, bos_id: Optional[int]) -> list[int]:
    """The prompt ``ids`` (at least ``context`` long) cut to fit a context of ``context`` tokens.

    The prompt keeps its last ``context - max_tokens`` tokens, but never less than half the
    context: a large ``max_tokens`` used to leave a single prompt token, a completion of nothing.
    The generation then has the rest of the context (it stops with ``length`` there, as any
    request that reaches the context does). A leading BOS stays first: LLaMA never saw text
    without it. At least one token of the context is left for the completion.
    """
    keep = max(context - max_tokens, int(context * MIN_TRUNCATED_PROMPT_SHARE))
    keep = max(1, min(keep, context - 1))
    if bos_id is not None and ids[0] == bos_id and keep > 1:
        return [ids[0]] + ids[len(ids) - keep + 1:]
    return ids[len(ids) - keep:]


__all__ = ["DEFAULT_CONTEXT_CAP", "MAX_BYTES_PER_TOKEN", "MAX_CONTEXT", "MAX_DIMS", "MAX_PARAMETERS",
           "shape_problem", "context_cap", "max_prompt_bytes", "parameter_count", "prompt_too_long", "text_too_long",
           "truncate_prompt_ids", "MIN_TRUNCATED_PROMPT_SHARE"]
