"""
Write an offline math SFT dataset: templated arithmetic word problems with computed answers.

    python finetune/data/make_math.py --out_dir finetune/data/math --n_train 2000 --n_test 200 --seed 0
    python finetune/data/make_math.py --out_dir finetune/data/math_easy --level easy     # the CPU demo's

Writes the same problems in both formats the loader reads (finetune/sft_data.py):
    <out_dir>/gsm8k/{train,test}.jsonl       {"question": ..., "answer": "...\\n#### N"}
    <out_dir>/metamathqa/{train,test}.jsonl  {"query": ..., "response": "... The answer is: N"}
Every problem is generated here from a template and random numbers (no dataset text); the output is a
function of the seed only, and no test question is also a train question.
"""

from __future__ import annotations

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root

import atomic  # noqa: E402
import errors  # noqa: E402

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam"]
ITEMS = ["apple", "marble", "book", "pencil", "sticker", "cookie", "stamp", "shell", "card", "coin"]


def _add_sub(r: random.Random) -> tuple[str, list[str], int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(5, 90), r.randint(2, 60)
    c = r.randint(1, a + b - 1)
    s, ans = a + b, a + b - c
    q = f"{name} has {a} {item}s. {name} gets {b} more and then gives away {c}. How many {item}s does {name} have now?"
    steps = [f"After getting {b} more, {name} has {a} + {b} = <<{a}+{b}={s}>>{s} {item}s.",
             f"After giving away {c}, {name} has {s} - {c} = <<{s}-{c}={ans}>>{ans} {item}s."]
    return q, steps, ans


def _price(r: random.Random) -> tuple[str, list[str], int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    n, p, paid_extra = r.randint(2, 12), r.randint(2, 25), r.randint(1, 40)
    cost, ans = n * p, n * p + paid_extra
    q = (f"{name} buys {n} {item}s at ${p} each and also pays ${paid_extra} for shipping. "
         f"How many dollars does {name} spend in total?")
    steps = [f"The {item}s cost {n} * {p} = <<{n}*{p}={cost}>>{cost} dollars.",
             f"With shipping the total is {cost} + {paid_extra} = <<{cost}+{paid_extra}={ans}>>{ans} dollars."]
    return q, steps, ans


def _share(r: random.Random) -> tuple[str, list[str], int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    k, each, kept = r.randint(2, 9), r.randint(2, 15), r.randint(1, 20)
    total = k * each + kept
    given = total - kept
    q = (f"{name} has {total} {item}s, keeps {kept} and shares the rest equally among {k} friends. "
         f"How many {item}s does each friend get?")
    steps = [f"{name} shares {total} - {kept} = <<{total}-{kept}={given}>>{given} {item}s.",
             f"Each friend gets {given} / {k} = <<{given}/{k}={each}>>{each} {item}s."]
    return q, steps, each


def _boxes(r: random.Random) -> tuple[str, list[str], int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    per, boxes = r.randint(3, 24), r.randint(2, 15)
    total = per * boxes
    used = r.randint(1, total - 1)
    ans = total - used
    q = (f"A box holds {per} {item}s. {name} fills {boxes} boxes and then uses {used} of the {item}s. "
         f"How many {item}s are left?")
    steps = [f"{boxes} boxes hold {boxes} * {per} = <<{boxes}*{per}={total}>>{total} {item}s.",
             f"After using {used}, {total} - {used} = <<{total}-{used}={ans}>>{ans} {item}s are left."]
    return q, steps, ans


def _percent(r: random.Random) -> tuple[str, list[str], int]:
    name = r.choice(NAMES)
    pct = r.choice([10, 20, 25, 50, 75])
    money = 20 * r.randint(1, 30)  # a multiple of 20 keeps every percentage above a whole number
    spent = money * pct // 100
    ans = money - spent
    q = f"{name} had ${money} and spent {pct}% of it on a gift. How many dollars does {name} have left?"
    steps = [f"{name} spent {pct}/100 * {money} = <<{pct}/100*{money}={spent}>>{spent} dollars.",
             f"{name} has {money} - {spent} = <<{money}-{spent}={ans}>>{ans} dollars left."]
    return q, steps, ans


def _temperature(r: random.Random) -> tuple[str, list[str], int]:
    start, drop, rise = r.randint(-5, 15), r.randint(5, 25), r.randint(1, 10)
    mid = start - drop
    ans = mid + rise
    q = (f"The temperature was {start} degrees. It fell by {drop} degrees overnight and rose by {rise} degrees "
         f"in the morning. What was the temperature in the morning?")
    steps = [f"After falling, it was {start} - {drop} = <<{start}-{drop}={mid}>>{mid} degrees.",
             f"After rising, it was {mid} + {rise} = <<{mid}+{rise}={ans}>>{ans} degrees."]
    return q, steps, ans


def _one_step(r: random.Random) -> tuple[str, list[str], int]:
    """One addition or subtraction of numbers below 50: what a 135M model can learn on a CPU in minutes."""
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 49), r.randint(2, 49)
    if r.random() < 0.5:
        ans = a + b
        q = f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?"
        steps = [f"{name} has {a} + {b} = <<{a}+{b}={ans}>>{ans} {item}s."]
    else:
        a, b = max(a, b), min(a, b)
        ans = a - b
        q = f"{name} has {a} {item}s and gives away {b}. How many {item}s does {name} have now?"
        steps = [f"{name} has {a} - {b} = <<{a}-{b}={ans}>>{ans} {item}s."]
    return q, steps, ans


TEMPLATES = [_add_sub, _price, _share, _boxes, _percent, _temperature]
LEVELS = {"easy": [_one_step], "mixed": TEMPLATES}  # easy: the CPU demo's; mixed: two-step problems of six kinds


def make_problems(n: int, seed: int, exclude: set[str] | None = None, level: str = "mixed") -> list[dict]:
    """n distinct problems {"question", "steps", "answer"} from the level's templates, a function of seed only."""
    r = random.Random(seed)
    seen = set(exclude or ())
    out = []
    templates = LEVELS[level]
    while len(out) < n:
        q, steps, ans = r.choice(templates)(r)
        if q not in seen:
            seen.add(q)
            out.append({"question": q, "steps": steps, "answer": str(ans)})
    return out


def gsm8k_record(p: dict) -> dict:
    """A problem in GSM8K's format: calculator annotations in the steps, then `#### N`."""
    return {"question": p["question"], "answer": "\n".join(p["steps"]) + f"\n#### {p['answer']}"}


def metamathqa_record(p: dict) -> dict:
    """A problem in MetaMathQA's format: plain steps (no annotations), then `The answer is: N`."""
    steps = [_strip_calculator(s) for s in p["steps"]]
    return {"query": p["question"], "response": " ".join(steps) + f"\nThe answer is: {p['answer']}",
            "type": "GSM_Synthetic"}


def _strip_calculator(s: str) -> str:
    while "<<" in s:
        i = s.index("<<")
        s = s[:i] + s[s.index(">>", i) + 2:]
    return s


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write records one JSON object per line, atomically (atomic.write_file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic.write_file(path, "".join(json.dumps(rec) + "\n" for rec in records))


def write_dataset(out_dir: str, n_train: int, n_test: int, seed: int, level: str = "mixed") -> dict[str, str]:
    """Write both formats' train/test JSONL under out_dir; returns {"<format>/<split>": path}."""
    train = make_problems(n_train, seed, level=level)
    test = make_problems(n_test, seed + 1, exclude={p["question"] for p in train}, level=level)
    paths = {}
    for fmt, record in (("gsm8k", gsm8k_record), ("metamathqa", metamathqa_record)):
        for split, problems in (("train", train), ("test", test)):
            path = os.path.join(out_dir, fmt, f"{split}.jsonl")
            write_jsonl(path, [record(p) for p in problems])
            paths[f"{fmt}/{split}"] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = errors.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "math"),
                        help="the folder to write (gsm8k/train.jsonl and gsm8k/test.jsonl inside)")
    parser.add_argument("--n_train", type=int, default=2000, help="training problems")
    parser.add_argument("--n_test", type=int, default=200, help="held-out problems (no question repeats a training one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator")
    parser.add_argument("--level", default="mixed", choices=list(LEVELS),
                        help="easy: one addition or subtraction below 50; mixed: two-step problems of six kinds")

    def body() -> int:
        args = parser.parse_args(argv)
        if args.n_train < 1 or args.n_test < 1 or args.n_train + args.n_test > 200_000:
            raise errors.ConfigError("--n_train and --n_test must be >= 1 and together at most 200000 (the "
                                           "templates' distinct problems run out beyond that)")
        for name, path in write_dataset(args.out_dir, args.n_train, args.n_test, args.seed, args.level).items():
            print(f"{name}: {path}")
        return 0

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
