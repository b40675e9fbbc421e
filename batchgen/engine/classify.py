"""Classification in the engine: score every choice against one prefill of the prompt.

A classification request (``SamplingParams.choices``) is prefilled like any other. Its
last-position logits give every choice's first-token log-probability; when every choice is one
token that is the whole answer and the request finishes in that same step. Otherwise the request
*forks*: one child per multi-token choice, each starting from the prompt's KV blocks (the full
blocks shared, the partial last block copied: ``BlockManager.fork``), fed its choice's tokens as
decode rows (teacher forcing: the next token is the choice's, not a sampled one) while the
log-probability of each is collected. The prompt is never run again, except when a child is
preempted (its blocks go; a later prefill recomputes its prompt and choice prefix, and the
log-probabilities after it stay the same). The parent's reference to its blocks goes at the fork;
the shared blocks themselves are freed when the last child holding them finishes.

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
    pending: int = 0  # children still scoring
    children: list[Request] = field(default_factory=list)

    def fill(self, out: CompletionOutput) -> None:
        """Put the label and the scores into ``out`` (a finished classification row)."""
        scores = finish_scores(self.sums, [len(c) for c in self.choice_ids], self.normalize)  # type: ignore[arg-type]
        out.text = None
        out.label = scores.label(self.choices)
        out.label_logprobs = scores.logprobs
        out.label_probs = scores.probs


@dataclass(eq=False)
class ChoiceChild:
    """One multi-token choice being teacher-forced against its parent's prompt KV."""

    parent: Request
    run: ChoiceRun
    index: int  # which choice

    def fill(self, out: CompletionOutput) -> None:  # children never produce an output row
        return None


def first_token_logprobs(run: ChoiceRun, logits: torch.Tensor) -> None:
    """Set every choice's sum to its first token's log-probability at the prompt's last position."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    first = lp[torch.tensor([ids[0] for ids in run.choice_ids], device=lp.device)].double().tolist()
    run.sums = [float(x) for x in first]


def make_children(parent: Request, run: ChoiceRun, max_model_len: int, device: torch.device) -> list[Request]:
    """The child requests of ``parent``'s multi-token choices: each continues the prompt with the
    choice's first token, and will be fed the rest (see :func:`child_step`)."""
    kids = []
    for j, ids in enumerate(run.choice_ids):
        if len(ids) < 2:
            continue
        child = Request(f"{parent.request_id}\x00choice{j}", parent.prompt_token_ids + [ids[0]],
                        SamplingParams(max_tokens=len(ids) - 1), max_model_len, device, parent.adapter_id)
        child.scoring = ChoiceChild(parent, run, j)
        kids.append(child)
    return kids


def child_step(child: Request, logits: torch.Tensor) -> bool:
    """Add the log-probability of the child's next choice token (after ``logits``) and feed that
    token; True when the choice is fully scored."""
    sc: ChoiceChild = child.scoring
    ids = sc.run.choice_ids[sc.index]
    k = len(child) - len(sc.parent.prompt_token_ids)  # choice tokens already in the child
    lp = torch.log_softmax(logits.float(), dim=-1)
    sc.run.sums[sc.index] += float(lp[ids[k]].double())
    child.token_ids.append(ids[k])
    return k + 1 == len(ids)


def longest_choice(run: Optional[ChoiceRun]) -> int:
    """Tokens of the longest choice (0 without choices): the context a classification row needs
    beyond its prompt is one less than this."""
    return max((len(c) for c in run.choice_ids), default=0) if run is not None else 0
