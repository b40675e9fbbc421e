"""Choice scoring for classification: the log-probability of each choice as the prompt's continuation.

**Definition.** A choice's token ids are the tokenizer's encoding of the choice string without BOS
(SentencePiece adds its word-start marker, so ``toxic`` after ``Label:`` reads as `` toxic``),
appended to the prompt's ids. Its log-probability is the sum of its tokens' log-probabilities, each
given the prompt and the choice's earlier tokens:

    logprob(c) = sum_k log_softmax(logits[len(prompt) - 1 + k])[c[k]]

With ``normalize: tokens`` a choice's score is that sum divided by its token count (the mean
log-probability per token, for choices of unequal length). The label is the choice with the
highest score (the first on ties); ``label_probs`` are the softmax over the scores.

The model work is split so that the prompt is run once: the prompt's last-position logits score
every choice's first token, and only multi-token choices need a further forward, of the choice's
tokens except the last, *continuing the prompt* (against its KV cache in the engine). That forward
is a callable the caller provides; :func:`full_forward` builds a reference one that re-runs the
prompt, for tests and for models without a cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch

from batchgen.tokenizer import Tokenizer

Normalize = Literal["none", "tokens"]
NORMALIZE_MODES: tuple[str, ...] = ("none", "tokens")

# forward(requests) -> logits: each request is (row, input_ids) where input_ids continue row's
# prompt; the answer for it is the logits [len(input_ids), V] after each of those ids.
ContinuationForward = Callable[[Sequence[tuple[int, Sequence[int]]]], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class ChoiceScores:
    """One row's scores, in the order the choices were given."""

    logprobs: list[float]  # the scores: summed (normalize none) or mean (tokens) token log-probs
    probs: list[float]  # softmax over ``logprobs``
    index: int  # argmax of ``logprobs`` (the first on ties)
    num_tokens: list[int]  # each choice's token count

    def label(self, choices: Sequence[str]) -> str:
        """The best choice's string."""
        return choices[self.index]


def encode_choices(tokenizer: Tokenizer, choices: Sequence[str]) -> list[list[int]]:
    """Each choice's token ids: the tokenizer's encoding of the string without BOS (see the definition).

    ``tokenizer`` is a :class:`batchgen.tokenizer.Tokenizer` (anything with ``encode(text, bos=...)``).
    Raises ValueError naming the choice that is empty or encodes to no tokens.
    """
    if isinstance(choices, str) or not choices:
        raise ValueError(f"choices must be a non-empty list of strings, got {choices!r}")
    out = []
    for k, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise ValueError(f"choices[{k}] must be a non-empty string, got {c!r}")
        ids = tokenizer.encode(c, bos=False)
        if not ids:
            raise ValueError(f"choices[{k}] ({c!r}) encodes to no tokens")
        out.append(list(ids))
    return out


def _check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {normalize!r}")


def finish_scores(sums: Sequence[float], lengths: Sequence[int], normalize: Normalize = "none") -> ChoiceScores:
    """Scores, probabilities and the best index from each choice's summed log-probability."""
    _check_normalize(normalize)
    total = torch.tensor(list(sums), dtype=torch.float64)
    n = torch.tensor(list(lengths), dtype=torch.float64)
    scores = total / n if normalize == "tokens" else total
    probs = torch.softmax(scores, dim=0)
    return ChoiceScores(logprobs=scores.tolist(), probs=probs.tolist(), index=int(torch.argmax(scores)),
                        num_tokens=[int(x) for x in lengths])


