"""Train or fine-tune llama4x with `transformers.Trainer` (the same as `llama4x train`; see `llama4x.training`).

python scripts/train.py --preset tiny --dataset pydocs --output-dir out --max-steps 200
python scripts/train.py --model DIR --dataset chat.jsonl --lora --lora-parts attention,routed_experts --output-dir out
accelerate launch --config_file tests/accelerate_cpu_ddp.yaml scripts/train.py --use_cpu --model DIR --output-dir out
python scripts/train.py --help          # every option, TrainingArguments included
"""

from llama4x.training import main

if __name__ == "__main__":
    main()
