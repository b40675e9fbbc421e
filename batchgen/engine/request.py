"""A request's parameters and its state as it moves through the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature == 0`` means greedy.

    ``seed`` fixes the request's own random stream: its draws never depend on which other
    requests share the batch. ``seed=None`` draws a fresh seed.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    truncate_prompt: bool = False  # too-long prompt: keep its last tokens instead of erroring
    # Structured output: (kind, value) with kind json_schema | regex | choice (engine/constraints.py).
    # Compiled by the engine with its tokenizer; a (kind, value) pair pickles, a compiled one does not.
    constraint: Optional[tuple[str, Any]] = None
    # Classification: score each of these strings as the prompt's continuation instead of
    # generating (engine/scoring.py has the definition); ``normalize`` is none | tokens.
    choices: Optional[list[str]] = None
    normalize: str = "none"
    adapter: Optional[str] = None  # LoRA adapter name (LLM(adapters=...)); None or "" = the base model

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.constraint is not None:
            if not (isinstance(self.constraint, (tuple, list)) and len(self.constraint) == 2):
                raise ValueError(f"constraint must be a (kind, value) pair, got {self.constraint!r}")
            self.constraint = (str(self.constraint[0]), self.constraint[1])
        if self.choices is not None:
            if isinstance(self.choices, str) or not self.choices or not all(isinstance(c, str) and c for c in self.choices):
                raise ValueError(f"choices must be a non-empty list of non-empty strings, got {self.choices!r}")
            if self.constraint is not None:
                raise ValueError("choices (classification) and constraint (structured output) exclude each other")
            self.choices = list(self.choices)
        if self.normalize not in ("none", "tokens"):
            raise ValueError(f"normalize must be none or tokens, got {self.normalize!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class CompletionOutput:
    """The result of one request. ``finish_reason`` is ``stop``, ``length`` or ``error``."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: Optional[str]
    finish_reason: str
    error: Optional[str] = None
    logprobs: Optional[list[float]] = None
    #: Prompt tokens that ``truncate_prompt`` dropped from the front (0: the prompt fit).
    truncated_tokens: int = 0
    # Classification rows (``SamplingParams.choices``): the best choice, each choice's score
    # (summed or, with normalize: tokens, mean token log-prob) and the softmax over the scores.
    label: Optional[str] = None
    label_logprobs: Optional[list[float]] = None
    label_probs: Optional[list[float]] = None

    @property
    def ok(self) -> bool:
        return self.finish_reason != "error"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One sequence's mutable state: its tokens, its KV blocks and its random stream."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_model_len: int, device: torch.device, adapter_id: Optional[str] = None,
                 lora_slot: int = -1) -> None:
        self.request_id = request_id
        self.params = params
        # Which weights this request runs with: the adapter's name (None = base) is part of every
        # prefix-cache block hash (the same tokens under another adapter have other K/V), and
        # its slot in the engine's LoraStack (-1 = no unmerged update) selects the per-row update.
        self.adapter_id = adapter_id
        self.lora_slot = lora_slot
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt + generated so far
        self.status = Status.WAITING
        self.block_table: list[int] = []
        # Tokens whose K/V are in the cache. Reset to 0 on preemption (the prompt and what was
        # generated so far are recomputed in one prefill when the request is rescheduled).
        self.num_cached = 0
        # Content hashes of the full blocks of token_ids so far (BlockManager's prefix index).
        self.block_hashes: list[bytes] = []
        # Stop at the context length even if max_tokens asks for more.
        self.max_total_len = min(len(prompt_token_ids) + params.max_tokens, max_model_len)
        self.logprobs: list[float] = []
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None
        self.text: Optional[str] = None  # set at the end when the model has a tokenizer
        self.truncated_tokens = 0  # prompt tokens truncate_prompt dropped (set by the engine)
        self.generator: Optional[torch.Generator] = None
        self.constraint_state: Any = None  # a ConstraintState for a constrained row
        self.scoring: Any = None  # classification: a ChoiceRun (parent) or ChoiceChild (engine/classify.py)
        # The last positions whose logits a prefill must return: 1 (the next token's), or one per
        # choice token a classification row scores (never read from the prefix cache).
        self.num_logit_rows = 1
        # A classification row's choices side by side after its prompt (``engine/classify.py``):
        # for each token past the prompt, the index where its branch starts. Such a request is
        # not one sequence: only its prompt is (``sequence_len``).
        self.branch_starts: Optional[list[int]] = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def sequence_len(self) -> int:
        """Its leading tokens that are one sequence, which other requests may share (the prefix
        cache indexes blocks within them): all of them, or the prompt of a row with branches."""
        return len(self) if self.branch_starts is None else self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def to_output(self) -> CompletionOutput:
        out = CompletionOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=self.output_token_ids,
            text=self.text,
            finish_reason=self.finish_reason or "error",
            error=self.error,
            logprobs=list(self.logprobs) if self.params.logprobs else None,
            truncated_tokens=self.truncated_tokens,
        )
        if self.scoring is not None and self.finish_reason != "error":
            self.scoring.fill(out)
        return out
