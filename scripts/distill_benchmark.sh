#!/usr/bin/env bash
# The distillation table of BENCHMARKS.md: one small MoE teacher trained on the bundled Python docs, then dense
# students distilled from it next to labels-only students (runs A-D; A and C with three seeds).
# Usage: bash scripts/distill_benchmark.sh [OUT]   (default benchmarks/distillation; about 10 minutes on 2 CPU cores)
set -euo pipefail
OUT=${1:-benchmarks/distillation}
LLAMA4X=${LLAMA4X:-llama4x}

# Teacher: the tiny preset narrowed to width 64 with 8 routed experts (top-1 + shared expert); it holds out the same
# 10% of the docs that `llama4x distill` evaluates on (`llama4x.data.python_docs_split`).
"$LLAMA4X" train --preset tiny \
  --config_overrides '{"hidden_size": 64, "head_dim": 16, "num_local_experts": 8, "moe_intermediate_size": 128, "intermediate_size": 128}' \
  --dataset pydocs --eval_fraction 0.1 --tokenizer_vocab_size 1024 --block_size 64 \
  --per_device_train_batch_size 8 --max_steps 1200 --learning_rate 3e-3 --lr_scheduler_type cosine --warmup_steps 60 \
  --logging_steps 50 --eval_strategy no --save_strategy no --report_to none --use_cpu --seed 0 \
  --output_dir "$OUT/teacher"

# Students keep teacher layers 0 and 3 and train 150 steps (batch 8 x 64 tokens, lr 3e-3, alpha 0.5, T 1).
common=(--teacher "$OUT/teacher" --layers 0,3 --steps 150 --batch-size 8 --block-size 64 --eval-size 64)
for seed in 0 1 2; do
  "$LLAMA4X" distill "${common[@]}" --seed "$seed" --out "$OUT/run_A/seed_$seed"                       # llama4x, from teacher
  "$LLAMA4X" distill "${common[@]}" --seed "$seed" --student-kind llama --out "$OUT/run_C/seed_$seed"  # Llama, from teacher
done
"$LLAMA4X" distill "${common[@]}" --init random --out "$OUT/run_B"                                     # llama4x, random init
"$LLAMA4X" distill "${common[@]}" --loss topk_kl --top-k 32 --offline --no-baseline --out "$OUT/run_D"  # cached top-k
