#!/usr/bin/env bash
# GPU runs on a machine without Ray (torch, transformers and triton installed; deepspeed,
# pydantic and hjson as wheels under .whl/). Usage: bash infra/gpu/h200.sh [tests] [teacher] [distill] [kv] [engine]
# Results go to $OUT (default ./gpu-out). Every step prints the command it runs.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext
steps=${*:-tests teacher distill kv engine}
say() { echo "+ $*" >&2; "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for s in $steps; do case $s in
  tests)
    say python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit 2>&1 | tee "$OUT/gpu-tests.log" ;;
  teacher)
    # a briefly pretrained base teacher (throughput, not quality) for the distillation runs
    say python3 -m train.teacher -c configs/teacher/base.yaml training.steps=${TEACHER_STEPS:-40} \
      training.eval_every=100000 eval.max_tokens=131072 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|step/s\|B/s\]" | tail -n 8 ;;
  distill)
    say torchrun --standalone --nproc_per_node ${NGPU:-1} -m train.distill.torchrun_main -c configs/distill/base.yaml \
      num_workers=${NGPU:-1} steps=${DISTILL_STEPS:-30} warmup_steps=5 run_dir=/tmp/distill-$RANDOM checkpoint_every=100000 eval.max_tokens=131072 publish=false \
      ${DISTILL_ARGS:-} 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|step/s\|B/s\]" | tee -a "$OUT/distill.log" | tail -n 12 ;;
  kv)
    say python3 -m serve.kv.bench --device cuda --model base --backends memory --skip-routing --repeats 5 \
      2>&1 | tee "$OUT/kv-bench.log" ;;
  engine)
    say python3 -m serve.bench --device cuda --preset base --json "$OUT/bench.json" ${ENGINE_ARGS:-} \
      2>&1 | tee "$OUT/engine-bench.log" ;;
esac; done
