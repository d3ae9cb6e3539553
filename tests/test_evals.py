"""evals.py: packed scoring equals one plain forward per request, lm-eval's acc/acc_norm and DCLM's centered
score, the loaders of the published fields, clear errors, evaluate.py, and eval_tasks in the training loop
(single process, and 2 gloo processes scoring halves that sum to the same counts)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import LLAMA_FEATURES, randomize, tiny_gpt
from test_train import ok, read_log, run_train, tiny_args

import evals
from tokenizer import CharTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = CharTokenizer("abcdefghijklmnopqrstuvwxyz .\n")
ENC = evals.encoder_from_tokenizer(TOK)


def plain_scores(model, ex: evals.Example) -> list[tuple[float, bool]]:
    """lm-eval's computation, one request at a time: (context + continuation)[-(L+1):], one forward, the
    continuation's log-probabilities summed and every token checked against the argmax."""
    out = []
    for ctx, cont in ex.requests:
        c, x = evals.encode_pair(ENC, ctx, cont)
        ids = (c + x)[-(model.config.block_size + 1):]
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[:-1]]))
        logp = F.log_softmax(logits[0, -len(x):].float(), dim=-1)
        target = torch.tensor(ids[-len(x):])
        out.append((logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
    return out


EXAMPLES = [
    evals.Example([("the king speaks to", " his lord"), ("the king speaks to", " her"),
                   ("the king speaks to", " o night and day and")], 0, [3, 3, 3]),
    evals.Example([("a context much longer than the block size of the model so it is cut from the left", " fair day")],
                  0, [8]),
    evals.Example([("the queen and", " the lord"), ("the king and", " the lord")], 1, [1, 1]),  # schema
    evals.Example([("thou ", "art"), ("thou ", "and")], 0, [3, 3]),  # trailing space moves to the continuation
]


@pytest.mark.parametrize("features", [{}, LLAMA_FEATURES], ids=["learned", "rope"])
def test_packed_scores_equal_one_forward_per_request(features):
    """Shared prefixes computed once, rows split at block_size (learned positions), left truncation, batches
    of mixed lengths: the same log-likelihoods and greedy flags as lm-eval's plain per-request forward."""
    model = tiny_gpt(vocab_size=32, block_size=24, **features).eval()
    randomize(model, std=0.3)
    for batch_tokens in (24, 4096):  # one row per batch, and everything in one batch
        for ex in EXAMPLES:
            ex.ids = None
        scored = evals.loglikelihoods(model, ENC, [EXAMPLES], batch_tokens=batch_tokens)[0]
        for ex, lls, greedy in zip(EXAMPLES, scored.lls, scored.greedy):
            ref = plain_scores(model, ex)
            assert lls == pytest.approx([r[0] for r in ref], abs=1e-4)
            assert greedy == [r[1] for r in ref]


def test_pack_shares_the_context_once():
    inputs = [([1, 2, 3, 4], [5, 6]), ([1, 2, 3, 4], [7]), ([1, 2, 3, 4], [5, 8, 9])]
    [row] = evals.pack(inputs, max_length=16, row_limit=None)
    # inputs (context + continuation minus its last token): [1 2 3 4 5], [1 2 3 4], [1 2 3 4 5 8]
    assert row.tokens == [1, 2, 3, 4, 5, 5, 8]  # the 4 shared tokens once, then each request's own
    assert row.positions == [0, 1, 2, 3, 4, 4, 5]
    assert row.segment == [0, 0, 0, 0, 1, 3, 3]
    assert [cont for _, _, cont in row.targets] == [[5, 6], [7], [5, 8, 9]]
    assert [where for _, where, _ in row.targets] == [[3, 4], [3], [3, 5, 6]]  # rows whose logits predict them
    rows = evals.pack(inputs, max_length=16, row_limit=6)  # learned positions: rows of at most 6 tokens
    assert [r.tokens for r in rows] == [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 8]]


def test_outcomes_follow_lm_eval():
    """acc: the highest log-likelihood (the first of ties, as numpy's argmax); acc_norm: divided by the
    choice's characters; cloze: is_greedy."""
    task = evals.Task("t", "choice", [], 0.25, "acc_norm")
    ex = evals.Example([("c", " a")] * 3, 1, [1, 10, 2])
    got = evals.outcomes(task, [ex], evals.Scored([[-2.0, -5.0, -2.0]], [[False] * 3]))
    assert got == [(0.0, 1.0)]  # acc picks choice 0 (tie with 2, first wins); per character choice 1 wins
    cloze = evals.Task("c", "cloze", [], 0.0, "acc")
    assert evals.outcomes(cloze, [evals.Example([("a", " b")], 0, [2])] * 2,
                          evals.Scored([[-1.0], [-9.0]], [[True], [False]])) == [(1.0, 1.0), (0.0, 0.0)]
    assert evals.centered(0.25, 0.25) == 0 and evals.centered(1.0, 0.25) == 1
    assert evals.centered(0.625, 0.25) == pytest.approx(0.5)


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def test_published_fields_become_lm_eval_requests(tmp_path):
    """Each task's prompt as lm-eval's task YAML writes it (hellaswag, winogrande and lambada_openai are also
    checked against lm-eval itself in test_evals_lm_eval.py)."""
    docs = {
        "arc_easy": {"question": "Which is a star?", "choices": {"text": ["Moon", "Sun"], "label": ["A", "B"]},
                     "answerKey": "B"},
        "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
        "hellaswag": {"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she",
                      "endings": ["bakes it [title] well.", "sings."], "label": "0"},
        "winogrande": {"sentence": "The cup fell off the table because _ was round.", "option1": "the cup",
                       "option2": "the table", "answer": "1"},
        "lambada_openai": {"text": "he opened the door and saw his friend"},
    }
    want = {
        "arc_easy": ([("Question: Which is a star?\nAnswer:", " Moon"), ("Question: Which is a star?\nAnswer:", " Sun")], 1),
        "piqa": ([("Question: Open a jar\nAnswer:", " twist the lid"), ("Question: Open a jar\nAnswer:", " eat the lid")], 0),
        "hellaswag": ([("Baking: She mixes flour. Then she", " bakes it. well."), ("Baking: She mixes flour. Then she", " sings.")], 0),
        "winogrande": ([("The cup fell off the table because the cup", " was round."),
                        ("The cup fell off the table because the table", " was round.")], 0),
        "lambada_openai": ([("he opened the door and saw his", " friend")], 0),
    }
    for name, doc in docs.items():
        task = evals.load_task(f"{name}={write_jsonl(tmp_path / f'{name}.jsonl', [doc])}")
        assert (task.examples[0].requests, task.examples[0].gold) == want[name], name
        assert task.random_baseline == evals.TASKS[name].random_baseline


def test_our_own_fields_and_baselines(tmp_path):
    choice = evals.load_task(write_jsonl(tmp_path / "c.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 1},
                                                                {"context": "a", "choices": ["b", "c", "d", "e"], "label": 0}]))
    assert choice.kind == "choice" and choice.name == "c" and choice.random_baseline == pytest.approx(0.375)
    assert choice.examples[0].requests == [("a", "b"), ("a", "c")]  # no delimiter: the file says what it scores
    schema = evals.load_task(write_jsonl(tmp_path / "s.jsonl", [{"contexts": ["x", "y"], "continuation": " z", "label": 1}]))
    assert schema.kind == "schema" and schema.examples[0].requests == [("x", " z"), ("y", " z")]
    cloze = evals.load_task(write_jsonl(tmp_path / "z.jsonl", [{"context": "x", "continuation": " z"}] * 3), 2)
    assert cloze.kind == "cloze" and len(cloze.examples) == 2 and cloze.random_baseline == 0


