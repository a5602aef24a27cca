#!/usr/bin/env bash
# The GPU work still open, as one short script for a lent GPU machine (about 8 minutes on an H200):
# CUDA correctness (parity, experts kernels, cache, compiled decode, activation LoRA vs PEFT), pixel parity with
# transformers' torchvision Llama4ImageProcessor, and the speed rows the performance issue tracks (the Scout MoE
# layer with torch.profiler op tables of llama4x and the dense block: where the remaining 1.4x goes), then the eager
# decode host overhead on the GPU and eager decode with the grouped-GEMM vs the batched_mm experts.
#
#   OUT=results bash scripts/gpu_checks.sh        # writes JSON and logs under $OUT
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-results}"
mkdir -p "$OUT"
export PYTHONPATH=src
run() { echo "== $*"; timeout 240 "$@" 2>&1 | grep -v "it/s]" | tail -40; }
run python scripts/cuda_checks.py --out "$OUT" > "$OUT/cuda_checks.log"
run python scripts/processor_parity.py --out "$OUT" > "$OUT/processor_parity.log"
run python -m llama4x.cli bench moe-layer --device cuda --hidden 5120 --expert-size 8192 --experts 16 --top-k 1 \
    --tokens 8192 --profile --out "$OUT" > "$OUT/moe_layer_scout.log"
run python -m llama4x.cli bench lora --device cuda --hidden-size 2048 --num-hidden-layers 4 --num-attention-heads 16 \
    --num-key-value-heads 4 --moe-intermediate-size 4096 --attention-chunk-size 8192 --batch 2 --seq 4096 \
    --out "$OUT" > "$OUT/lora_4_layers.log"
run python -m llama4x.cli bench decode-overhead --device cuda --out "$OUT" > "$OUT/decode_overhead.log"
H200_SHAPES=(--hidden-size 2048 --num-hidden-layers 12 --num-attention-heads 16 --num-key-value-heads 4
    --moe-intermediate-size 4096 --attention-chunk-size 8192)
for experts in grouped_mm batched_mm; do
    run python -m llama4x.cli bench decode --device cuda "${H200_SHAPES[@]}" --batch 1 8 --prompt 512 \
        --new-tokens 32 --repeats 3 --experts-implementation "$experts" --out "$OUT/decode_$experts" \
        > "$OUT/decode_$experts.log"
done
tail -n 20 "$OUT"/*.log
