"""``batchgen bench``: the engine against ``transformers`` generate on the same weights (see ``run``).

The modules form a tree over ``core`` and never import this package or each other in a circle:
``core`` (workload, timing, FLOPs, token check, report) <- ``systems`` (the engine, transformers),
``pipeline`` (``--pipeline``: the workload as Ray jobs), ``gpu`` (single-stream decode),
``matmul`` (the ``--cpu-matmul`` switch) <- ``run`` (options and ``run_bench``).
"""

from batchgen.bench.core import (BENCH_ARGS, QUICK_ARGS, RunResult, Workload, compare_tokens,
                                 linear_flops_per_token, make_workload, min_traffic_bytes, request_flops)
from batchgen.bench.run import add_bench_args, main, run_bench

__all__ = ["BENCH_ARGS", "QUICK_ARGS", "RunResult", "Workload", "add_bench_args", "compare_tokens",
           "linear_flops_per_token", "main", "make_workload", "min_traffic_bytes", "request_flops", "run_bench"]
