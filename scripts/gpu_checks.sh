#!/usr/bin/env bash
# The GPU work still open, in two parts that each fit one 10-minute call on a lent GPU machine, the most telling
# first (a session has 15 minutes of device time in all):
#   part 1: CUDA correctness (parity, experts kernels, cache, compiled decode, activation LoRA vs PEFT); the Scout
#     and the fine-grained MoE layers (torch.profiler op tables of llama4x and the dense block; the host time of each
#     call beside its CUDA time: is the fine-grained layer host-bound?) and their
#     grouped GEMMs against dense GEMMs of the same FLOPs, in both weight layouts; eager-decode host overhead; the
#     eager whole-model training step;
#   part 2: eager decode, compiled (static cache) decode against the compiled dense Llama, the training step compiled
#     (fullgraph) against the compiled dense Llama, LoRA on the routed experts, and pixel parity with transformers'
#     torchvision Llama4ImageProcessor.
# Not here: decode with `--experts-implementation batched_mm` at batch 8 x prompt 512. Its prefill copies one
# expert's weights per token: 4,096 x 48 MiB = 192 GiB on the H200 config, more than the card holds.
#
#   OUT=results bash scripts/gpu_checks.sh 1      # writes JSON and logs under $OUT; then part 2
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-results}"
PART="${1:?which part: 1 or 2}"
mkdir -p "$OUT"
export PYTHONPATH=src
run() { echo "== $*"; timeout 240 "$@" 2>&1 | tr "\r" "\n" | grep -v "it/s]" | tail -40; }  # progress bars share lines with errors: split at \r first
H200_SHAPES=(--hidden-size 2048 --num-hidden-layers 12 --num-attention-heads 16 --num-key-value-heads 4
    --moe-intermediate-size 4096 --attention-chunk-size 8192)
if [[ "$PART" == 1 ]]; then
    run python scripts/cuda_checks.py --out "$OUT" > "$OUT/cuda_checks.log"
    run python -m llama4x.cli bench moe-layer --device cuda --hidden 5120 --expert-size 8192 --experts 16 --top-k 1 \
        --tokens 8192 --profile --out "$OUT" > "$OUT/moe_layer_scout.log"
    run python -m llama4x.cli bench grouped-gemm --device cuda --hidden 5120 --expert-size 8192 --experts 16 \
        --top-k 1 --tokens 8192 --out "$OUT/grouped_gemm_scout" > "$OUT/grouped_gemm_scout.log"
    run python -m llama4x.cli bench moe-layer --device cuda --hidden 2048 --expert-size 1024 --experts 64 --top-k 2 \
        --tokens 8192 --profile --out "$OUT/moe_layer_fine" > "$OUT/moe_layer_fine.log"
    run python -m llama4x.cli bench grouped-gemm --device cuda --hidden 2048 --expert-size 1024 --experts 64 \
        --top-k 2 --tokens 8192 --out "$OUT/grouped_gemm_fine" > "$OUT/grouped_gemm_fine.log"
    run python -m llama4x.cli bench decode-overhead --device cuda --out "$OUT" > "$OUT/decode_overhead.log"
    run python -m llama4x.cli bench train --device cuda "${H200_SHAPES[@]}" --batch 2 --seq 4096 --repeats 3 \
        --out "$OUT/train" > "$OUT/train.log"
else
    run python -m llama4x.cli bench decode --device cuda "${H200_SHAPES[@]}" --batch 1 8 --prompt 512 \
        --new-tokens 32 --repeats 3 --out "$OUT/decode" > "$OUT/decode.log"
    for batch in 1 8; do  # one call each: four compilations would not fit one call's timeout
        run python -m llama4x.cli bench speed --device cuda --quick --only "compiled_decode_bs$batch" \
            --out "$OUT/compiled_decode_bs$batch" > "$OUT/compiled_decode_bs$batch.log"
    done
    run python -m llama4x.cli bench train --device cuda "${H200_SHAPES[@]}" --batch 2 --seq 4096 --repeats 3 \
        --compile --out "$OUT/train_compiled" > "$OUT/train_compiled.log"
    run python -m llama4x.cli bench lora --device cuda "${H200_SHAPES[@]}" --num-hidden-layers 4 --batch 2 \
        --seq 4096 --out "$OUT" > "$OUT/lora_4_layers.log"
    run python scripts/processor_parity.py --out "$OUT" > "$OUT/processor_parity.log"
fi
tail -n 20 "$OUT"/*.log
