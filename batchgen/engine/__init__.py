"""The continuous-batching engine: requests, scheduler, paged KV cache, model runner, loop.

One process, no Ray, no pyarrow: the pipeline wraps it.
"""

from batchgen.engine.engine import LLM
from batchgen.engine.request import CompletionOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "CompletionOutput"]
