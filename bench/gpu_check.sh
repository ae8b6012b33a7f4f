#!/usr/bin/env bash
# The CUDA checks in one run, for a machine with a GPU: the gpu-marked tests, the stage tests on the device, then the
# training bench on the device, eager and compiled, against transformers' DeepseekV3 in the same process. Logs and
# JSON go to $OUT (or a temp dir).
# Run from the repository root: bash bench/gpu_check.sh [preset] [batch] [seq]
set -u
out=${OUT:-$(mktemp -d)}
preset=${1:-small} batch=${2:-16} seq=${3:-1024}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
python3 -m pytest -m gpu tests/test_gpu.py -q 2>&1 | tee "$out/gpu_tests.log"
# the stage tests of the default suite: their stages run on the GPU here (device=auto). They need the project's
# dependencies; on a bare GPU image carry math-verify's wheels (bench/README.md), and reasoning-gym's tests skip.
python3 -m pytest -q tests/test_grpo.py tests/test_speedrun.py tests/test_evaluate.py tests/test_engine.py \
    tests/test_hf_backend.py tests/test_hf_llama.py tests/test_train.py tests/test_export.py tests/test_rl.py \
    tests/test_checkpoint.py 2>&1 | tee "$out/stage_tests.log"
bench=(python3 bench/train_bench.py --device cuda --preset "$preset" --batch "$batch" --seq "$seq")
"${bench[@]}" --expert-loop --json "$out/train_eager.json" 2>&1 | tee "$out/train_eager.log"
timeout "${COMPILED_TIMEOUT:-420}" "${bench[@]}" --compile --json "$out/train_compiled.json" 2>&1 \
    | tee "$out/train_compiled.log"
echo "logs in $out"
