"""The documentation is true: named files exist, every command names a real script with arguments its parser
accepts, CI runs the README's test command, and every ratio in bench/RESULTS.md and the README is that of the
figures beside it."""

import argparse
import ast
import contextlib
import glob
import io
import os
import re
import runpy
import shlex
import sys

import pytest

import configurator
import errors
from model import ModelConfig
from train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [
    "README.md", "SYSTEM_OVERVIEW.md", "TESTING.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT)),
    "finetune/README.md", "recipes/README.md", "bench/README.md", "bench/RESULTS.md",
]
# Where a doc's inline commands run from (its fenced blocks start at the root and follow their `cd`s).
INLINE_CWD = {"finetune/README.md": "finetune"}

# Files that commands create (outputs, prepared data) or that the user brings, rather than files the repository holds.
GENERATED = re.compile(
    r"(^|/)(train|val)(_\d+)?\.bin$|(^|/)meta\.(json|pkl)$|(^|/)input\.txt$|run_.*\.json$|\.png$"
    r"|(^|/)(model|optimizer.*|rng.*|scaler)\.pt$|(^|/)state\.json$|(^|/)ckpt(\.tmp|\.old)?/?$"
    r"|^data/\.cache|^data/<|^config/<|^data/X(/|$)|^config/plan_.*\.py$"
    r"|^recipes_out/|^exports/|(^|/)(run_train\.sh|nanollm_titan\.py|pretrain_gpt\.py)$|^train_[\w.<>-]+\.sh$"
    r"|(^|/)prompts\.txt$|^outputs/|^\.runlogs/|(^|/)line_end\.jsonl$"
    r"|^examples/llama/"  # Megatron-LM's own example script, named by recipes/README.md
)
PATH = re.compile(r"(?<![\w./*-])((?:config|data|plots|docs|bench|tests|\.ci)/[\w./<>*-]*[\w>*]"
                  r"|[A-Za-z_][\w-]*\.(?:py|md|sh|toml|txt))(?![\w/])")
# Any relative path with a folder in it (finetune/'s configs/..., ../loop.py): checked when its first folder
# exists (at the root or beside the doc), or it starts with .., or it names a file by its extension.
DIR_PATH = re.compile(r"(?<![\w./*<>$-])((?:\.\./)*[\w.-]+(?:/[\w.<>*-]+)+/?)")
FILE_EXT = re.compile(r"\.(py|md|sh|toml|txt|ya?ml|json)$")


def _doc(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def missing_paths(text: str, doc: str) -> list[str]:
    """The paths text (from doc) names that exist neither from the root, nor beside doc, nor anywhere below
    the root (a bare file name or a folder-relative path), generated files aside."""
    base = os.path.dirname(doc)
    named = set(PATH.findall(text))
    for path in DIR_PATH.findall(text):
        first = path.split("/")[0]
        if first == ".." or FILE_EXT.search(path) or any(
                os.path.isdir(os.path.join(ROOT, d, first)) for d in ("", base)):
            named.add(path.rstrip("/"))
    missing = []
    for path in sorted(named):
        if "*" in path or GENERATED.search(path) or path.startswith(("/", "out-", ".venv/")):
            continue
        candidates = [path, os.path.normpath(os.path.join(base, path))]
        if not path.startswith(".."):  # a bare name or a folder-relative path: somewhere in the repository
            candidates += glob.glob(os.path.join("**", path), root_dir=ROOT, recursive=True)
        if not any(os.path.exists(os.path.join(ROOT, c)) for c in candidates):
            missing.append(path)
    return missing


@pytest.mark.parametrize("doc", DOCS)
def test_named_files_exist(doc):
    missing = missing_paths(_doc(doc), doc)
    assert not missing, f"{doc} names files that do not exist: {missing}"


# -----------------------------------------------------------------------------
# Commands: the script exists and its own parser accepts the arguments


def _commands(text: str) -> list[str]:
    """Shell commands in fenced bash blocks, with backslash continuations joined and comments dropped; a
    block's first command is marked by a leading newline (its cwd starts at the root)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        first = True
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split(" # ")[0].strip()
            if cmd and not cmd.startswith("#"):
                out.append("\n" * first + cmd)
                first = False
    return out


def _inline_commands(text: str) -> list[str]:
    """Commands quoted inline (`python X.py ...`, `torchrun ...`, `bash X.sh`) or in indented code blocks,
    outside fenced blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [" ".join(s.split()) for s in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose)]
    spans += [line.strip() for line in prose.splitlines() if re.match(r"(    |\t)\S", line)]
    return [s for s in spans if re.match(r"([A-Z_]+=\S* )*(\S*python3?|torchrun|bash) \S", s)]


SYNOPSIS = re.compile(r"[\[\]|()<>]|\.\.\.")  # a usage line, not a command: [--opt], a|b, <name>, ...


