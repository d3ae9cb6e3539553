#!/usr/bin/env bash
# GPU figures for bench/RESULTS.md: tokens/s, MFU and peak memory of short training runs against
# the dry run's estimate, on one GPU, in a few minutes. Run from the repo root after setup.sh
# and the data prep below; paste the table it prints into bench/RESULTS.md with the date and GPU.
#
#   python data/shakespeare/prepare.py          # GPT-2 BPE corpus (offline)
#   bash bench/gpu_train.sh                     # or: PY=python3 bash bench/gpu_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/nanollm-gpu-bench}
rm -rf "$OUT"

run() {  # name, then train.py arguments
  local name=$1; shift
  "$PY" train.py "$@" --dry_run=True | tail -1 > "$OUT.$name.dry.json"
  "$PY" train.py "$@" --out_dir="$OUT/$name" > "$OUT.$name.log" 2>&1 || { tail -20 "$OUT.$name.log"; exit 1; }
  "$PY" - "$OUT/$name" "$OUT.$name.dry.json" "$name" <<'EOF'
import glob, json, sys
log = json.load(open(sorted(glob.glob(sys.argv[1] + "/run_*.json"))[-1]))
dry = json.load(open(sys.argv[2]))
recs = [r for r in log["training_iterations"] if r["tokens_per_sec"] is not None][1:]  # drop the first timed window
tok = sum(r["tokens_per_sec"] for r in recs) / len(recs)
mfu = [r["mfu"] for r in recs if r["mfu"] is not None]
peak = max(r["memory_peak_gb"] for r in recs)
env = log["environment"]
print(f"| {sys.argv[3]} | {env['gpu_name']} | {log['model']['architecture']} | {tok:,.0f} | "
      f"{(100 * sum(mfu) / len(mfu)) if mfu else float('nan'):.1f}% | {peak:.2f} | {dry['est_memory_gb_per_gpu']:.2f} |")
EOF
}

echo "| run | GPU | model | tokens/s | MFU | peak GiB (measured) | GiB (dry-run estimate) |"
echo "|---|---|---|---|---|---|---|"
COMMON=(--dataset=shakespeare --max_iters=60 --eval_interval=1000 --eval_iters=2 --log_interval=10 --dtype=bfloat16)
run tiny-bf16 config/train_shakespeare.py "${COMMON[@]}" --compile=False
run tiny-bf16-compile config/train_shakespeare.py "${COMMON[@]}" --compile=True
run tiny-bf16-compile-graphs config/train_shakespeare.py "${COMMON[@]}" --compile=True --use_cuda_graphs=True
# a preset of the training guide with fewer layers (the widths, vocabulary and sequence length of the real one)
run llama3-1.5b-4L config/full_llama3_1.5b_optimal.py "${COMMON[@]}" --n_layer=4 --batch_size=8 \
  --gradient_accumulation_steps=1 --compile=True --dataset=shakespeare
run qwen3-1.8b-4L config/full_qwen3_1.8b_optimal.py "${COMMON[@]}" --n_layer=4 --batch_size=8 \
  --gradient_accumulation_steps=1 --compile=True --dataset=shakespeare
