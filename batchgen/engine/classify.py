"""Classification in the engine: score every choice against one prefill of the prompt.

A classification request (``SamplingParams.choices``) is prefilled like any other. Its
last-position logits give every choice's first-token log-probability; when every choice is one
token that is the whole answer and the request finishes in that same step. Otherwise the request
*forks* one child that starts from the prompt's KV blocks (the full blocks shared, the partial
last block copied: ``BlockManager.fork``) and holds every multi-token choice's tokens but its
last side by side, as branches after the prompt. The next step prefills the child like a request
continuing a cached prefix, with two twists: each branch's positions start right after the
prompt, and each branch token sees the prompt and its own branch only
(``AttentionMetadata.ctx_branch_starts``). The logits at every branch token
(``Request.num_logit_rows``) score the choices' later tokens. So a row costs its prompt's prefill
plus one step, whatever its choices, and the prompt is never run again.

Where a branched child cannot be used (no free block for the fork, or the flex backend, whose
masks know no branches) each multi-token choice gets a child of its own that is one plain
sequence, the prompt then the choice's tokens but the last; without blocks it waits in the queue
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

    def fill(self, out: CompletionOutput) -> None:
        """Put the label and the scores into ``out`` (a finished classification row)."""
        scores = finish_scores(self.sums, [len(c) for c in self.choice_ids], self.normalize)  # type: ignore[arg-type]
        out.text = None
        out.label = scores.label(self.choices)
        out.label_logprobs = scores.logprobs
        out.label_probs = scores.probs


@dataclass(eq=False)
class ChoiceChild:
    """Multi-token choices being scored against their parent's prompt KV in one prefill:
    ``parts`` lists ``(choice, first logits row)`` of each choice the child holds."""

    parent: Request
    run: ChoiceRun
    parts: list[tuple[int, int]]

    def fill(self, out: CompletionOutput) -> None:  # children never produce an output row
        return None


def first_token_logprobs(run: ChoiceRun, logits: torch.Tensor) -> None:
    """Set every choice's sum to its first token's log-probability at the prompt's last position."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    first = lp[torch.tensor([ids[0] for ids in run.choice_ids], device=lp.device)].double().tolist()
    run.sums = [float(x) for x in first]


def _child(parent: Request, run: ChoiceRun, tag: str, choices: list[int], max_model_len: int,
           device: torch.device) -> Request:
    prompt = parent.prompt_token_ids
    tokens, parts = list(prompt), []
    for j in choices:
        parts.append((j, len(tokens) - len(prompt)))
        tokens += run.choice_ids[j][:-1]
    child = Request(f"{parent.request_id}\x00{tag}", tokens, SamplingParams(max_tokens=1), max_model_len, device,
                    parent.adapter_id, parent.lora_slot)
    child.num_logit_rows = len(tokens) - len(prompt)
    child.scoring = ChoiceChild(parent, run, parts)
    return child


def branched_child(parent: Request, run: ChoiceRun, max_model_len: int, device: torch.device) -> Optional[Request]:
    """One child holding every multi-token choice of ``parent`` as a branch after its prompt (None
    when every choice is one token): prefill it only against the forked prompt KV."""
    multi = [j for j, ids in enumerate(run.choice_ids) if len(ids) > 1]
    if not multi:
        return None
    child = _child(parent, run, "choices", multi, max_model_len, device)
    n = len(parent.prompt_token_ids)
    child.branch_starts = [n + off for j, off in child.scoring.parts for _ in run.choice_ids[j][:-1]]
    return child


def plain_children(parent: Request, run: ChoiceRun, max_model_len: int, device: torch.device) -> list[Request]:
    """One child per multi-token choice of ``parent``: the prompt followed by the choice's tokens
    but the last, an ordinary sequence that can also be prefilled from scratch."""
    return [_child(parent, run, f"choice{j}", [j], max_model_len, device)
            for j, ids in enumerate(run.choice_ids) if len(ids) > 1]


def child_scores(child: Request, logits: torch.Tensor) -> None:
    """Add the log-probabilities of the child's choices' tokens after their first; ``logits``
    [num_logit_rows, vocab] are those at the child's tokens past the prompt, in order."""
    sc: ChoiceChild = child.scoring
    rows, tokens, owner = [], [], []
    for j, row in sc.parts:
        later = sc.run.choice_ids[j][1:]
        rows += range(row, row + len(later))
        tokens += later
        owner += [j] * len(later)
    lp = torch.log_softmax(logits.float(), dim=-1)  # [rows, vocab]
    picked = lp[torch.tensor(rows, device=lp.device), torch.tensor(tokens, device=lp.device)].double().tolist()
    for j, x in zip(owner, picked):  # one read back for all the child's choices
        sc.run.sums[j] += x


def longest_choice(run: Optional[ChoiceRun]) -> int:
    """Tokens of the longest choice (0 without choices): the context a classification row needs
    beyond its prompt is one less than this."""
    return max((len(c) for c in run.choice_ids), default=0) if run is not None else 0
