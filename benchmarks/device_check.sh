#!/usr/bin/env bash
# The accelerator check, in one run (what was run on a lent H100/H200; see the README):
# the precision and measure tests on the GPU (float32 against float64 computed there too),
# then the grid benchmarks (with W1 at n=10000 and 50 layers) and the core benchmarks.
#
#     bash benchmarks/device_check.sh [OUTDIR]
set -u
out=${1:-/tmp/jaxsim-device}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="--xla_cpu_enable_fast_math=false"
nvidia-smi -L
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
tests() {  # name, seconds, files...
    local name=$1 limit=$2; shift 2
    timeout "$limit" python3 -m pytest -o addopts="" -p no:cacheprovider -v -n 8 -m "not slow" \
        -k "not sharded and not deadlock" "$@" > "$out/$name.log" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$out/$name.log" | tail -25
}
tests precision 120 tests/test_precision.py
tests measures 120 tests/test_canonical.py tests/test_kernel.py tests/test_geometry.py tests/test_grid.py
timeout 150 python3 benchmarks/grids.py --skip-notebook --large 10000 50 2>&1 | tee "$out/grids.log"
timeout 120 python3 benchmarks/core.py 2>&1 | tee "$out/core.log"
