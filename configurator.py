"""
What the user typed: nanoGPT-style config files and --key=value overrides, checked against typed
dataclasses (train_config.TrainConfig, model.ModelConfig, finetune's configs), and the folders a
user names.

    python train.py config/full_llama3_1.5b_optimal.py --batch_size=8 --compile=True

A config file is Python assignments. It runs in a private namespace (never the caller's globals),
and its public names, then the overrides, are checked against the fields of the given dataclasses:
an unknown key is rejected with the closest known key, a value of the wrong type is rejected with
the expected type. A key that several dataclasses share (e.g. block_size) is given to each.
Mistakes raise errors.ConfigError (one `error:` line under errors.run_command).
`--help` lists every key with its default and its one-line meaning, read from the comment on the field's
line in the dataclass, so the help cannot drift from the code.
This module imports no torch, so light commands (plots, data preparation) stay light.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import math
import os
import runpy
import tempfile
import textwrap
import tokenize
import types
import typing
from dataclasses import fields

from errors import ConfigError
from train_config import TrainConfig

# Flags of the original training guide that are spelled differently now.
LEGACY_KEYS = {"flash_attn"}


def read_config_file(path: str) -> dict:
    """Run a config file in a fresh namespace and return its public assignments."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        namespace = runpy.run_path(path, init_globals={})
    except Exception as e:
        raise ConfigError(f"could not execute config file {path}: {type(e).__name__}: {e}") from e
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_") and not isinstance(v, types.ModuleType | types.FunctionType | type)
    }


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--lr=3e-4', ...] -> {'lr': '3e-4'}; values stay strings until their field's type is known."""
    out: dict[str, str] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"cannot parse argument {arg!r}; overrides are written --key=value")
        key, value = arg[2:].split("=", 1)
        out[key] = value
    return out


def _field_types(schemas: list[type]) -> dict[str, list[tuple[type, typing.Any]]]:
    """key -> [(schema, annotated type)] for every field of every schema."""
    out: dict[str, list[tuple[type, typing.Any]]] = {}
    for schema in schemas:
        hints = typing.get_type_hints(schema)
        for f in fields(schema):
            out.setdefault(f.name, []).append((schema, hints[f.name]))
    return out


def coerce(key: str, value: typing.Any, annotation: typing.Any) -> typing.Any:
    """Convert value (a CLI string or a config-file object) to the annotated type, or raise ConfigError."""
    args = typing.get_args(annotation)
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value in ("None", "none", "null")):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if annotation is bool:  # True or False only: `--compile=yes` or `=1` is a typo as likely as a wish
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r} is not a boolean; use True or False")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = None
            if isinstance(parsed, float) and parsed.is_integer():
                parsed = int(parsed)  # allows 1e6 for counts
            if isinstance(parsed, int) and not isinstance(parsed, bool):
                return parsed
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} is not an integer")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            result = float(value)
        elif isinstance(value, str):
            try:
                result = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not a number") from None
        else:
            raise ConfigError(f"{key}={value!r} is not a number")
        if not math.isfinite(result):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return result
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} is not a string")
    raise AssertionError(f"unsupported annotation {annotation} for {key}")


def suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def resolve(values: dict[str, typing.Any], schemas: list[type]) -> list[typing.Any]:
    """Route flat key/values to instances of each schema, with type checks and legacy keys.

    Returns one instance per schema, in order; each schema's own __post_init__ checks its values.
    """
    types_by_key = _field_types(schemas)
    values = dict(values)
    if "flash_attn" in values:
        # The training guide's --flash_attn=True means attention_backend=flash_attn_2.
        use_flash = coerce("flash_attn", values.pop("flash_attn"), bool)
        if use_flash:
            values["attention_backend"] = "flash_attn_2"
        elif values.get("attention_backend", "flash_attn_2") == "flash_attn_2":
            values["attention_backend"] = "sdpa"
    kwargs: list[dict[str, typing.Any]] = [{} for _ in schemas]
    for key, value in values.items():
        if key not in types_by_key:
            raise ConfigError(
                f"unknown config key '{key}'{suggest(key, list(types_by_key) + list(LEGACY_KEYS))}"
            )
        for schema, annotation in types_by_key[key]:
            kwargs[schemas.index(schema)][key] = coerce(key, value, annotation)
    out = []
    for schema, kw in zip(schemas, kwargs):
        try:
            out.append(schema(**kw))
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return out


HELP_FLAGS = ("-h", "--help")


def field_help(schema: type) -> dict[str, str]:
    """Field name -> its one-line meaning: the comment on the field's line in the class source ('' if none)."""
    source = textwrap.dedent(inspect.getsource(schema))
    comments = {t.start[0]: t.string[1:].strip() for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    cls = ast.parse(source).body[0]
    return {node.target.id: comments.get(node.end_lineno, "")
            for node in cls.body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


def _shown(value: typing.Any) -> str:
    """A default as a user would type it after `=`."""
    if isinstance(value, str) and (not value or not value.isprintable() or " " in value):
        return repr(value)
    return str(value)


def keys_help(schemas: list[type], prefix: str = "") -> list[tuple[str, str]]:
    """(`key=default`, meaning) for every key of schemas; a field whose default is a dataclass (a section of
    a YAML config) gives its keys as section.key. A key that several schemas share is listed once."""
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for schema in schemas:
        meanings = field_help(schema)
        for f in fields(schema):
            if f.name in seen:
                continue
            seen.add(f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                rows += keys_help([type(default)], f"{prefix}{f.name}.")
            else:
                rows.append((f"{prefix}{f.name}={_shown(default)}", meanings[f.name]))
    return rows


def format_keys(rows: list[tuple[str, str]], dashes: str = "--") -> str:
    """keys_help's rows as aligned lines: `  --key=default   meaning`."""
    width = min(36, max(len(key) for key, _ in rows) + len(dashes))
    return "\n".join(f"  {dashes + key:<{width}}  {meaning}".rstrip() for key, meaning in rows)


def help_text(schemas: list[type], doc: str | None = None) -> str:
    """--help of a command that takes `[CONFIG.py] [--key=value ...]`: its docstring (usage and examples),
    then every key of schemas with its default and meaning."""
    head = doc.strip() if doc else "usage: [CONFIG.py] [--key=value ...]"
    return (f"{head}\n\nkeys (assignments in CONFIG.py, or --key=value; the default after =):\n"
            + format_keys(keys_help(schemas)))


def load(args: list[str], schemas: list[type], doc: str | None = None) -> tuple[list[typing.Any], set[str]]:
    """Parse `[CONFIG.py] [--key=value ...]` into schema instances; -h or --help prints help_text(schemas, doc)
    and exits 0.

    Returns (instances, explicit keys): the keys set by the file or the command line, as opposed
    to defaults, so callers can tell "n_layer=12 because the user said so" from a default.
    """
    if any(a in HELP_FLAGS for a in args):
        print(help_text(schemas, doc))
        raise SystemExit(0)
    config_path = None
    if args and not args[0].startswith("--"):
        config_path, args = args[0], args[1:]
    values = read_config_file(config_path) if config_path else {}
    values.update(parse_overrides(args))
    explicit = set(values) - LEGACY_KEYS
    if "flash_attn" in values:
        explicit.add("attention_backend")
    return resolve(values, schemas), explicit


def load_train(args: list[str], doc: str | None = None) -> tuple[TrainConfig, typing.Any, set[str]]:
    """`[CONFIG.py] [--key=value ...]` of train.py as (TrainConfig, model.ModelConfig, explicitly set keys)."""
    from model import ModelConfig  # torch: only for the commands that build a model

    (train_cfg, model_cfg), explicit = load(args, [TrainConfig, ModelConfig], doc)
    return train_cfg, model_cfg, explicit


def check_input_dir(path: str, flag: str, needs: tuple[str, ...] = ()) -> str:
    """path, ~ expanded, if it is a folder holding every file of needs; else a ConfigError naming flag."""
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise ConfigError(f"{flag}={path} is not a folder")
    missing = [f for f in needs if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ConfigError(f"{flag}={path} has no {missing[0]}; pass a folder that holds {', '.join(needs)}")
    return path


def check_output_dir(path: str, flag: str = "out_dir") -> None:
    """Create the folder path if needed and prove it writable, or a ConfigError naming it: before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--{flag}={path} is a file, not a folder; choose another --{flag}")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--{flag}={path} cannot be written ({e.strerror or type(e).__name__}); choose a "
                          f"writable --{flag}") from None
