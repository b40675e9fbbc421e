"""Classification in the engine: score every choice against one prefill of the prompt.

A classification request (``SamplingParams.choices``) is prefilled like any other. Its
last-position logits give every choice's first-token log-probability; when every choice is one
token that is the whole answer and the request finishes in that same step. Otherwise the request
*forks*: one child per multi-token choice, holding the prompt and the choice's tokens but its
last. A child starts from the prompt's KV blocks (the full blocks shared, the partial last block
copied: ``BlockManager.fork``) and is prefilled in the next step like a request that continues a
cached prefix: its choice tokens in one go, with the logits at every one of them
(``Request.num_logit_rows``), which score the choice's later tokens. So a row costs its prompt's
prefill plus one more step for all its choices, however long they are, and the prompt is never
run again. A child that finds no free block for its fork waits in the queue like a new request
and prefills its prompt too (from the prefix cache where the prompt's blocks are still there).
The parent's reference to its blocks goes at the fork; the shared blocks themselves are freed
when the last child holding them finishes.

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
    """One multi-token choice, scored against its parent's prompt KV in one prefill."""

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
    """The child requests of ``parent``'s multi-token choices: each is the prompt followed by the
    choice's tokens but the last, and needs the logits at each of those tokens (see
    :func:`child_scores`)."""
    kids = []
    for j, ids in enumerate(run.choice_ids):
        if len(ids) < 2:
            continue
        child = Request(f"{parent.request_id}\x00choice{j}", parent.prompt_token_ids + ids[:-1],
                        SamplingParams(max_tokens=1), max_model_len, device, parent.adapter_id, parent.lora_slot)
        child.num_logit_rows = len(ids) - 1
        child.scoring = ChoiceChild(parent, run, j)
        kids.append(child)
    return kids


def child_scores(child: Request, logits: torch.Tensor) -> None:
    """Add the log-probabilities of the child's choice tokens after its first; ``logits``
    [len(choice) - 1, vocab] are those at the choice's tokens but the last, in order."""
    sc: ChoiceChild = child.scoring
    later = sc.run.choice_ids[sc.index][1:]
    lp = torch.log_softmax(logits.float(), dim=-1)  # [k - 1, vocab]
    picked = lp[torch.arange(len(later), device=lp.device), torch.tensor(later, device=lp.device)]
    sc.run.sums[sc.index] += float(picked.double().sum())


def longest_choice(run: Optional[ChoiceRun]) -> int:
    """Tokens of the longest choice (0 without choices): the context a classification row needs
    beyond its prompt is one less than this."""
    return max((len(c) for c in run.choice_ids), default=0) if run is not None else 0
