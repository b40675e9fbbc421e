"""Which requests run in the next step.

Each step decodes one token for every running request and, in the same batch, prefills the
prompts of waiting requests while a slot, KV blocks and the prefill token budget allow: the
linear layers then run once over both, and a finished row's slot is refilled on the very next
step. Requests that already hold their blocks (a classification row's forked children on the
flex backend, ``add_ready``) are prefilled first, ahead of the queue. With prefix caching, a waiting request's
cached prefix blocks are shared and only the rest of it is prefilled (and counted against the
token budget). When a decode runs out of KV blocks, the youngest running request is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from typing import Collection

from batchgen.engine.kv_cache import BlockManager
from batchgen.engine.request import Request, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests whose blocks are already allocated and whose uncached tokens the next step
        # prefills (forked classification children, flex): they need no admission, only a slot.
        self.ready: deque[Request] = deque()
        self.num_preemptions = 0
        # Prompt (and recomputed) tokens admitted, and how many of them were prefilled rather
        # than read from the prefix cache.
        self.num_prefill_tokens_submitted = 0
        self.num_prefill_tokens_computed = 0
        # Admission waits a step for a request whose prefix another admitted request is about to
        # prefill (rows of a template arrive together): one extra step instead of every row of
        # the batch computing the prefix again. See bench/NOTES.md, "Prefix caching".
        self.wait_for_shared_prefix = True

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def add_ready(self, req: Request) -> None:
        """Queue a request that already holds its blocks (``req.num_cached`` of its tokens in
        them) for the next prefill slot."""
        req.status = Status.WAITING
        self.ready.append(req)

    @property
    def holding(self) -> list[Request]:
        """Every request that holds KV blocks: the running ones and the ready ones."""
        return self.running + list(self.ready)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.ready)

    def schedule(self) -> tuple[list[Request], list[Request]]:
        """The next step: the running requests to decode, then the waiting ones to prefill."""
        decode: list[Request] = []
        preempted = False
        for req in list(self.running):
            if req not in self.running:  # preempted below while making room for an older request
                continue
            while not self.blocks.can_append(req):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                self.blocks.may_append(req)
                decode.append(req)

        prefill: list[Request] = []
        # Ready requests hold their blocks already: only a slot is needed, and they finish in
        # this step, so they go first and regardless of the token budget.
        while self.ready and len(self.running) + len(prefill) < self.max_num_seqs:
            req = self.ready.popleft()
            req.status = Status.RUNNING
            self.num_prefill_tokens_computed += len(req) - req.num_cached
            prefill.append(req)
        # Right after a preemption the cache is full: admitting would only preempt again.
        budget = 0 if preempted else self.max_num_batched_tokens - sum(len(r) - r.num_cached for r in prefill)
        pending: set[bytes] = set()
        while self.waiting and len(self.running) + len(prefill) < self.max_num_seqs:
            req = self.waiting[0]
            hits = self.blocks.lookup(req)
            if pending and self._shares_pending(req, len(hits), pending):
                break  # its prefix is being computed in this step: next step it is a cache hit
            # Only the tokens past the cached prefix are computed, and count against the budget.
            new_tokens = len(req) - len(hits) * self.blocks.block_size
            # A lone request larger than the budget still runs, or it would wait forever.
            if new_tokens > budget and (prefill or decode or preempted):
                break
            if not self.blocks.can_allocate(req):
                break
            self.waiting.popleft()
            self.blocks.allocate(req)
            req.status = Status.RUNNING
            budget -= len(req) - req.num_cached
            self.num_prefill_tokens_submitted += len(req)
            self.num_prefill_tokens_computed += len(req) - req.num_cached
            prefill.append(req)
            if self.wait_for_shared_prefix and self.blocks.prefix_caching:
                # The full blocks this prefill computes become cached after the step.
                pending.update(req.block_hashes[len(hits):(len(req) - 1) // self.blocks.block_size])
        self.running.extend(prefill)
        return decode, prefill

    def _shares_pending(self, req: Request, num_hits: int, pending: set[bytes]) -> bool:
        """Whether ``req``'s first uncached full block is one a prefill of this step computes."""
        hashes = req.block_hashes  # lookup() hashed every full block but the last token's
        return num_hits < len(hashes) and hashes[num_hits] in pending

    def _preempt(self, req: Request) -> None:
        self.num_preemptions += 1
        self.running.remove(req)
        self.blocks.release(req)
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Release a finished request's slot and blocks."""
        req.status = Status.FINISHED
        if req in self.running:
            self.running.remove(req)
        self.blocks.release(req)

    def abort(self, request_ids: Collection[str]) -> None:
        """Drop the waiting and running requests with these ids and free their blocks."""
        for req in [r for r in self.holding + list(self.waiting) if r.request_id in request_ids]:
            self.finish(req)
        self.waiting = deque(r for r in self.waiting if r.request_id not in request_ids)
        self.ready = deque(r for r in self.ready if r.request_id not in request_ids)

    def abort_all(self) -> None:
        """Drop every waiting, ready and running request and free their blocks."""
        for req in self.holding + list(self.waiting):
            self.finish(req)
        self.waiting.clear()
        self.ready.clear()
