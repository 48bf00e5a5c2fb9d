#!/usr/bin/env bash
# The open issues' GPU checks in one device run (issue 23: CUDA graphs, the batch-invariant mode;
# issue 25: the graphed small-model step): the CUDA-only tests, then both benchmarks, all into $OUT.
#
# The device image has torch and triton but not diffusers: carry its wheel (see the device tool's
# README) and install it first, e.g. in the run's command:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   bash scripts/gpu_checks.sh
set -uo pipefail
out=${OUT:-results/gpu}
mkdir -p "$out"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/dlmcache/test_graphs.py tests/dlmcache/test_batch_invariant.py \
  tests/kernels/test_invariant_ops.py 2>&1 | tee "$out/tests.log"
python3 scripts/bench_graphs.py --out "$out/bench_graphs.json" 2>&1 | tee "$out/bench_graphs.log"
python3 scripts/bench_batch_invariant.py --out "$out/bench_batch_invariant.json" 2>&1 | tee "$out/bench_batch_invariant.log"
