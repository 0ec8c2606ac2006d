#!/usr/bin/env bash
# Every GPU check of the project in one command, for a machine with an NVIDIA GPU where python3 has
# a CUDA build of PyTorch and cuda-python (the lent H100/H200 images have both; diffusers,
# polygraphy and onnx-graphsurgeon travel as wheels, see docs/gpu.md).
#
#   bash tests/gpu.sh            # logs and result JSON under $OUT (the device tool's folder) or ./gpu-out
#
# First the driver / nvcc / torch versions, with a one-line stop where the driver is older than the
# CUDA of the nvcc that builds the kernels (its PTX would not load) or of torch. Then steps, each logged
# to its own file and never stopping the next: GPU facts, the kernel build, the kernel's GPU tests (SD
# shapes, edge cases, poisoned outputs, bitwise determinism over 20 launches, non-contiguous and
# misaligned inputs, a busy side stream, CUDA-graph replay, torch.compile/opcheck), compute-sanitizer's
# memcheck / racecheck / synccheck / initcheck on small launches (tests/kernel_sanitize.py; skipped
# with a message where compute-sanitizer is absent), the attention benchmark (JSON copied out), the
# GPU pipeline tests (torch fp16 fast path, CUDA graph) when diffusers imports, and the TensorRT tests
# when the real TensorRT is installed. Exit status: the number of steps that failed (1 after a stop).
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

version_lt() {  # version_lt A B: A < B as dotted versions (13.0 < 13.1 < 13.10)
  [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" = "$1" ]
}

stop() {  # stop MESSAGE: one line, then exit 1 (nothing after this point could work)
  echo "STOP: $*" | tee "$out/stop.txt"
  exit 1
}

# ---- versions first --------------------------------------------------------------------------------
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
driver_cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' | head -n 1)
nvcc=$("$py" -c 'from kernels.build import find_nvcc; print(find_nvcc())' 2>/dev/null)
nvcc_cuda=
if [ -n "$nvcc" ]; then
  nvcc_cuda=$("$nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p' | head -n 1)
fi
torch_cuda=$("$py" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)
torch_version=$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null)
echo "driver ${driver:-none} (CUDA ${driver_cuda:-?}) | nvcc ${nvcc:-none} (CUDA ${nvcc_cuda:-?})" \
  "| torch ${torch_version:-not importable} (CUDA ${torch_cuda:-none})" | tee "$out/versions.txt"
[ -n "$driver_cuda" ] || stop "no NVIDIA driver: nvidia-smi is missing or reports no CUDA version; run this on a GPU machine"
if [ -n "$nvcc_cuda" ] && version_lt "$driver_cuda" "$nvcc_cuda"; then
  stop "driver $driver supports CUDA $driver_cuda, older than $nvcc (CUDA $nvcc_cuda), whose PTX it cannot load; update the driver or set CUDA_HOME to a toolkit <= $driver_cuda"
fi
if [ -n "$torch_cuda" ] && [ "${torch_cuda%%.*}" -gt "${driver_cuda%%.*}" ]; then
  stop "driver $driver supports CUDA $driver_cuda, older than torch $torch_version's CUDA $torch_cuda; install a torch built for CUDA ${driver_cuda%%.*}.x or update the driver"
fi
[ -n "$nvcc" ] || echo "   (no nvcc found: kernel_build fails unless the kernels are already built)"

# ---- steps ----------------------------------------------------------------------------------------
step facts sh -c "nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv; \
  $py -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
step kernel_build "$py" -m kernels.build
step kernel_tests "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_kernels_gpu.py

sanitizer=$(command -v compute-sanitizer || true)
for cand in ${nvcc:+"$(dirname "$nvcc")/compute-sanitizer"} ${CUDA_HOME:+"$CUDA_HOME/bin/compute-sanitizer"} \
  /usr/local/cuda/bin/compute-sanitizer; do
  if [ -z "$sanitizer" ] && [ -x "$cand" ]; then sanitizer=$cand; fi
done
if [ -n "$sanitizer" ]; then
  for tool in memcheck racecheck synccheck initcheck; do
    # API errors are cuda-python probing newer driver entry points: noise, and our own failures raise anyway
    step "sanitize_$tool" "$sanitizer" --tool "$tool" --report-api-errors no --error-exitcode 1 \
      "$py" -m tests.kernel_sanitize
  done
else
  echo "== sanitize: skipped, compute-sanitizer not found (PATH, next to nvcc, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
fi

step attention_bench "$py" -m benchmarks.attention
# only what this run wrote, not results committed earlier
find benchmarks/results -name '*-attention-*.json' -newer "$out/kernel_tests.log" -exec cp {} "$out/" \;
if has diffusers && has polygraphy && has onnx_graphsurgeon; then
  step pipeline_tests "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_pipeline.py tests/test_continuous_graphs.py
else
  echo "== pipeline_tests: skipped, diffusers / polygraphy / onnx_graphsurgeon do not import (docs/gpu.md)"
fi
if has diffusers; then  # the common-schema suite on the GPU: pipeline per backend, UNet step, attention, build cost
  step bench_run "$py" -m benchmarks.run --suite quick --device cuda --out "$out"
  # feature caching and the tiny decoder on the GPU: the CPU suite's script, GPU backend (TensorRT where installed)
  step feature_cache_bench "$py" -m benchmarks.feature_cache --backend auto --precision fp16 --sizes 512 1024
  find benchmarks/results -name '*-feature-cache-*.json' -newer "$out/bench_run.log" -exec cp {} "$out/" \;
else
  echo "== bench_run: skipped, diffusers does not import (docs/gpu.md)"
fi
trt_probe='
try:
    from engine.backends.tensorrt.build import trt_available
except ImportError:  # the layout before engine/backends/tensorrt/
    from engine.backends.trt_backend import trt_available
raise SystemExit(not trt_available())'
if "$py" -c "$trt_probe" 2>/dev/null; then
  step trt_tests "$py" -m pytest -q -m trt -p no:cacheprovider tests/
else
  echo "== trt_tests: skipped, TensorRT is not installed (tensorrt-stubs alone do not count)"
fi
echo "failed steps: $failed (logs in $out)"
exit "$failed"
