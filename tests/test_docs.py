"""The documentation is true: named files exist, commands parse, and CI runs the README's test command."""

import glob
import os
import re
import shlex

import pytest

import configurator
from configurator import TrainConfig
from model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "SYSTEM_OVERVIEW.md", "TESTING.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]

# Files that commands create (outputs, prepared data) rather than files the repository holds.
GENERATED = re.compile(
    r"(^|/)(train|val)(_\d+)?\.bin$|(^|/)meta\.(json|pkl)$|(^|/)input\.txt$|run_.*\.json$|\.png$"
    r"|(^|/)(model|optimizer.*|rng.*|scaler)\.pt$|(^|/)state\.json$|(^|/)ckpt(\.tmp|\.old)?/?$"
    r"|^data/\.cache|^data/<|^config/<|^data/X(/|$)|^config/plan_.*\.py$"
    r"|^recipes_out/|^exports/|(^|/)(run_train\.sh|nanollm_titan\.py|pretrain_gpt\.py)$|^train_[\w.<>-]+\.sh$"
)
PATH = re.compile(r"(?<![\w./*-])((?:config|data|plots|docs|bench|tests|\.ci)/[\w./<>*-]*[\w>*]"
                  r"|[A-Za-z_][\w-]*\.(?:py|md|sh|toml|txt))(?![\w/])")


def _doc(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


@pytest.mark.parametrize("doc", DOCS)
def test_named_files_exist(doc):
    text = _doc(doc)
    missing = []
    for path in sorted(set(PATH.findall(text))):
        if "*" in path or GENERATED.search(path) or path.startswith(("/", "out-")):
            continue
        candidates = [path, os.path.join(os.path.dirname(doc), path)]
        if "/" not in path:  # a bare file name: somewhere in the repository
            candidates += glob.glob(os.path.join("**", path), root_dir=ROOT, recursive=True)
        if not any(os.path.exists(os.path.join(ROOT, c)) for c in candidates):
            missing.append(path)
    assert not missing, f"{doc} names files that do not exist: {missing}"


def _commands(text: str) -> list[str]:
    """Shell commands in fenced blocks, with backslash continuations joined and comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split(" # ")[0].strip()
            if cmd and not cmd.startswith("#"):
                out.append(cmd)
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_train_commands_parse(doc):
    """Every train.py command in the docs (GPU-only ones too) uses real keys with valid values."""
    checked = 0
    for cmd in _commands(_doc(doc)):
        for part in cmd.split("&&"):
            if "train.py" not in part:
                continue
            words = shlex.split(part)
            args = [w for w in words[words.index("train.py") + 1 :] if not w.startswith("$")]
            configurator.load(args, [TrainConfig, ModelConfig])  # raises ConfigError on any bad key or value
            checked += 1
    if doc in ("README.md", "docs/TRAINING_GUIDE_DETAILED.md"):
        assert checked >= 5


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)```", _doc("README.md"), flags=re.S)
    run_cmd, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert "bash setup.sh" in run_cmd and "train.py config/train_shakespeare_char.py" in run_cmd
    assert "sample.py" in run_cmd and "data/shakespeare_char/prepare.py" in run_cmd
    assert test_cmd.startswith("bash setup.sh") and "pytest" in test_cmd
    ci = [line.strip() for line in _doc(".ci/run").splitlines() if line.strip() and not line.startswith("#")]
    assert test_cmd in ci, f".ci/run does not run the README's test command {test_cmd!r}"
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