class _Parsed(BaseException):
    """Raised instead of the script's work once its arguments have parsed (BaseException: no handler eats it)."""


def _run_parser(script: str | None, module: str | None, args: list[str], cwd: str) -> tuple[str | None, dict]:
    """Run a repository script (or -m module) as __main__ with args, in cwd, until its arguments are parsed:
    configurator.load and argparse parse for real, then stop it. (error or None, what the parser was)."""
    seen: dict = {}
    real_load, real_parse = configurator.load, argparse.ArgumentParser.parse_known_args
    depth = [0]

    def load(argv, schemas, doc=None):
        seen["schemas"] = schemas
        if not seen.get("names_only"):
            real_load(argv, schemas, doc)
        raise _Parsed

    def parse_known_args(self, args=None, namespace=None):
        seen.setdefault("parser", self)
        if seen.get("names_only"):
            raise _Parsed
        depth[0] += 1
        try:
            result = real_parse(self, args, namespace)
        finally:
            depth[0] -= 1
        if depth[0]:  # a subcommand's parser, or parse_args checking for extra arguments
            return result
        # a script that parses known args (finetune/) takes section.key=value overrides, any other --flag is an error
        bad = [a for a in result[1] if a.startswith("--") and "." not in a.split("=", 1)[0]]
        if bad:
            self.error(f"unrecognized arguments: {' '.join(bad)}")
        raise _Parsed

    def parse_args(self, args=None, namespace=None):
        seen.setdefault("parser", self)
        depth[0] += 1
        try:
            _, extras = parse_known_args(self, args, namespace)
        finally:
            depth[0] -= 1
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        raise _Parsed

    seen["names_only"] = args is None
    argv0 = script or module
    saved = sys.argv, os.getcwd()
    stderr = io.StringIO()
    patches = [(configurator, "load", load), (argparse.ArgumentParser, "parse_known_args", parse_known_args),
               (argparse.ArgumentParser, "parse_args", parse_args)]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        sys.argv = [argv0, *(args or [])]
        os.chdir(cwd)
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(script))  # as `python script.py` does
                try:
                    runpy.run_path(script, run_name="__main__")
                finally:
                    sys.path.remove(os.path.dirname(script))
        return "ran to the end without parsing its arguments", seen
    except _Parsed:
        return None, seen
    except SystemExit as e:
        return (None if e.code in (0, None) else f"exit {e.code}: {stderr.getvalue().strip()}"), seen
    except errors.UserError as e:
        return f"{type(e).__name__}: {e}", seen
    finally:
        for obj, name, value in originals:
            setattr(obj, name, value)
        sys.argv = saved[0]
        os.chdir(saved[1])


def _known_flags(seen: dict, script: str | None) -> set[str]:
    """Every --flag the captured parser (and its subcommands') or config schemas accept, and the flags a
    script reads itself before its config (the keys of a *FLAGS dict, "--smoke" literals)."""
    flags = set()
    if script is not None:
        tree = ast.parse(open(script).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--"):
                flags.add(node.value)
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                    isinstance(t, ast.Name) and t.id.endswith("FLAGS") for t in node.targets):
                flags.update(f"--{k.value}" for k in node.value.keys if isinstance(k, ast.Constant))
    parsers = [seen["parser"]] if "parser" in seen else []
    while parsers:
        p = parsers.pop()
        for action in p._actions:
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    for schema in seen.get("schemas", []):
        flags.update(f"--{name}" for name in schema.__dataclass_fields__)
    return flags


LAUNCHERS = ("torchrun", "accelerate")


