"""
GPU check: ~20 steps of a small LLaMA-3 flavor on torchtitan 0.2.2 and on train.py, from the same Hugging
Face weights and the same shards; prints both loss curves and their differences.

    bash recipes/gpu_check.sh [WHEEL_DIR] [DATA_DIR]     (a CUDA machine with torch; see recipes/README.md)

train.py runs in bf16 autocast; torchtitan on one GPU (no FSDP) trains in fp32, so only the first losses
are expected to agree closely (within 1e-2); later ones drift with the precision and optimizer details.
"""

import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hf_checkpoint  # noqa: E402
from model import GPT  # noqa: E402
from recipes import generate  # noqa: E402

STEPS = 20
PRESET = """# gpu_check: a small LLaMA-3 on the GPT-2-token Shakespeare shards
out_dir = {out!r}
dataset = {data!r}
vocab_size = 50304
n_layer = 4
n_head = 8
n_kv_head = 2
n_embd = 512
intermediate_size = 1536
norm = "rmsnorm"
mlp = "swiglu"
position_embedding = "rope"
rope_theta = 500000.0
bias = False
tie_embeddings = False
block_size = 256
batch_size = 8
gradient_accumulation_steps = 2
max_iters = {steps}
learning_rate = 1e-3
warmup_iters = 0
decay_lr = False
min_lr = 1e-3
weight_decay = 0.0
grad_clip = 1.0
log_interval = 1
eval_interval = 1000
eval_iters = 1
compile = False
"""


def losses(text: str, pattern: str) -> dict[int, float]:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # torchtitan colours its log
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(pattern, text)}


def run(cmd: list[str], env: dict | None = None) -> str:
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    if r.returncode:
        print(r.stdout[-3000:], r.stderr[-6000:], sep="\n")
        raise SystemExit(f"error: {cmd[0]} failed with exit code {r.returncode}")
    return r.stdout + r.stderr


def main(work: str, data: str) -> None:
    os.makedirs(work, exist_ok=True)
    preset = os.path.join(work, "gpu_check_llama3.py")
    with open(preset, "w") as f:
        f.write(PRESET.format(out=os.path.join(work, "out-ours"), data=os.path.abspath(data), steps=STEPS))
    _, mc = generate.load_preset(preset)
    torch.manual_seed(0)
    model = GPT(mc)
    model.init_weights()
    hf = os.path.join(work, "hf")
    hf_checkpoint.to_hf(model, hf, torch.float32)

    ours = run([sys.executable, "train.py", preset, f"--init_from={hf}", "--dtype=bfloat16", "--device=cuda"])
    ours = losses(ours, r"iter (\d+): loss ([0-9.]+)")

    tt = os.path.join(work, "tt")
    generate.torchtitan(preset, 1, tt, init_from_hf=hf, dataset=data, steps=STEPS)
    # train.py logs iter 0 for the first update; torchtitan calls it step 1.
    # The checkpointer stays on: with it off, torchtitan never reads initial_load_path.
    titan = run(["bash", os.path.join(tt, "run_train.sh"), "--activation_checkpoint.mode", "none",
                 "--job.dump_folder", os.path.join(work, "outputs")], env={"NGPU": "1"})
    print("\n".join(line for line in titan.splitlines() if "oading" in line or "checkpoint" in line.lower())[-2000:])
    titan = losses(titan, r"step:\s*(\d+)\s+loss:\s*([0-9.]+)")
    print(f"{'step':>4} {'train.py':>10} {'torchtitan':>10} {'diff':>8}")
    for i in range(STEPS):
        a, b = ours.get(i), titan.get(i + 1)
        print(f"{i + 1:>4} {a if a is not None else float('nan'):>10.4f} {b if b is not None else float('nan'):>10.4f} "
              f"{abs(a - b) if a is not None and b is not None else float('nan'):>8.4f}")


if __name__ == "__main__":
    import errors

    parser = errors.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("work", help="a scratch folder: the preset, both runs' outputs and their logs")
    parser.add_argument("data", help="a prepared data/<name> folder with GPT-2-token shards")
    sys.exit(errors.run_command(lambda: main(**vars(parser.parse_args())) or 0))
