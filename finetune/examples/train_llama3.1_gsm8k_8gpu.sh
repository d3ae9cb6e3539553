#!/usr/bin/env bash
# Llama-3.1-8B + LoRA on gsm8k with 8 GPUs on one machine. Run from finetune/:
#   export HF_TOKEN=...   # Llama-3.1 is gated; or set model.name_or_path to a local folder
#   bash examples/train_llama3.1_gsm8k_8gpu.sh [section.key=value ...]
# Resume: add --resume_from_checkpoint outputs/llama3.1_8b_gsm8k/checkpoint-N
set -euo pipefail
cd "$(dirname "$0")/.."
accelerate launch \
    --config_file accelerate_config/accelerate_config.yaml \
    --num_processes "${NGPU:-8}" \
    --num_machines 1 \
    --machine_rank 0 \
    --main_process_port "${MASTER_PORT:-29500}" \
    --mixed_precision bf16 \
    train.py --config configs/Llama-3.1/llama3.1_8b_gsm8k.yaml "$@"