@pytest.mark.parametrize("spec,records,message", [
    ("hellaswg", None, "unknown task 'hellaswg'; did you mean hellaswag?"),
    ("hellaswag=FILE", [{"ctx_a": "x"}], "has no field 'activity_label'"),
    ("FILE", [{"context": "a", "label": 0}], "cannot tell the task's form"),
    ("FILE", [{"context": "a", "choices": ["b"], "label": 3}], "has label 3 for 1 choices"),
    ("piqa=missing.jsonl", None, "task file missing.jsonl not found"),
])
def test_bad_tasks_are_one_line(spec, records, message, tmp_path):
    if records is not None:
        spec = spec.replace("FILE", write_jsonl(tmp_path / "t.jsonl", records))
    with pytest.raises(evals.TaskError, match=message.replace("?", "\\?").replace("(", "\\(")):
        evals.load_task(spec)


def test_continuation_longer_than_the_context_is_refused():
    task = evals.Task("t", "cloze", [evals.Example([("a", " " + "b" * 40)], 0, [41])], 0.0, "acc")
    with pytest.raises(evals.TaskError, match="continuation of 41 tokens; the model scores 1 to 24"):
        evals.tokenize([task], ENC, 24)


def word_task(path, n: int = 24) -> str:
    """Next-word questions in the char dataset's alphabet (conftest.write_char_dataset's words)."""
    words = ["the", "king", "queen", "speaks", "to", "his", "her", "lord", "and", "fair", "night", "day"]
    return write_jsonl(path, [{"context": f"{words[i % 12]} {words[(i + 3) % 12]} ",
                               "choices": [words[(i + k) % 12] for k in range(4)], "label": i % 4} for i in range(n)])


def evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def task_args(task: str) -> list[str]:
    # the global batch (2 sequences x 2 micro-steps) splits over 1 or 2 processes
    return ["--max_iters=4", "--eval_interval=4", "--batch_size=2", "--gradient_accumulation_steps=2",
            f"--eval_tasks={task}", "--eval_tasks_interval=2", "--eval_tasks_max_examples=20"]


@pytest.fixture(scope="module")
def run_with_tasks(char_dataset, tmp_path_factory):
    """A short train.py run scoring a task file at iterations 0, 2, 4 (eval_interval 4, task interval 2)."""
    out = tmp_path_factory.mktemp("tasks_run")
    task = word_task(out / "words.jsonl")
    p = ok(run_train(tiny_args(char_dataset, out / "run", *task_args(task))))
    return out, task, p


def test_eval_tasks_in_the_loop(run_with_tasks):
    out, task, p = run_with_tasks
    evals_log = read_log(out / "run")["evaluations"]
    assert [e["iter"] for e in evals_log] == [0, 2, 4]
    assert "val_loss" in evals_log[0] and "val_loss" not in evals_log[1]  # iter 2: tasks only
    for e in evals_log:
        t = e["tasks"]["words"]
        assert set(t) == {"acc", "acc_norm", "centered", "random_baseline", "core_metric"}
        assert t["random_baseline"] == 0.25 and e["core"] == pytest.approx(evals.centered(t["acc_norm"], 0.25))
        assert e["tasks_seconds"] >= 0
    assert "tasks: words acc" in p.stdout and "CORE" in p.stdout


def test_evaluate_cli_scores_the_checkpoint_as_the_loop_did(run_with_tasks, tmp_path):
    """evaluate.py on the run's out_dir (its dataset's tokenizer, from meta.json) repeats the loop's last score."""
    out, task, _ = run_with_tasks
    p = evaluate_cli(f"--checkpoint={out / 'run'}", f"--tasks={task}", "--max_examples=20", f"--out={tmp_path}/r.json")
    assert p.returncode == 0, p.stderr
    last = read_log(out / "run")["evaluations"][-1]["tasks"]["words"]
    with open(tmp_path / "r.json") as f:
        got = json.load(f)["tasks"]["words"]
    assert (got["acc"], got["acc_norm"], got["n"]) == (last["acc"], last["acc_norm"], 20)


@pytest.mark.parametrize("args,message", [
    (["--checkpoint=CKPT", "--tasks=hellaswg"], "error: unknown task 'hellaswg'; did you mean hellaswag?"),
    (["--checkpoint=CKPT", "--tasks=nosuch.jsonl"], "error: task file nosuch.jsonl not found"),
    (["--tasks=piqa"], "error: pass --checkpoint=PATH"),
    (["--checkpoint=CKPT", "--tasks=TASK", "--tokenizer=/nonexistent"], "error: /nonexistent has no tokenizer.json"),
    (["--checkpoint=/nonexistent", "--tasks=TASK"], "error: /nonexistent is not a folder"),
])
def test_evaluate_cli_bad_input_is_one_line(args, message, run_with_tasks):
    out, task, _ = run_with_tasks
    p = evaluate_cli(*[a.replace("CKPT", str(out / "run")).replace("TASK", task) for a in args])
    assert p.returncode == 2 and p.stderr.startswith(message) and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr


