"""The systems under test: batchgen's engine and ``transformers`` generate, on the same weights.

A system is anything with ``run() -> tokens per request`` and ``info() -> dict``; the core
times it (:func:`batchgen.bench.core.timed_run`) and compares the tokens.
"""

from __future__ import annotations

import tempfile
from typing import Any, Optional

import torch

from batchgen.bench.core import MAX_NUM_SEQS, Workload
from batchgen.model import Transformer


def build_hf(model: Transformer, device: torch.device, dtype: torch.dtype) -> Any:
    """``LlamaForCausalLM`` holding exactly ``model``'s weights (via batchgen's HF writer)."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from batchgen.checkpoint_save import save_hf

    hf_logging.disable_progress_bar()  # a progress bar on stderr for a local file is noise
    with tempfile.TemporaryDirectory(prefix="batchgen-bench-") as tmp:
        save_hf(model.state_dict(), model.args, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp)
    hf = hf.to(device=device, dtype=dtype).eval()
    # ignore_eos: HF must run every row to max_new_tokens, as the engine does.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


class EngineSystem:
    """batchgen's engine: all requests submitted at once, one continuous batch.

    A system under test is anything with ``run() -> tokens per request`` and ``info() -> dict``.
    """

    def __init__(self, model: Transformer, wl: Workload, device: torch.device,
                 max_num_seqs: int = MAX_NUM_SEQS, cuda_graphs: Optional[bool] = None,
                 compile_decode: bool = False, attention_backend: str = "default",
                 prefix_caching: bool = True) -> None:
        from batchgen.engine import LLM, SamplingParams

        self.model, self.wl, self.compile_decode = model, wl, compile_decode
        # KV is sized for max_num_seqs of the workload's longest request (the jobs' default).
        self.llm = LLM(model=model, device=str(device), max_model_len=wl.max_total_len,
                       max_num_seqs=max_num_seqs, cuda_graphs=cuda_graphs, compile_decode=compile_decode,
                       attention_backend=attention_backend, prefix_caching=prefix_caching)
        self.attention_backend = attention_backend
        self.params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in wl.max_tokens]
        # Warm-up: first calls pay for allocator growth and kernel selection. With graphs, the
        # whole workload once, so that every graph it needs is recorded before the timing.
        if self.llm.runner.graphs is not None:
            self.run()
        else:
            warm = wl.prompts[:4]
            self.llm.generate(warm, [SamplingParams(max_tokens=4, ignore_eos=True)] * len(warm))

    def run(self) -> list[list[int]]:
        # Every run starts cold: blocks cached by the warm-up or an earlier run would be free hits.
        self.llm.blocks.clear_prefix_cache()
        s = self.llm.scheduler
        before = (s.num_prefill_tokens_submitted, s.num_prefill_tokens_computed)
        tokens = [o.token_ids for o in self.llm.generate(self.wl.prompts, self.params)]
        self.prefill_submitted = s.num_prefill_tokens_submitted - before[0]
        self.prefill_computed = s.num_prefill_tokens_computed - before[1]
        return tokens

    def info(self) -> dict[str, Any]:
        return {"prefix_caching": self.llm.blocks.prefix_caching,
                "prefill_tokens_submitted": getattr(self, "prefill_submitted", None),
                "prefill_tokens_computed": getattr(self, "prefill_computed", None),
                "kv_cache_bytes": self.llm.kv_cache.nbytes, "kv_cache_tokens": self.llm.kv_cache_tokens,
                "preemptions": self.llm.scheduler.num_preemptions, "cuda_graphs": self.llm.runner.graphs is not None,
                "compile_decode": self.llm.runner.graphs is not None and self.compile_decode,
                "attention_backend": self.attention_backend}


class HFSystem:
    """``generate`` in input-order batches, left-padded, each to its batch's longest request."""

    def __init__(self, hf: Any, wl: Workload, batch_size: int, device: torch.device) -> None:
        self.hf, self.wl, self.batch_size, self.device = hf, wl, batch_size, device
        if device.type == "cuda":
            # Every new KV length is a new attention shape, which costs a kernel plan the first
            # time: on an H100 a first run takes 11.5 s, later ones 2.3-3.0 s.
            self.run()
        else:
            self._batch(wl.prompts[:2], 4)

    def _batch(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = self.hf.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               do_sample=False, max_new_tokens=max_new)
        return out[:, width:].tolist()

    def run(self) -> list[list[int]]:
        tokens: list[list[int]] = []
        for s in range(0, len(self.wl.prompts), self.batch_size):
            want = self.wl.max_tokens[s:s + self.batch_size]
            rows = self._batch(self.wl.prompts[s:s + self.batch_size], max(want))
            tokens.extend(row[:n] for row, n in zip(rows, want))  # only what each asked for
        return tokens

    def info(self) -> dict[str, Any]:
        return {"hf_attn_implementation": self.hf.config._attn_implementation}
