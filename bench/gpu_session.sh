#!/usr/bin/env bash
# What a session that is lent a GPU should run, in one device call: the checks a CPU cannot do and the GPU rows
# of the benchmarks. Nothing in CI depends on it.
#
#   here, once:    echo /.whl/ >> .git/info/exclude && bash bench/gpu_session.sh --download
#   on the GPU:    run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# --download fetches, for the device image's Python 3.12, the wheels it lacks (its image has torch, triton,
# transformers, peft, accelerate, safetensors, tokenizers, xxhash, matplotlib; see /work/.library/device/KINDS.md).
# On the device everything goes to /tmp/site (no network there), the repo is installed without dependencies, and
# each step's output is written under $OUT (or ./gpu_out when $OUT is unset):
#   1. versions and the GPU, then the compile audit (python -m deepeyesv2_kernels.audit --quick: spills, shared
#      memory, tensor cores, pipelining of every kernel for sm_80/sm_90, the same table a CPU machine prints)
#   2. the kernel tests with native Triton (tests/conftest.py turns the interpreter on only without CUDA)
#   3. the precision, engine and RL-step tests on the GPU
#   4. python -m bench.kernels: the GPU table (ours vs torch eager, torch.compile, Liger, cut-cross-entropy)
#   5. python -m bench.e2e_grpo --quick: ours vs TRL GRPOTrainer on the GPU (SGLang / vLLM when carried)
# Steps run in that order and each is time-boxed, so a slow one cannot eat the others' share of the 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  transformers==5.24.0 huggingface_hub==2.4.0 tokenizers==0.23.3
  jsonargparse==4.53.0 bm25s==0.3.16 ImageHash==4.3.2 PyWavelets==1.9.0
  trl==1.16.0 liger_kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  pytest-timeout
)

if [[ "${1:-}" == "--download" ]]; then
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
  du -sh .whl
  exit
fi

OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { echo "repo install failed"; tail -20 "$OUT/install.log"; exit 1; }

step() {  # step NAME SECONDS COMMAND...: run with a time box, keep the log, print its tail
  local name=$1 secs=$2; shift 2
  echo "=== $name (<= ${secs}s)"
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  echo "--- $name: exit $?"
  tail -15 "$OUT/$name.log"
}

step versions 40 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -m deepeyesv2 info'
step compile_audit 80 env -u TRITON_INTERPRET python3 -m deepeyesv2_kernels.audit --quick --json "$OUT/audit.json"
step kernel_tests 120 python3 -m pytest -q -x -p no:cacheprovider tests/kernels
step gpu_trainer_tests 100 python3 -m pytest -q -x -p no:cacheprovider tests/trainer/test_precision.py \
  tests/rollout/test_engine.py tests/trainer/test_rl_step.py
step bench_kernels 150 python3 -m bench.kernels --quick --rounds 2 --gpu-out "$OUT/kernels_gpu.md"
step bench_e2e 100 python3 -m bench.e2e_grpo --quick --rounds 2 --only ours,trl