def test_checkpoint_whose_tokenizer_is_gone(run_with_tasks, tmp_path):
    """A checkpoint whose dataset's tokenizer file cannot be found: one line naming --tokenizer."""
    import shutil

    out, task, _ = run_with_tasks
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out / "run" / "ckpt", ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    state["dataset"]["meta"]["tokenizer"] = {"name": "gpt2", "path": "/gone/tokenizer.json", "sha256": "0" * 64}
    (ckpt / "state.json").write_text(json.dumps(state))
    p = evaluate_cli(f"--checkpoint={ckpt}", f"--tasks={task}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith(f"error: the tokenizer of checkpoint {ckpt} cannot be found") and "--tokenizer" in p.stderr


@pytest.mark.slow
def test_two_processes_score_halves_that_sum_to_one_process(run_with_tasks, char_dataset, tmp_path):
    """torchrun, 2 gloo processes (DDP): each rank scores every other example, one reduction; the logged
    accuracies equal the single-process run's (same weights: DDP equals one process to 1e-5)."""
    out, task, _ = run_with_tasks
    ok(run_train(tiny_args(char_dataset, tmp_path / "ddp", *task_args(task)), nproc=2))
    single = read_log(out / "run")["evaluations"]
    double = read_log(tmp_path / "ddp")["evaluations"]
    assert [e["iter"] for e in double] == [0, 2, 4]
    for a, b in zip(single, double):
        assert a["tasks"] == b["tasks"]


def test_plot_single_run_draws_the_task_panel(run_with_tasks):
    """plots/plot_single_run.py: a "Downstream tasks" panel with each task's core metric at each task
    evaluation (as a percentage) and its chance level; none for a run without tasks."""
    sys.path.insert(0, os.path.join(ROOT, "plots"))
    import plot_single_run
    import runlogs

    out, _, _ = run_with_tasks
    run = runlogs.load(sorted((out / "run").glob("run_*.json"))[-1])
    axes = {ax.get_title(): ax for ax in plot_single_run.plot_runs([run]).axes if ax.get_visible()}
    lines = {line.get_label(): line for line in axes["Downstream tasks"].get_lines()}
    ys = [100 * e["tasks"]["words"]["acc_norm"] for e in run["evaluations"]]
    assert list(lines["words (acc_norm)"].get_ydata()) == pytest.approx(ys)
    assert list(lines["words (acc_norm)"].get_xdata()) == [0, 2, 4]
    assert list(lines["words chance (25%)"].get_ydata()) == [25, 25]
    run["evaluations"] = [{k: v for k, v in e.items() if k not in ("tasks", "core")} for e in run["evaluations"]]
    assert "Downstream tasks" not in [ax.get_title() for ax in plot_single_run.plot_runs([run]).axes]


def test_every_config_names_tasks_that_exist():
    """A shipped config's eval_tasks resolves: a task in evals.TASKS whose prepared file a prepare.py in the
    repository writes (train.py refuses an unknown task at start, so a typo here breaks the command)."""
    import glob

    import configurator

    for path in sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))):
        for name in evals.parse_task_list(configurator.read_config_file(path).get("eval_tasks", "")):
            assert name in evals.TASKS, f"{os.path.basename(path)}: eval_tasks names {name!r}, not in evals.TASKS"
            local = evals.TASKS[name].local
            if local is not None:
                prepare = os.path.join(ROOT, os.path.dirname(local), "prepare.py")
                assert os.path.isfile(prepare), f"{name}: nothing writes {local} ({prepare} is missing)"
                with open(prepare) as f:
                    assert os.path.basename(local) in f.read(), f"{name}: {prepare} does not write {local}"
