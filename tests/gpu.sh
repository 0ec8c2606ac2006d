#!/usr/bin/env bash
# Every GPU check of the project in one command, for a machine with an NVIDIA GPU where python3 has
# a CUDA build of PyTorch and cuda-python (the lent H100/H200 images have both; diffusers,
# polygraphy and onnx-graphsurgeon travel as wheels, see docs/gpu.md).
#
#   bash tests/gpu.sh            # logs and result JSON under $OUT (the device tool's folder) or ./gpu-out
#
# Steps, each logged to its own file and never stopping the next: GPU facts, the kernel build,
# the kernel's GPU tests (SD shapes, poisoned outputs, CUDA-graph replay, torch.compile/opcheck),
# the attention benchmark (JSON copied out), the GPU pipeline tests (torch fp16 fast path, CUDA
# graph) when diffusers imports, and the TensorRT tests when the real TensorRT is installed. Exit status: the
# number of steps that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
failed=0

step() {  # step NAME CMD...: run CMD, log to $out/NAME.log, count a failure
  local name=$1
  shift
  echo "== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then
    echo "   ok"
  else
    echo "   FAILED (rc $?), last lines:"
    failed=$((failed + 1))
  fi
  tail -n 15 "$out/$name.log" | sed 's/^/   | /'
}

has() { "$py" -c "import $1" >/dev/null 2>&1; }

step facts sh -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -n 2; \
  $py -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
step kernel_build "$py" -m kernels.build
step kernel_tests "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py
step attention_bench "$py" -m benchmarks.attention
# only what this run wrote, not results committed earlier
find benchmarks/results -name 'attention-*.json' -newer "$out/kernel_tests.log" -exec cp {} "$out/" \;
if has diffusers && has polygraphy && has onnx_graphsurgeon; then
  step pipeline_tests "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_pipeline.py
else
  echo "== pipeline_tests: skipped, diffusers / polygraphy / onnx_graphsurgeon do not import (docs/gpu.md)"
fi
if "$py" -c "from engine.backends.trt_backend import trt_available as a; raise SystemExit(not a())" 2>/dev/null; then
  step trt_tests "$py" -m pytest -q -m trt -p no:cacheprovider tests/
else
  echo "== trt_tests: skipped, TensorRT is not installed (tensorrt-stubs alone do not count)"
fi
echo "failed steps: $failed (logs in $out)"
exit "$failed"
