"""Which requests run in the next step.

Each step is either a prefill (new requests' prompts, up to a token budget) or a decode (one
token for every running request). Prefill goes first whenever a request is waiting and a slot
and blocks are free, so a finished row's slot is refilled on the very next step. When a
decode step runs out of KV blocks, the youngest running request is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed later.
"""

from __future__ import annotations

from collections import deque

from batchgen.engine.kv_cache import BlockManager
from batchgen.engine.request import Request, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Request], bool]:
        """The requests of the next step and whether it is a prefill step."""
        batch: list[Request] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            req = self.waiting[0]
            # A lone request larger than the budget still runs (alone), or it would wait forever.
            if batch and len(req) > budget:
                break
            if not self.blocks.can_allocate(req):
                break
            self.waiting.popleft()
            self.blocks.allocate(req)
            req.status = Status.RUNNING
            budget -= len(req)
            batch.append(req)
        if batch:
            self.running.extend(batch)
            return batch, True

        batch = []
        for req in list(self.running):
            if req not in self.running:  # preempted below while making room for an older request
                continue
            while not self.blocks.can_append(req):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            else:
                self.blocks.may_append(req)
                batch.append(req)
        return batch, False

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
