#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md, in named parts that each fit a 10-minute command.
# Every sub-run is its own process under `timeout`, so an OOM or a slow compile ends one line, not
# the suite. JSON lines go to $RESULTS/step.jsonl (bench/gpu_step.py) and $RESULTS/micro.jsonl.
#
#   RESULTS=/tmp/gpu PY=python3 bash bench/gpu_suite.sh headline micro tests
#
# Parts: headline (LLaMA-3 1.5B, 18 layers, seq 2048, bf16, compile_mode=blocks), model (the same, compile_mode=model),
# micro (GEMMs, fp8 GEMMs, SDPA backends), tests (pytest -m gpu), fp8 (tensorwise/rowwise vs bf16 on
# the same data), hf (ours vs HF LlamaForCausalLM, compiled, same weights and batch), memory
# (measured peak vs the dry-run estimate at three batch sizes), fp8wide (bf16 vs fp8 at the 8B shape's widths), tune (SDPA backend, micro-batch,
# expandable segments, gc.freeze), profile (top kernels of one 1.5B step), families (Qwen3 1.8B and GPT-2 1.36B, 8 layers),
# graphs (CUDA graphs on/off, compile_mode=model), lora (LoRA peak memory vs validate_config's estimate),
# generate (KV cache vs uncached, fp32 and bf16), loss (fused-loss variants compiled).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-/tmp/nanollm-gpu}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/nanollm-inductor}
L15=config/full_llama3_1.5b_optimal.py

step() {  # seconds, then gpu_step.py arguments
  local limit=$1; shift
  echo "== gpu_step $*" >&2
  timeout "$limit" "$PY" bench/gpu_step.py "$@" >> "$RESULTS/step.jsonl" 2>> "$RESULTS/step.err" \
    || echo "{\"failed\": \"exit $?\", \"argv\": \"$*\"}" >> "$RESULTS/step.jsonl"
}

for part in "$@"; do
  case $part in
    headline)
      step 200 $L15 --batch_size=8 --gradient_accumulation_steps=4 --compile=True --compile_mode=blocks --steps=12 --warmup=3 ;;
    model)
      step 300 $L15 --batch_size=8 --gradient_accumulation_steps=4 --compile=True --compile_mode=model --steps=12 --warmup=3 ;;
    micro)
      timeout 120 "$PY" bench/gpu_micro.py $L15 --batch_size=8 --block_size=2048 >> "$RESULTS/micro.jsonl" 2>> "$RESULTS/micro.err" ;;
    tests)
      timeout 300 "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider > "$RESULTS/pytest_gpu.txt" 2>&1 ;;
    fp8)
      for f in "" tensorwise rowwise; do
        step 240 $L15 --batch_size=8 --gradient_accumulation_steps=1 --compile=True --compile_mode=blocks \
          --data=shakespeare --steps=150 --warmup=5 --learning_rate=3e-4 --warmup_iters=20 ${f:+--fp8=$f}
      done ;;
    fp8wide)  # FP8 where GEMMs are wider: the Llama-3.1-8B shape (4096 wide, 14336 FFN), 4 of its 32 layers
      for f in "" tensorwise; do
        step 200 config/llama3.1_8b.py --n_layer=4 --batch_size=4 --gradient_accumulation_steps=1 --block_size=2048 \
          --compile=True --compile_mode=blocks --steps=10 --warmup=3 ${f:+--fp8=$f}
      done ;;
    hf)
      timeout 330 "$PY" bench/model_step.py $L15 --batch_size=8 --dtype=bfloat16 --compile=True --steps=4 --rounds=2 \
        --warmup=2 > "$RESULTS/hf.txt" 2>&1 ;;
    profile)
      step 150 $L15 --batch_size=8 --gradient_accumulation_steps=1 --compile=True --compile_mode=blocks --steps=3 --warmup=3 \
        --profile="$RESULTS/profile.txt" ;;
    memory)
      for b in 4 12; do
        step 200 $L15 --batch_size=$b --gradient_accumulation_steps=1 --compile=True --compile_mode=blocks --steps=5 --warmup=3
      done ;;
    tune)
      common=($L15 --gradient_accumulation_steps=1 --compile=True --compile_mode=blocks --steps=10 --warmup=3)
      step 150 "${common[@]}" --batch_size=8 --sdpa=flash
      step 150 "${common[@]}" --batch_size=8 --sdpa=cudnn
      step 150 "${common[@]}" --batch_size=16
      step 150 "${common[@]}" --batch_size=8 --gc_freeze=True
      PYTORCH_ALLOC_CONF=expandable_segments:True step 150 "${common[@]}" --batch_size=8 ;;
    families)
      step 200 config/full_qwen3_1.8b_optimal.py --n_layer=8 --batch_size=8 --gradient_accumulation_steps=1 --compile=True --compile_mode=blocks --steps=10 --warmup=3
      step 200 config/full_gpt2_1.36b.py --n_layer=8 --batch_size=8 --gradient_accumulation_steps=1 --compile=True --compile_mode=blocks --steps=10 --warmup=3 ;;
    graphs)  # CUDA graphs (reduce-overhead) need compile_mode=model: timed against the same without graphs
      for g in False True; do
        step 300 $L15 --batch_size=8 --gradient_accumulation_steps=1 --compile=True --compile_mode=model \
          --use_cuda_graphs=$g --steps=10 --warmup=3
      done ;;
    lora)  # peak memory of a LoRA step against validate_config.py's estimate: the Llama-3.1 LoRA guide's 8B config, and 1B
      Y=finetune/configs/Llama-3.1/llama3.1_8b_metamath.yaml
      for args in "--preset 8b" "--preset 8b training.gradient_checkpointing=false" \
                  "--preset 1b dataset.max_length=2048 training.gradient_checkpointing=false"; do
        timeout 200 "$PY" bench/lora_memory.py $Y $args >> "$RESULTS/lora_memory.jsonl" 2>> "$RESULTS/lora_memory.err" \
          || echo "{\"failed\": \"exit $?\", \"argv\": \"$args\"}" >> "$RESULTS/lora_memory.jsonl"
      done ;;
    generate)  # KV-cache generation against the uncached loop at the 1.5B shape, fp32 and bf16 weights
      for dt in float32 bfloat16; do
        timeout 150 "$PY" bench/generate_bench.py $L15 --device=cuda --dtype=$dt --batch_size=4 --prompt_len=512 \
          --new_tokens=128 --rounds=2 >> "$RESULTS/generate.txt" 2>&1
      done ;;
    loss)  # the fused-loss variants, compiled
      timeout 240 "$PY" bench/loss_bench.py --device=cuda --compile >> "$RESULTS/loss.jsonl" 2>> "$RESULTS/loss.err" ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