def command_errors(cmd: str, cwd: str, inline: bool = False) -> tuple[list[str], str, list[str]]:
    """(problems, the cwd after it, the scripts it runs) of one shell command line run from cwd (absolute)."""
    errors, scripts = [], []
    for part in re.split(r"&&|;", cmd):
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if not words:
            continue
        if words[0] == "cd":
            cwd = os.path.normpath(os.path.join(cwd, words[1]))
            continue
        launcher = os.path.basename(words[0])
        script = module = None
        if launcher == "bash" and len(words) > 1 and words[1].endswith(".sh"):
            path = os.path.relpath(os.path.normpath(os.path.join(cwd, words[1])), ROOT)
            if GENERATED.search(path):
                continue
            if not os.path.isfile(os.path.join(ROOT, path)):
                errors.append(f"{cmd!r}: no script {path}")
            elif "case $part in" in (body := open(os.path.join(ROOT, path)).read()):  # bench/gpu_suite.sh PART ...
                parts = [w for w in words[2:] if not w.isupper()]  # PART: a placeholder
                unknown = [w for w in parts if not re.search(rf"^\s*{re.escape(w)}\)", body, flags=re.M)]
                if unknown:
                    errors.append(f"{cmd!r}: {path} has no part {unknown}")
            continue
        if re.fullmatch(r"python3?", launcher) and len(words) > 1:
            if words[1] == "-m" and words[2] != "torch.distributed.run":
                module, args = words[2], words[3:]
            elif words[1] == "-m" or words[1].endswith(".py"):
                script_at = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
                if script_at is None:
                    continue
                script, args = words[script_at], words[script_at + 1:]
            else:  # python -c, python - <<EOF
                continue
        elif launcher in LAUNCHERS:
            script_at = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
            if script_at is None:
                continue
            script, args = words[script_at], words[script_at + 1:]
        else:
            continue
        if module is not None:
            if not os.path.isfile(os.path.join(ROOT, *module.split("."), "__main__.py")):
                continue  # python -m pytest, pip, ...: not ours
            scripts.append(f"-m {module}")
        else:
            path = os.path.normpath(os.path.join(cwd, script))
            if GENERATED.search(os.path.relpath(path, ROOT)):  # data/<name>/prepare.py: a placeholder
                continue
            if not os.path.isfile(path):
                errors.append(f"{cmd!r}: no script {os.path.relpath(path, ROOT)}")
                continue
            script = path
            scripts.append(os.path.relpath(path, ROOT))
        args = [a for a in args if not a.startswith("$")]
        if inline or any(SYNOPSIS.search(a) for a in args):
            # a usage line or an inline fragment: the flags it names must exist; values are placeholders
            problem, seen = _run_parser(script, module, None, cwd)
            known = _known_flags(seen, script)
            flags = {re.split(r"[=\]|)]", a.lstrip("[("))[0] for a in args if a.lstrip("[(").startswith("--")}
            unknown = sorted(f for f in flags if f not in known)
            if problem or not known and flags or unknown:
                errors.append(f"{cmd!r}: unknown flags {unknown} ({problem or 'parsed'})")
        else:
            problem, _ = _run_parser(script, module, args, cwd)
            if problem:
                errors.append(f"{cmd!r}: {problem}")
    return errors, cwd, scripts


def doc_command_errors(text: str, doc: str) -> tuple[list[str], list[str]]:
    """(problems, scripts run) of every command in text: fenced bash blocks, then inline commands."""
    errors, scripts, cwd = [], [], ROOT
    for cmd in _commands(text):
        if cmd.startswith("\n"):
            cwd = ROOT
        e, cwd, s = command_errors(cmd.strip(), cwd)
        errors += e
        scripts += s
    for cmd in _inline_commands(text):
        e, _, s = command_errors(cmd, os.path.join(ROOT, INLINE_CWD.get(doc, "")), inline=True)
        errors += e
        scripts += s
    return errors, scripts


@pytest.mark.parametrize("doc", DOCS)
def test_commands_name_real_scripts_and_flags(doc):
    """Every command in the docs (GPU-only ones too) runs a script that exists, and that script's own parser
    (configurator.load against the typed configs, or argparse) accepts its arguments; nothing else runs."""
    errors, scripts = doc_command_errors(_doc(doc), doc)
    assert not errors, "\n".join(errors)
    if doc in ("README.md", "docs/TRAINING_GUIDE_DETAILED.md"):
        assert scripts.count("train.py") >= 5


def test_the_command_checks_can_fail():
    planted = {
        "python train.py config/tiny_gpt2.py --lerning_rate=1e-3": "unknown config key 'lerning_rate'",
        "python train.py config/tiny_gpt2.py --dtype=float8": "dtype",
        "python plots/analyze_run.py x.json --tokenz 1e9": "unrecognized arguments",
        "python scaling_laws.py plan --flops 1e21 --family gpt5": "invalid choice",
        "python bench/loss_bench.py --iters=three": "invalid int value",
        "python -m recipes megatron config/full_llama3_1.5b_optimal.py --ngpu 8 --tp 2 --tensor 2 --mock --out x":
            "unrecognized arguments",
        "python bench/no_such_bench.py --x=1": "no script bench/no_such_bench.py",
        "cd finetune && python validate_config.py --config c.yaml --wrld_size 8": "unrecognized arguments",
        "bash bench/no_such_suite.sh": "no script",
        "RESULTS=/tmp/x PY=python3 bash bench/gpu_suite.sh headline mikro": "has no part ['mikro']",
    }
    for cmd, message in planted.items():
        errors, _, _ = command_errors(cmd, ROOT)
        assert len(errors) == 1 and message in errors[0], (cmd, errors)
    errors, _, _ = command_errors("python -m recipes torchtitan CONFIG [--flaot8 tensorwise|rowwise]", ROOT)
    assert errors and "--flaot8" in errors[0]
    errors, _ = doc_command_errors("Run `python bench/vs_nanogpt.py --round 5`.", "README.md")
    assert errors and "--round" in errors[0]
    assert missing_paths("see `config/no_such_preset.py` and `../nowhere.py`", "finetune/README.md") == [
        "../nowhere.py", "config/no_such_preset.py"]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)```", _doc("README.md"), flags=re.S)
    run_cmd, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert "bash setup.sh" in run_cmd and "train.py config/train_shakespeare_char.py" in run_cmd
    assert "sample.py" in run_cmd and "data/shakespeare_char/prepare.py" in run_cmd
    assert test_cmd.startswith("bash setup.sh") and "pytest" in test_cmd
    ci = [line.strip() for line in _doc(".ci/run").splitlines() if line.strip() and not line.startswith("#")]
    assert test_cmd in ci, f".ci/run does not run the README's test command {test_cmd!r}"
    # then the engine checks, as TESTING.md documents them, without a skip on a failed venv build
    engines = ".venv/bin/python -m pytest -q -m engines tests/test_recipes_engines.py"
    after = ci[ci.index(test_cmd) + 1:]  # the engine checks follow the suite (after waiting for their venvs)
    assert engines in after[:2] and engines in _doc("TESTING.md")
    # the README's opening: a sentence, then the two commands before any other section
    before_sections = _doc("README.md").split("\n## ")[0]
    assert before_sections.count("```bash") == 2