def choice_logprob_sums(prompt_logits: torch.Tensor, choice_ids: Sequence[Sequence[int]],
                        continuation_logits: Sequence[Optional[torch.Tensor]]) -> list[float]:
    """Each choice's summed token log-probability (fp32 softmax, fp64 sum).

    ``prompt_logits`` [V] are the logits at the prompt's last position; ``continuation_logits[j]``
    are the logits [len(c_j) - 1, V] after each of choice j's tokens but the last (None or empty
    for a one-token choice).
    """
    if prompt_logits.dim() != 1:
        raise ValueError(f"prompt_logits must be [V], got {tuple(prompt_logits.shape)}")
    if len(continuation_logits) != len(choice_ids):
        raise ValueError(f"{len(choice_ids)} choices but {len(continuation_logits)} continuation logits")
    first = torch.log_softmax(prompt_logits.float(), dim=-1)
    sums = []
    for j, (ids, cont) in enumerate(zip(choice_ids, continuation_logits)):
        total = float(first[ids[0]])
        rest = list(ids[1:])
        if rest:
            if cont is None or cont.shape[0] != len(rest):
                got = None if cont is None else tuple(cont.shape)
                raise ValueError(f"choice {j} has {len(ids)} tokens: need logits [{len(rest)}, V], got {got}")
            lp = torch.log_softmax(cont.float(), dim=-1)
            total += float(lp.gather(1, torch.tensor(rest, device=lp.device)[:, None]).double().sum())
        sums.append(total)
    return sums


def score_choices(prompt_logits: torch.Tensor, choice_ids: Sequence[Sequence[Sequence[int]]],
                  forward: Optional[ContinuationForward] = None,
                  normalize: Normalize = "none") -> list[ChoiceScores]:
    """Score every row's choices; one call for a batch of rows.

    ``prompt_logits`` [R, V]: each row's last-position logits (from one prefill of the prompt).
    ``choice_ids[r]``: row r's choices' token ids (see :func:`encode_choices`; rows may differ).
    ``forward`` runs, as one packed batch, each multi-token choice's tokens but the last as a
    continuation of its row's prompt and returns their logits; it is not called when every choice
    is one token (the prompt's logits are then the whole answer), and may be None then.
    """
    _check_normalize(normalize)
    if prompt_logits.dim() != 2 or prompt_logits.shape[0] != len(choice_ids):
        raise ValueError(f"prompt_logits must be [R, V] with R = {len(choice_ids)} rows, got "
                         f"{tuple(prompt_logits.shape)}")
    requests: list[tuple[int, list[int]]] = []
    where: list[tuple[int, int]] = []  # (row, choice) of each request
    for r, row in enumerate(choice_ids):
        if not row:
            raise ValueError(f"row {r} has no choices")
        for j, ids in enumerate(row):
            if not ids:
                raise ValueError(f"row {r} choice {j} has no tokens")
            if len(ids) > 1:
                requests.append((r, list(ids[:-1])))
                where.append((r, j))
    conts: list[list[Optional[torch.Tensor]]] = [[None] * len(row) for row in choice_ids]
    if requests:
        if forward is None:
            raise ValueError("multi-token choices need a forward callable for their continuation logits")
        out = forward(requests)
        if len(out) != len(requests):
            raise ValueError(f"forward returned {len(out)} logits for {len(requests)} continuations")
        for (r, j), logits in zip(where, out):
            conts[r][j] = logits
    results = []
    for r, row in enumerate(choice_ids):
        sums = choice_logprob_sums(prompt_logits[r], row, conts[r])
        results.append(finish_scores(sums, [len(c) for c in row], normalize))
    return results


def full_forward(logits_fn: Callable[[list[int]], torch.Tensor],
                 prompts: Sequence[Sequence[int]]) -> ContinuationForward:
    """A reference :data:`ContinuationForward` that re-runs each prompt with its continuation.

    ``logits_fn(ids)`` returns the logits [len(ids), V] of one whole sequence (no cache). The engine
    must not score this way (it re-runs the prompt per choice); tests use it as the definition.
    """

    def forward(requests: Sequence[tuple[int, Sequence[int]]]) -> list[torch.Tensor]:
        out = []
        for r, ids in requests:
            p = list(prompts[r])
            out.append(logits_fn(p + list(ids))[len(p):])
        return out

    return forward
