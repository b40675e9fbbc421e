"""Classification in the engine: score every choice against one prefill of the prompt.

A classification request (``SamplingParams.choices``) is prefilled like any other. Its
last-position logits give every choice's first-token log-probability; when every choice is one
token that is the whole answer. Otherwise the request holds, after its prompt, every multi-token
choice's tokens but the last side by side, as *branches* (:func:`add_branches`), and the same
prefill runs them: each branch's positions start right after the prompt, and each branch token
sees the prompt and its own branch only. The model runner packs the prompt as any prefill and
the branches as a continuation of it (``AttentionMetadata.ctx_branch_starts``); within a layer
every new K/V is written before any attention reads, so the branches read the prompt's K/V of
that very step. The logits at the prompt's last token and at every branch token
(``Request.num_logit_rows``) score every choice: a row costs one prefill, whatever its choices,
and the prompt is run once.

The flex backend's masks know no branches. There each multi-token choice gets a child of its own
after the prefill (:func:`plain_children`), one plain sequence: the prompt then the choice's
tokens but the last, starting from the prompt's forked KV blocks (``BlockManager.fork``) or,
when no block is free, waiting in the queue and prefilling its prompt too (from the prefix cache
where the prompt's blocks are still there). The parent's reference to its blocks goes at the
fork; the shared blocks themselves are freed when the last child holding them finishes.

See ``batchgen.engine.scoring`` for the definition of a choice's log-probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from batchgen.engine.request import CompletionOutput, Request, SamplingParams
from batchgen.engine.scoring import finish_scores


@dataclass(eq=False)
class ChoiceRun:
    """A classification request's state: its choices' token ids and log-probability sums so far."""

    choices: list[str]
    choice_ids: list[list[int]]
    normalize: str
    sums: list[float] = field(default_factory=list)
    pending: int = 0  # children still scoring (flex backend)
    # (choice, index of its first token among the branch tokens) of each branched choice.
    branches: list[tuple[int, int]] = field(default_factory=list)

    def fill(self, out: CompletionOutput) -> None:
        """Put the label and the scores into ``out`` (a finished classification row)."""
        scores = finish_scores(self.sums, [len(c) for c in self.choice_ids], self.normalize)  # type: ignore[arg-type]
        out.text = None
        out.token_ids = []  # the branches are not output
        out.label = scores.label(self.choices)
        out.label_logprobs = scores.logprobs
        out.label_probs = scores.probs


@dataclass(eq=False)
class ChoiceChild:
    """A multi-token choice being scored against its parent's prompt KV (flex backend)."""

    parent: Request
    run: ChoiceRun
    index: int  # which choice

    def fill(self, out: CompletionOutput) -> None:  # children never produce an output row
        return None


def add_branches(req: Request, run: ChoiceRun) -> None:
    """Append every multi-token choice's tokens but the last to ``req`` as branches after its
    prompt, to be prefilled with it (nothing to do when every choice is one token)."""
    n = len(req.prompt_token_ids)
    starts: list[int] = []
    for j, ids in enumerate(run.choice_ids):
        if len(ids) > 1:
            run.branches.append((j, len(starts)))
            starts += [n + len(starts)] * (len(ids) - 1)
            req.token_ids += ids[:-1]
    if starts:
        req.branch_starts = starts
        req.num_logit_rows = 1 + len(starts)  # the prompt's last token, then every branch token
        req.max_total_len = len(req)


def plain_children(parent: Request, run: ChoiceRun, max_model_len: int, device: torch.device) -> list[Request]:
    """One child per multi-token choice of ``parent``: the prompt followed by the choice's tokens
    but the last, an ordinary sequence that can also be prefilled from scratch, asking for the
    logits at each of those choice tokens."""
    kids = []
    for j, ids in enumerate(run.choice_ids):
        if len(ids) > 1:
            child = Request(f"{parent.request_id}\x00choice{j}", parent.prompt_token_ids + ids[:-1],
                            SamplingParams(max_tokens=1), max_model_len, device, parent.adapter_id, parent.lora_slot)
            child.num_logit_rows = len(ids) - 1
            child.scoring = ChoiceChild(parent, run, j)
            kids.append(child)
    return kids


def score_step(items: list[tuple[Request, int]], logits: torch.Tensor) -> None:
    """Score every classification request of a step.

    ``items`` pairs each (a row, or a flex child) with its first row in the step's ``logits``
    [rows, vocab]. A row's rows are its prompt's last token's (every choice's first token), then
    its branch tokens' (the choices' later tokens); a child's are its choice tokens but the last.
    Each request's log-softmax runs on its own rows (a view: one [rows, vocab] temporary for the
    whole step would be tens of MB that a CPU allocator maps afresh every step), and the picked
    log-probabilities of the whole step are read back at once (one device sync, not one per row).
    """
    picked: list[torch.Tensor] = []
    owners: list[tuple[ChoiceRun, int]] = []
    for req, first in items:
        rows: list[int] = []
        tokens: list[int] = []
        if isinstance(req.scoring, ChoiceChild):
            run, parts, base = req.scoring.run, [(req.scoring.index, 0)], 0
        else:
            run, parts, base = req.scoring, req.scoring.branches, 1
            run.sums = [0.0] * len(run.choice_ids)
            for j, ids in enumerate(run.choice_ids):
                rows.append(0)
                tokens.append(ids[0])
                owners.append((run, j))
        for j, row in parts:
            later = run.choice_ids[j][1:]
            rows += range(base + row, base + row + len(later))
            tokens += later
            owners += [(run, j)] * len(later)
        if rows:
            lp = torch.log_softmax(logits[first:first + max(rows) + 1].float(), dim=-1)  # [rows, vocab]
            picked.append(lp[torch.tensor(rows, device=lp.device), torch.tensor(tokens, device=lp.device)])
    if not picked:
        return
    for (run, j), x in zip(owners, torch.cat(picked).double().tolist()):  # a choice's first token, then the rest in order
        run.sums[j] += x


def longest_choice(run: Optional[ChoiceRun]) -> int:
    """Tokens of the longest choice (0 without choices): the context a classification row needs
    beyond its prompt is one less than this."""
    return max((len(c) for c in run.choice_ids), default=0) if run is not None else 0