def test_every_config_preset_is_documented_and_loads():
    readme = _doc("README.md")
    for path in sorted(glob.glob("config/*.py", root_dir=ROOT)):
        if os.path.basename(path).startswith("plan_"):
            continue  # written by scaling_laws.py plan; documented in docs/LLAMA3_AND_SCALING_LAW_IMPLEMENTATION.md
        assert path in readme, f"{path} is not in the README's quick reference"
        configurator.load([os.path.join(ROOT, path)], [TrainConfig, ModelConfig])


# -----------------------------------------------------------------------------
# Ratios: every ratio in bench/RESULTS.md and the README is checked against the figures beside it, the right way up

NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
# A ratio: "1.12x" (or ×), "(x1.03)", the first end of a range "1.06-1.11x", "150 times" (group: the number).
RATIO = re.compile(rf"(?<![\w.,])({NUM})[x×](?!\w)|(?<![\w.])[x×]({NUM})(?![\w-]|\.\d)"
                   rf"|(?<![\w.,])({NUM})(?=[-–](?:{NUM})[x×](?!\w))|(?<![\w.,])({NUM}) times\b")
PERCENT = re.compile(rf"(?<![\w.,])({NUM})%")
Span = tuple[float, float]  # the values a printed figure stands for, or what figures give: (low, high)


