#!/usr/bin/env bash
# Issue 22's GPU check (and issue 20's classification bench), in one device call (bench/NOTES.md, "GPU runbook for issue 22"):
#   run(command="bash bench/gpu_issue22.sh", timeout_s=600)   after `cp -r ../shared shared` here once.
# Every stage has its own time box, so that a slow stage costs only itself; all stages together
# stay under ~9 minutes (plus the machine's start). Results land in $OUT (or ./issue22-out without one).
set -u
OUT=${OUT:-issue22-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stage() {  # stage NAME SECONDS COMMAND...: run with a time box, log to $OUT/NAME.log, never stop the script
    local name=$1 box=$2; shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$box" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: rc=$? in $((SECONDS - t0)) s (box $box s)" | tee -a "$OUT/stages.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, sys; print(torch.__version__, sys.version)" >> "$OUT/gpu.txt" 2>&1
# 1. Correctness on the GPU: the existing cases plus the flex backend, eager and replayed (fp32, bf16).
stage test_gpu 100 python3 -m pytest -q -x tests/test_gpu.py
# 2. 7B decode step time against its bandwidth bound, flex then default, 16/64/128 rows x 120/1000
#    context (points whose KV cache does not fit are skipped and say so: 128 x 1000 wants an H200).
stage steps 200 python3 bench/gpu_issue22.py --json
grep -h '^{"rows"' "$OUT/steps.log" > "$OUT/steps.jsonl" 2>/dev/null
# 2b. Issue 20's open item: classification against 4-token generation (and 1-token, the floor)
#     on the same rows, bf16 (bench/NOTES.md, "Classification").
stage classify 60 sh -c "python3 -m batchgen bench --classify --repeat 3 --json > $OUT/classify.json"
# 3. The issue's 64-request bench against transformers on the same GPU, with the 7B single stream
#    (--gpu-extras), once per backend.
stage bench_flex 100 sh -c "python3 -m batchgen bench --json --repeat 2 --gpu-extras --attention-backend flex > $OUT/bench-flex.json"
stage bench_default 80 sh -c "python3 -m batchgen bench --json --repeat 2 --gpu-extras --attention-backend default > $OUT/bench-default.json"
cat "$OUT/stages.txt"
