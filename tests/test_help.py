"""Every entry script answers --help (exit 0) with each of its keys or options, its default and a one-line meaning,
and a usage mistake is one `error:` line and exit status 2.

The scripts run in this process (runpy, as __main__) until they parse their arguments: seconds for all of them,
where a fresh interpreter each would take minutes. The key tables are generated from the typed configs
(configurator.help_text, finetune.config.keys_epilog), so these tests check the generator and that every field
has its meaning. Planted mistakes show each check can fail: a field without a comment (below); the option check
failed on the subcommands of scaling_laws.py and `python -m recipes` before they had meanings, and the exit-2 check
on the benches that used plain argparse (a usage dump and `prog: error:`).
"""

import argparse
import contextlib
import dataclasses
import io
import os
import runpy
import sys

import pytest

import configurator
from finetune.config import FinetuneConfig, keys_epilog
from model import ModelConfig
from train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entry_scripts() -> list[str]:
    """Every .py below the root (tests aside) with a __main__ block, and `-m recipes`."""
    out = ["-m recipes"]
    for folder, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        if rel.split(os.sep)[0] in (".venv", ".git", "tests", "__pycache__"):
            dirs[:] = []
            continue
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.normpath(os.path.join(rel, name))
            with open(os.path.join(ROOT, path)) as f:
                if 'if __name__ == "__main__"' in f.read() and path != os.path.join("recipes", "__main__.py"):
                    out.append(path)
    return sorted(out)


def run_script(script: str, argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of script run in this process with argv; sys.path, sys.argv and the cwd
    are restored afterwards."""
    out, err = io.StringIO(), io.StringIO()
    saved_path, saved_argv, cwd = list(sys.path), list(sys.argv), os.getcwd()
    code = 0
    try:
        os.chdir(ROOT)
        sys.argv = [script, *argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if script.startswith("-m "):
                runpy.run_module(script[3:], run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.join(ROOT, script)))
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.path[:], sys.argv[:] = saved_path, saved_argv
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()


SCRIPTS = entry_scripts()


def test_the_scan_finds_every_kind_of_entry_script():
    for script in ("train.py", "sample.py", "export_hf.py", "finetune/train.py", "finetune/validate_config.py",
                   "data/shakespeare_char/prepare.py", "data/slimpajama_6b_gpt2/prepare.py", "bench/gpu_step.py",
                   "bench/loss_bench.py", "plots/compare_runs.py", "scaling_laws.py", "-m recipes"):
        assert script in SCRIPTS, script


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0_and_lists_every_option_with_a_meaning(script, monkeypatch):
    parsers = []
    for name in ("parse_args", "parse_known_args", "parse_intermixed_args"):  # keep the parser --help printed
        real = getattr(argparse.ArgumentParser, name)

        def spy(self, *args, _real=real, **kwargs):
            parsers.append(self)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(argparse.ArgumentParser, name, spy)
    code, out, err = run_script(script, ["--help"])
    assert code == 0 and out.count("\n") >= 3 and not err, (script, code, err[-2000:])
    for p in list(parsers):  # a command's subcommands (python -m recipes torchtitan, scaling_laws.py plan)
        parsers += [sub for a in p._actions if isinstance(a, argparse._SubParsersAction) for sub in a.choices.values()]
    missing = [a.option_strings or a.dest for p in parsers for a in p._actions
               if not a.help and not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)]
    assert not missing, f"{script}: options without a one-line meaning: {missing}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_usage_mistake_is_one_error_line_and_exit_2(script):
    code, out, err = run_script(script, ["--no_such_flag=1"])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (script, code, err[-2000:])


def test_config_help_lists_every_key_with_its_default_and_meaning():
    text = configurator.help_text([TrainConfig, ModelConfig], "usage: train.py CONFIG")
    assert text.startswith("usage: train.py CONFIG")
    for schema in (TrainConfig, ModelConfig):
        meanings = configurator.field_help(schema)
        for f in dataclasses.fields(schema):
            assert meanings[f.name], f"{schema.__name__}.{f.name} has no one-line meaning (a comment on its line)"
    lines = text.splitlines()
    assert sum(line.lstrip().startswith("--block_size=") for line in lines) == 1  # shared by both: listed once
    assert any(line.split() == ["--batch_size=12", "sequences", "per", "rank", "per", "micro-step"] for line in lines)
    assert "  --fp8=''" in text and "  --lr_decay_iters=None" in text
    # the finetune table: section.key=default and the meaning, every field of every section
    epilog = keys_epilog()
    for section in dataclasses.fields(FinetuneConfig):
        schema = type(section.default_factory())
        meanings = configurator.field_help(schema)
        for f in dataclasses.fields(schema):
            assert meanings[f.name], f"{schema.__name__}.{f.name} has no one-line meaning"
            assert f"  {section.name}.{f.name}=" in epilog
    assert any(line.split()[:2] == ["lora.r=8", "adapter"] for line in epilog.splitlines())


@dataclasses.dataclass
class _Planted:
    documented: int = 3  # a meaning
    undocumented: str = "x"
    spread: float = (
        0.5
    )  # the comment sits on the statement's last line


def test_a_field_without_a_meaning_is_found():
    """Planted: a field with no comment has an empty meaning, which the test above rejects."""
    assert configurator.field_help(_Planted) == {"documented": "a meaning", "undocumented": "",
                                                 "spread": "the comment sits on the statement's last line"}
    assert "  --undocumented=x\n" in configurator.help_text([_Planted]) + "\n"
