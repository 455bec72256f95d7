#!/usr/bin/env bash
# The GPU checks of the project in one run (about 9 minutes on one H200):
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# 1. env.txt: the GPU, the driver and the Python packages in use.
# 2. suite.log: the test suite on the GPU (pytest-xdist, SUITE_WORKERS
#    processes, cut at SUITE_SECONDS; SUITE_TESTS picks the files). Float32
#    matmuls at 'highest' precision, since the tests compare float32 results
#    to 1e-5 and XLA:GPU would otherwise use TF32. The cuDNN attention tests
#    (tests/test_attention.py, skipped off GPU) run first, alone.
# 3. bf16_train.log: `tiny` trained in bfloat16 with attention_impl 'auto'
#    (cuDNN), beside the suite, then evaluated on the test split: its
#    validation losses are comparable with the float32 figures of the preset's
#    docstring.
# 4. bench.jsonl: `benchmarks.train_step` for the `1b` preset at batch
#    BENCH_BATCH, once per line of BENCH_VARIANTS (extra config overrides),
#    alone on the machine with 95% of its memory for JAX, each line a JSON
#    report with its MFU against the GPU's dense bf16 peak (train/mfu.py) and
#    a profile of BENCH_PROFILE_STEPS more steps: the device's op time by
#    category (matmul, attention, fusion, ...) and the top ops
#    (benchmarks/profile.py).
# 5. attention.json: one layer's attention forward + backward at that shape
#    with 'xla', 'cudnn' (the packing mask as a bias), 'cudnn_causal' (no
#    mask) and 'cudnn_packed' (cuDNN's packed layout) (benchmarks/attention.py).
#
# Runs from the repository root with the python3 on PATH; needs prepared data
# at runs/data (python -m data_pipeline --config=configs/data.py:stdlib
# --workdir=runs/data) for step 3. A GPU image with jax, flax, optax and orbax
# but not the data packages needs these too (on 2026-12-04 they went over as
# cp312 wheels, `pip install --no-index --no-deps`): ml_collections, grain,
# array_record, portpicker, tensorflow-datasets, tensorflow-metadata,
# googleapis-common-protos, dm-tree, immutabledict, promise, simple-parsing,
# docstring_parser, termcolor, toml, tensorboardX (the versions of
# requirements.lock).
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # the suite and training share the GPU
SUITE_WORKERS=${SUITE_WORKERS:-8}
SUITE_SECONDS=${SUITE_SECONDS:-300}
SUITE_TESTS=${SUITE_TESTS:-tests}
BENCH_BATCH=${BENCH_BATCH:-16}
BENCH_PROFILE_STEPS=${BENCH_PROFILE_STEPS:-2}
BENCH_VARIANTS=${BENCH_VARIANTS:-"
--config.model.remat_policy=none
--config.model.remat_policy=none --config.model.attention_impl=cudnn_packed
--config.model.remat_policy=none --config.model.attention_impl=cudnn_packed --documents_per_row=4
--config.model.remat_policy=full --config.model.attention_impl=cudnn_packed"}
start=$SECONDS

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import sys, jax, jaxlib, flax, optax, orbax.checkpoint as oc; print(sys.version);
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "orbax", oc.__version__); print(jax.devices())'
  python3 -m pip list 2>/dev/null | grep -iE '^(nvidia-cudnn|jax|torch |transformers|grain|pytest)'
} > "$out/env.txt" 2>&1

# Bitwise resumes (tests/test_loop.py, test_lora.py) need deterministic GPU
# reductions (the embedding gradient is a scatter-add); the suite gets the
# flag where this XLA knows it.
deterministic=--xla_gpu_deterministic_ops=true
if ! XLA_FLAGS=$deterministic python3 -c 'import jax; jax.numpy.zeros(1).block_until_ready()' \
    > /dev/null 2>&1; then
  deterministic=
fi
echo "suite XLA_FLAGS: ${deterministic:-none}" >> "$out/env.txt"

# 2 + 3: the suite (cuDNN tests first, alone) with the bf16 run beside it.
(
  export XLA_FLAGS="${XLA_FLAGS:-} $deterministic" JAX_DEFAULT_MATMUL_PRECISION=highest
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k cudnn -rA 2>&1
  echo "== cudnn tests exit $?"
  # The rest: the cuDNN tests ran above.
  timeout "$SUITE_SECONDS" python3 -m pytest -v -p no:cacheprovider -n "$SUITE_WORKERS" \
    --timeout=240 -rfE -k 'not cudnn' $SUITE_TESTS 2>&1
  echo "== suite exit $? (124: cut at ${SUITE_SECONDS}s)"
) > "$out/suite.log" &
suite=$!
(
  run=$(mktemp -d)/bf16
  timeout 400 python3 -m train --config=configs/pretrain.py:tiny --workdir="$run" \
    --config.model.dtype=bfloat16 --config.model.attention_impl=auto 2>&1
  echo "== train exit $?"
  timeout 120 python3 -m train.evaluate --workdir="$run" --split=test 2>&1
  echo "== evaluate exit $?"
) > "$out/bf16_train.log" &
train=$!
wait $suite $train
echo "suite + bf16 training: $((SECONDS - start)) s" >> "$out/env.txt"

# 4: the 1b train step, alone.
: > "$out/bench.jsonl"
while read -r variant; do
  [ -z "$variant" ] && continue
  # shellcheck disable=SC2086
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 240 python3 -m benchmarks.train_step \
    --config=configs/pretrain.py:1b \
    --config.batch_size="$BENCH_BATCH" $variant --steps=5 --warmup=2 \
    --profile_steps="$BENCH_PROFILE_STEPS" \
    >> "$out/bench.jsonl" 2>> "$out/bench_err.log" \
    || echo "{\"variant\": \"$variant\", \"failed\": $?}" >> "$out/bench.jsonl"
done <<< "$BENCH_VARIANTS"

# 5: one layer's attention at the 1b shape: the packing mask's price in cuDNN.
timeout 120 python3 -m benchmarks.attention --impls=xla,cudnn,cudnn_causal,cudnn_packed \
  --dtype=bfloat16 --batch="$BENCH_BATCH" --length=2048 --heads=32 --kv_heads=8 --head_dim=64 \
  > "$out/attention.json" 2>> "$out/bench_err.log"
echo "total: $((SECONDS - start)) s" >> "$out/env.txt"