def _span(shown: str) -> Span:
    """The values that round to shown: half a unit of its last printed digit either way."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    value, half = float(shown.replace(",", "")), 0.5 * 10**-decimals
    return value - half, value + half


def _figure(cell: str) -> Span | None:
    m = re.search(NUM, cell.replace("**", ""))
    return _span(m[0]) if m else None


def _apply(op: str, a: Span, b: Span) -> Span:
    """a op b over every value the two spans allow (interval arithmetic)."""
    if op == "+":
        return a[0] + b[0], a[1] + b[1]
    if op == "-":
        return a[0] - b[1], a[1] - b[0]
    if op in ("/", "vs"):
        if b[0] <= 0 <= b[1]:
            raise ValueError("a divisor that may be zero")
        b = (1 / b[1], 1 / b[0])
    ends = [x * y for x in a for y in b]
    return min(ends), max(ends)


def _over(a: Span | None, b: Span | None) -> Span | None:
    return _apply("/", a, b) if a and b else None


def _agrees(given: Span, shown: str) -> bool:
    """Some value the figures allow rounds to shown (printed ratios and figures are both rounded)."""
    low, high = _span(shown)
    return given[0] <= high + 1e-9 and low - 1e-9 <= given[1]


# The figures of a ratio, in parentheses after it: "A vs B" (A over B) or arithmetic of + - * / and parentheses over
# numbers, a unit after any number ("33 vs 40 tokens/s", "(1623.45 + 947.16) / (1557.67 + 73.67)"), then the end
# or a ";", "," or ":" and anything.
FIGURE_TOKEN = re.compile(rf"\s*(?:({NUM})(?:\s*(?!vs\b)[A-Za-z]+(?:/[A-Za-z]+)?)?|(vs\b|[-+*/()]))")


def evaluate_figures(expression: str) -> Span | None:
    """What the figures in expression give, or None when it is not a ratio of figures in the form above. A
    tiny recursive-descent parser: nothing in the text is ever run."""
    tokens, at = [], 0  # a number as printed, or an operator
    while m := FIGURE_TOKEN.match(expression, at):
        tokens.append(_span(m[1]) if m[1] else m[2])
        at = m.end()
    if not re.fullmatch(r"\s*([;,:].*)?", expression[at:], flags=re.S) or not {"/", "vs"} & set(
            t for t in tokens if isinstance(t, str)):
        return None
    pos = 0

    def atom() -> Span:
        nonlocal pos
        token = tokens[pos] if pos < len(tokens) else None
        pos += 1
        if isinstance(token, tuple):
            return token
        if token == "(":
            value = ratio()
            if pos >= len(tokens) or tokens[pos] != ")":
                raise ValueError("an unclosed parenthesis")
            pos += 1
            return value
        raise ValueError("a number or a parenthesis expected")

    def chain(operand, ops: tuple[str, ...]) -> Span:  # operand (op operand)*, left to right
        nonlocal pos
        value = operand()
        while pos < len(tokens) and isinstance(tokens[pos], str) and tokens[pos] in ops:
            pos += 1
            value = _apply(tokens[pos - 1], value, operand())
        return value

    def ratio() -> Span:  # "vs" binds loosest: a + b vs c is (a + b) / c
        return chain(lambda: chain(lambda: chain(atom, ("*", "/")), ("+", "-")), ("vs",))

    try:
        value = ratio()
    except ValueError:
        return None
    return value if pos == len(tokens) else None


def _figures_after(text: str, end: int) -> tuple[str, Span] | None:
    """The parenthesised figures that follow a ratio ending at end: within 80 characters, with no other ratio,
    parenthesis, table cell or sentence end between them (a line break is fine)."""
    start = text.find("(", end)
    gap = text[end:start]
    if start < 0 or len(gap) > 80 or re.search(r"[)|]|\.\s", gap) or RATIO.search(gap):
        return None
    depth, close = 0, start
    for close in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[close], 0)
        if depth == 0:
            break
    value = evaluate_figures(text[start + 1:close])
    return (text[start + 1:close], value) if value else None


def _table_cells(text: str) -> list[list[list[tuple[int, str]]]]:
    """Markdown tables as rows of (offset in text, cell) pairs, the separator row dropped."""
    tables, rows, offset = [], [], 0
    for line in [*text.splitlines(keepends=True), ""]:
        if line.startswith("|"):
            cells, at = [], offset + 1
            for raw in line.strip().strip("|").split("|"):
                cells.append((at + len(raw) - len(raw.lstrip()), raw.strip()))
                at += len(raw) + 1
            if not all(re.fullmatch(r":?-+:?", c) for _, c in cells):
                rows.append(cells)
        elif rows:
            tables.append(rows)
            rows = []
        offset += len(line)
    return tables


def _tables(text: str) -> list[list[list[str]]]:
    """Markdown tables as rows of cells, the separator row dropped."""
    return [[[cell for _, cell in row] for row in table] for table in _table_cells(text)]


def _exempt(text: str, start: int, end: int) -> str | None:
    """Which kind of ratio that is not a ratio of figures the one at text[start:end] is, if any (see
    test_every_ratio_is_checked)."""
    after, before = text[end:end + 40], text[max(0, start - 20):start]
    if re.match(r"\s+(?:\S+\s+){0,2}?(?:lr|learning rate)\b", after):
        return "a setting"
    if re.match(r"\s+(?:goal|target)\b", after) or re.search(r"\b(?:goal|target) (?:is|of)\s+x?$", before):
        return "a target"
    if "(figures not kept)" in re.split(r"\.\s", text[end:], maxsplit=1)[0]:
        return "figures not kept"
    return None


def _sentence(text: str, start: int, end: int) -> str:
    """The sentence (or table cell) around text[start:end]."""
    stops = r"\.\s|\n\n|\|"
    before = [m.end() for m in re.finditer(stops, text[:start])]
    after = re.search(stops, text[end:])
    return text[before[-1] if before else 0:end + after.start() if after else len(text)]


def ratio_report(text: str) -> tuple[list[str], set[str]]:
    """(problems, the ratios checked against their figures, as printed) of text: a ratio that its figures do
    not give, a ratio column this cannot read, and a ratio checked against no figures that is none of the
    exempt kinds (see test_every_ratio_is_checked)."""
    errors, checked = [], {}  # offset of a ratio's number -> as printed

    def check(where: str, given: Span | None, shown: str, at: int) -> None:
        checked[at] = shown
        if given is None:
            errors.append(f"{where}: printed {shown}, but its figures are missing")
        elif not _agrees(given, shown):
            errors.append(f"{where}: printed {shown}, the figures give {given[0]:.4g} to {given[1]:.4g}")

    for table in _table_cells(text):
        header, rows = [c for _, c in table[0]], table[1:]
        for k, name in enumerate(header):
            ab = re.fullmatch(r"(?:ratio )?(.+?) / (.+)", name)
            a, b = ((next((j for j, h in enumerate(header) if j != k and re.match(rf"{re.escape(x)}\b", h)), None)
                     for x in ab.groups()) if ab else (None, None))
            if not name.lower().startswith("ratio") and (a is None or b is None):
                continue
            for row in rows:
                off, cell = row[k]
                m = re.match(rf"\**({NUM})x?", cell)
                if not m:
                    continue
                where, at = f"{row[0][1]!r}, {name!r}", off + m.start(1)
                cells = [_figure(c) for _, c in row]
                if a is not None and b is not None:  # "ours / HF", "ratio ours / nanoGPT": those columns
                    check(where, _over(cells[a], cells[b]), m[1], at)
                elif name == "ratio":  # the two columns before it, the first over the second
                    check(where, _over(cells[k - 2], cells[k - 1]), m[1], at)
                elif name.startswith("ratio vs "):  # this row's figure over the named reference row's
                    ref = next((r for r in rows if name[len("ratio vs "):] in r[0][1]), None)
                    check(where, _over(cells[k - 1], ref and _figure(ref[k - 1][1])), m[1], at)
                elif name == "ratio to the faster bare route":
                    check(where, _over(cells[1], max(cells[2], cells[3])), m[1], at)
                else:
                    errors.append(f"a ratio column this test cannot check: {name!r}")
        for i, row in enumerate(rows):
            if row[0][1].lower().startswith("ratio") and i >= 2:  # a ratio row: the two rows above it
                for j in range(1, len(row)):
                    m = re.match(rf"\**({NUM})x", row[j][1])
                    a, b = _figure(rows[i - 2][j][1]), _figure(rows[i - 1][j][1])
                    if m and a and b:  # the first row over the second, as every table here puts ours first
                        check(f"ratio row, column {header[j]!r}", _over(a, b), m[1], row[j][0] + m.start(1))
            peak = next((j for j, h in enumerate(header) if h.startswith("peak GiB")), None)
            for j, (off, cell) in enumerate(row):
                m = re.fullmatch(rf"({NUM}) \(x({NUM})\)", cell)
                if m and peak is None:
                    errors.append(f"{cell!r}: an (x ratio) without a peak GiB column to check it against")
                elif m:  # an estimate (x peak / estimate)
                    check(f"{row[0][1]!r}, {header[j]!r}", _over(_figure(row[peak][1]), _span(m[1])), m[2],
                          off + m.start(2))
                elif (m := re.fullmatch(rf"({NUM}) \(({NUM})x\)", cell)) and j > 1:  # a figure (x the first one)
                    check(f"{row[0][1]!r}, {header[j]!r}", _over(_span(m[1]), _figure(row[1][1])), m[2],
                          off + m.start(2))
        if "share" in header:  # each row's ms over the table's total
            ms, share = header.index("ms"), header.index("share")
            total = (0.0, 0.0)
            for row in rows:
                total = _apply("+", total, _figure(row[ms][1]))
            for row in rows:
                given = _apply("*", (100, 100), _apply("/", _figure(row[ms][1]), total))
                check(f"{row[0][1][:40]!r}, share", given, row[share][1].rstrip("%"), row[share][0])
    # in prose and cells: "1.01x (671 vs 663 tok/s)", "39% of its peak memory (1,567 vs 4,056 MiB)", "1.58x an
    # AdamW step ((1623.45 + 947.16) / (1557.67 + 73.67))", across a line break too
    ratios = [(m.start(g), m.end(), m[g]) for m in RATIO.finditer(text) for g in range(1, 5) if m[g]]
    percents = [(m.start(1), m.end(), m[1]) for m in PERCENT.finditer(text)]
    for start, end, shown in ratios + percents:  # a percentage is checked where its figures follow it
        if start in checked or not (found := _figures_after(text, end)):
            continue
        scale = (100, 100) if text[end - 1] == "%" else (1, 1)
        check(f"{text[start:end]} ({found[0]})".replace("\n", " "), _apply("*", scale, found[1]), shown, start)
    repeats = set(checked.values())
    for start, end, shown in ratios:
        if start in checked or _exempt(text, start, end):
            continue
        if shown not in repeats or not re.search(r"\b(above|below|table|section)\b", _sentence(text, start, end)):
            line, ratio = text.count("\n", 0, start) + 1, text[start - (text[start - 1] in "x×"):end]
            context = " ".join(text[max(0, start - 40):end + 40].split())
            errors.append(f"line {line}: {ratio!r} ({context!r}) is checked against no figures: write 'R (A vs B)' "
                          "or 'R ((A + B) / C)' beside it, or it is a kind the test exempts")
    return errors, set(checked.values())


def ratio_errors(text: str) -> list[str]:
    return ratio_report(text)[0]


def test_every_ratio_is_checked():
    """Every ratio in bench/RESULTS.md and the README ("1.12x", "(x1.03)", "1.06-1.11x", "150 times", and every
    cell of a ratio column or row) is the ratio of the figures beside it, the right way up: a table's ratio
    column or row, or "R (A vs B)" / "R ((A + B) / C)" in prose or a cell. Figures and ratios are both rounded
    as printed, so a ratio passes when some values that round to the figures give a value that rounds to it.
    The kinds that are not a ratio of figures, and pass unchecked (planted in test_the_ratio_checks_can_fail):
    - a setting: "lr" or "learning rate" within the next three words ("x5 lr", "a 3x learning rate");
    - a target: "the 0.4x goal", "the 1.2x target", "the target is 0.8x";
    - a repeat: the same printed figure as a ratio checked in the same doc, in a sentence that says where
      (above, below, table or section: "the 1.04x above", "1.44-1.93x in the table above");
    - figures not kept: "(figures not kept)" later in the same sentence, for runs whose figures were not kept.
    Any other ratio without its figures fails."""
    errors, checked = ratio_report(_doc("bench/RESULTS.md"))
    errors += [f"README.md: {e}" for e in ratio_errors(_doc("README.md"))]
    assert not errors, "\n".join(errors)
    assert len(checked) >= 60


def test_the_ratio_checks_can_fail():
    """Each planted text holds one wrong or unchecked ratio: upside down (a ratio row, prose across a line
    break), a wrong arithmetic ratio, a ratio with no figures beside it, and a near miss of each exempt kind."""
    planted = [
        "| model | tokens/s |\n|---|---|\n| ours | 100 |\n| HF | 50 |\n| ratio | 2.10x |\n",
        "| compile | ours | HF | ratio |\n|---|---|---|---|\n| False | 499 | 481 | 1.05x |\n",
        "| | ours | nanoGPT | ratio ours / nanoGPT |\n|---|---|---|---|\n| after | 73.6 ms | 79.9 ms | 0.925 |\n",
        "| run | ours (tokens/s) | HF (tokens/s) | ours / HF |\n|---|---|---|---|\n| a | 45 | 31 | 0.69x |\n",
        "| loss | ms | ratio vs F.cross_entropy |\n|---|---|---|\n| F.cross_entropy | 1000 | 1.00 |\n| a | 700 | 0.75 |\n",
        "| t | a | b | c | ratio to the faster bare route |\n|---|---|---|---|---|\n| g | 800 | 900 | 1000 | 0.9x |\n",
        "| run | peak GiB | estimate |\n|---|---|---|\n| a | 53.13 | 47.59 (x1.10) |\n",
        "| GEMM | bf16 | fp8 |\n|---|---|---|\n| head | 662 | 950 (1.41x) |\n",
        "| part | ms | share |\n|---|---|---|\n| a | 30 | 30% |\n| b | 70 | 60% |\n",
        "the KV cache was 0.86x uncached (33 vs 40 tokens/s)",
        "the step is 1.19x the\ntime of the reference (41.0 vs 48.9 ms)",  # across a line break, upside down
        "| model | tokens/s |\n|---|---|\n| ours | 100 |\n| HF | 50 |\n| ratio | 0.50x |\n",  # upside down
        "with 40% of its peak memory (1,567 vs 4,056 MiB)",
        "| x | ratio of things |\n|---|---|\n| a | 1.0x |\n",
        "A Muon step took 1.68x an AdamW step ((1623.45 + 947.16) / (1557.67 + 73.67)).",  # wrong arithmetic
        "0.25x (1.000 / 2.000 * 2.000)",  # arithmetic: left to right, * and / before + and -, vs last
        "3.0x (2.00 + 2.00 * 3.00 vs 4.00)",
        "the best recipe takes 0.63x the AdamW recipe's time to its loss.",  # no figures
        "an iteration costs about 1.75x here (317.2 s for 800 against 434.1 s for 2000)",  # figures it cannot read
        "it takes 0.63x the time (272.9 vs 433.2 s). It needs 0.36x the iterations.",  # the figures are the other's
        "| change | tokens/s |\n|---|---|\n| a | 1.12x |\n",  # a ratio in a column that is not a ratio's
        "ours is 1.50× HF's speed (100 vs 50 tokens/s), 15 times its quiet time",  # × and "N times" count too
        "x5 was the best scale, and the run at x5 reached the loss first (x5 lr above).",  # a setting needs lr
        "short of 0.4x, the goal",  # a target is "the R goal", "the R target" or "the target is R"
        "the 1.04x above was another VM (1.04x in the table)",  # a repeat of nothing checked
        "| compile | ours | HF | ratio |\n|---|---|---|---|\n| False | 499 | 481 | 1.04x |\n\nours is 1.04x HF's speed",
        "earlier runs gave 0.80x (gpt2). Their figures were not kept.",  # not kept, said in another sentence
    ]
    for text in planted:
        assert ratio_errors(text), text
    fixed = [
        "| model | tokens/s |\n|---|---|\n| ours | 100 |\n| HF | 50 |\n| ratio | 2.00x |\n",
        "0.83x uncached (33 vs 40 tokens/s)",
        "| run | ours (tokens/s) | HF (tokens/s) | ours / HF |\n|---|---|---|---|\n| a | 45 | 31 | 1.44x |\n",
        "A Muon step took 1.58x an AdamW step ((1623.45 + 947.16) / (1557.67 + 73.67)).",
        "1.00x (1.000 / 2.000 * 2.000), 2.0x (2.00 + 2.00 * 3.00 vs 4.00), 0.25x ((1.000 - 0.500) / 2.000)",
        "x5 lr was best; a 3x learning rate; 5x the schedule's lr",
        "short of the 0.4x goal; not the 1.2x target; the target is\n0.8x",
        "1.12x (66,972 vs 59,875 tokens/s) in tokens/s; the whole step gains the 1.12x above, 1.12-1.12x in the table",
        "earlier runs gave 0.80x (gpt2) and 0.88x (llama3) when it was quiet (figures not kept).",
    ]
    for text in fixed:
        assert ratio_errors(text) == [], text
    assert evaluate_figures("__import__('os') / 1") is None and evaluate_figures("2 * (3 / 4") is None


# -----------------------------------------------------------------------------
# Figures most likely to drift, recomputed from the code that makes them. Planted: a changed digit fails each.


def test_readme_parameter_table_is_what_the_presets_build():
    import torch

    from model import GPT

    rows = [r for table in _tables(_doc("README.md")) if table[0][:4] == ["model", "config", "shape", "parameters"]
            for r in table[1:]]
    checked = 0
    for row in rows:
        path, count = re.search(r"`(config/[\w.]+\.py)`", row[1]), re.fullmatch(r"[\d,]{5,}", row[3])
        if not (path and count):
            continue
        _, mc, _ = configurator.load_train([os.path.join(ROOT, path[1])])
        with torch.device("meta"):
            n = GPT(mc).num_params()
        assert f"{n:,}" == row[3], (row[0], n)
        assert row[2].startswith(mc.arch_string.split(" ")[0]), (row[0], mc.arch_string)
        checked += 1
    assert checked >= 7
    assert f"{1_544_628_225:,}" != "1,544,628,224"  # the planted digit: the comparison above is exact


def test_training_guide_memory_table_is_what_the_dry_run_estimates(monkeypatch, capsys):
    """The guide's table of GiB per GPU, every cell recomputed with train.dry_run at the command it names."""
    import train

    text = _doc("docs/TRAINING_GUIDE_DETAILED.md")
    (table,) = [t for t in _tables(text) if t[0][0] == "preset (batch per GPU)"]
    columns = {"2 GPUs, ZeRO-1": (2, ["--use_zero1=True"]), "2 GPUs, FSDP": (2, ["--use_fsdp=True"]),
               "8 GPUs, ZeRO-1": (8, ["--use_zero1=True", "--gradient_accumulation_steps=8"]),
               "8 GPUs, FSDP": (8, ["--use_fsdp=True", "--gradient_accumulation_steps=8"])}
    assert table[0][1:] == list(columns)
    for row in table[1:]:
        preset = re.match(r"`([\w.]+\.py)`", row[0])[1]
        for name, cell in zip(table[0][1:], row[1:]):
            world, flags = columns[name]
            monkeypatch.setenv("WORLD_SIZE", str(world))
            tc, mc, explicit = configurator.load_train([os.path.join(ROOT, "config", preset), "--dry_run=True",
                                                        "--compile=True", *flags])
            train.dry_run(tc, mc, explicit)
            (gib,) = re.findall(r"; total ([\d.]+) GiB", capsys.readouterr().out)  # as the dry run prints it
            assert f"{gib} GiB" == cell, (preset, name, gib)
            assert f"{float(gib) + 0.01:.2f} GiB" != cell


def test_finetune_readme_validate_config_output_is_what_it_prints(monkeypatch, capsys):
    """finetune/README's memory estimate for the guide's 8B config, line for line."""
    from finetune import validate_config

    text = _doc("finetune/README.md")
    block = re.search(r"```\npython validate_config\.py (--config configs/Llama-3\.1/llama3\.1_8b_metamath\.yaml "
                      r"[^\n]*)\n(.*?)```", text, re.S)
    monkeypatch.chdir(os.path.join(ROOT, "finetune"))
    capsys.readouterr()
    assert validate_config.main(shlex.split(block[1])) == 0
    out = capsys.readouterr().out.splitlines()
    for line in block[2].splitlines():
        assert line in out, line
        assert line.replace("14.96", "14.97") == line or line.replace("14.96", "14.97") not in out
