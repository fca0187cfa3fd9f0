#!/usr/bin/env bash
# Stage 2 GPU measurements (issue 9), run by the device tool from the repo root:
#   run(command="bash bench/gpu_stage2.sh", carry=[".gpu"])   # .gpu/ holds the diffusers wheel (the image lacks it)
# Writes one JSON per benchmark to $OUT (tiny config, then the Wan2.2 TI2V-5B architecture with random weights);
# ONLY=GLOB runs the benchmarks whose name matches (ONLY="train_*").
set -uo pipefail
OUT=${OUT:-bench/out}
python3 -m pip install -q --no-deps --no-index --target /tmp/site .gpu/diffusers-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import diffusers" 2>/dev/null || python3 -m pip install -q --no-deps --no-index --target /tmp/site .gpu/huggingface_hub-*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
run() { local name=$1 limit=$2; shift 2; [[ -n "${ONLY:-}" && "$name" != $ONLY ]] && return; echo "== $name"; timeout "$limit" python3 "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"; echo "rc=$? $(tail -c 300 "$OUT/$name.err" | tr '\n' ' ')"; rm -f "$OUT/$name.err"; }
run train_tiny_gpu 100 bench/train.py --config training/configs/tiny.yaml --device cuda --steps 20 --warmup 3
run train_tiny_encoders_gpu 100 bench/train.py --config training/configs/tiny.yaml --device cuda --steps 10 --warmup 2 --with-encoders
run sample_tiny_gpu 100 bench/sample.py --config training/configs/tiny.yaml --device cuda --decode
run train_5b_gpu 180 bench/train.py --config training/configs/wan2.2-ti2v-5b.yaml --device cuda --steps 5 --warmup 1
run sample_5b_gpu 180 bench/sample.py --config training/configs/wan2.2-ti2v-5b.yaml --device cuda --decode --repeats 1
