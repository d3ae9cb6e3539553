"""The layout: no import circle between the project's modules (every .py below the root but tests/, data/
scripts and relative imports included), model.py imports only its loss leaf, and
sys.path is edited once at most, at the top of an entry script outside the root, never in a library module.

Every import counts, at the top of a file or inside a function: a lazy import hides a circle from
Python's import machinery, not from a reader.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = (".venv", ".git", "tests", "__pycache__")  # not the project's modules (tests import them, not back)


def project_modules() -> dict[str, str]:
    """Module name -> file for every .py below the root: 'model' for model.py, 'finetune/lora',
    'finetune/data/make_math', 'data/shakespeare_char/prepare'."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        if rel.split(os.sep)[0] in SKIP:
            dirs[:] = []
            continue
        for name in sorted(f for f in files if f.endswith(".py")):
            module = name[:-3] if rel == "." else f"{rel.replace(os.sep, '/')}/{name[:-3]}"
            out[module] = os.path.join(folder, name)
    return out


def _longest(parts: list[str], base: str, modules: dict[str, str]) -> str | None:
    """The longest base/parts[:k] that is a project module (a package's __init__ counts as the package)."""
    for k in range(len(parts), 0, -1):
        name = "/".join(([base] if base else []) + parts[:k])
        for candidate in (name, f"{name}/__init__"):
            if candidate in modules:
                return candidate
    return None


def _resolve(name: str, folder: str, modules: dict[str, str], level: int = 0) -> str | None:
    """The project module that `import name` (or `from name import ...`, the names joined with dots) means in
    a file of folder, or None (torch, transformers...).

    The root comes first on sys.path in every script (`import loop` is the root's loop.py; `finetune.data.
    make_math` is finetune/data/make_math.py), then the file's own folder (plots/'s `import runlogs` is
    plots/runlogs.py). A relative import (level dots) starts from the file's package.
    """
    parts = [p for p in name.split(".") if p]
    if level:
        base = folder.split("/") if folder else []
        base = base[: len(base) - (level - 1)] if level > 1 else base
        return _longest(parts, "/".join(base), modules)
    return _longest(parts, "", modules) or (_longest(parts, folder, modules) if folder else None)


def imports_of(tree: ast.AST, module: str, modules: dict[str, str]) -> set[str]:
    """The project modules that the file of module (parsed as tree) imports anywhere, relative imports included."""
    folder = module.rpartition("/")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {_resolve(a.name, folder, modules) for a in node.names}
        elif isinstance(node, ast.ImportFrom):  # from recipes import generate; from .sft_data import x
            prefix = node.module or ""
            found |= {_resolve(f"{prefix}.{a.name}", folder, modules, node.level) for a in node.names}
    return found - {None, module}


def import_graph() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports anywhere in its file."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            graph[module] = imports_of(ast.parse(f.read(), path), module, modules)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search for an edge back to the path)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((c for node in sorted(graph) if (c := visit(node))), None)


def test_no_import_circle():
    graph = import_graph()
    assert {"model", "loss", "generation", "hf_checkpoint", "train", "finetune/lora", "bench/lora_step"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_model_imports_no_project_module_but_loss():
    graph = import_graph()
    assert graph["model"] == {"loss"}
    assert graph["loss"] == set()  # the leaf


def test_the_scan_reads_data_scripts_relative_imports_and_nested_packages():
    """Planted in the scan's input, not the code: a scan that skipped data/, relative imports or finetune.data.*
    (the earlier one did all three) fails each assert here."""
    graph = import_graph()
    modules = project_modules()
    assert "dataprep" in graph["data/shakespeare_char/prepare"]
    assert imports_of(ast.parse("from .sft_data import SFTLoader"), "finetune/lora", modules) == {"finetune/sft_data"}
    assert imports_of(ast.parse("from . import lora"), "finetune/train", modules) == {"finetune/lora"}
    assert imports_of(ast.parse("from ..data import make_math"), "finetune/data/x", modules) == {"finetune/data/make_math"}
    assert imports_of(ast.parse("from finetune.data import make_math"), "train", modules) == {"finetune/data/make_math"}
    assert imports_of(ast.parse("import finetune.data.make_math"), "train", modules) == {"finetune/data/make_math"}
    # a circle through a data script is found
    graph["dataprep"].add("data/shakespeare_char/prepare")
    cycle = find_cycle(graph)
    assert cycle is not None and {"dataprep", "data/shakespeare_char/prepare"} <= set(cycle)


def test_a_planted_circle_is_found():
    # The check can fail: hf_checkpoint imports model, so model importing it back is a circle.
    graph = import_graph()
    graph["model"].add("hf_checkpoint")
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and {"model", "hf_checkpoint"} <= set(cycle)


def _sys_path_edits(tree: ast.Module) -> list[int]:
    """Line numbers of statements that change sys.path: sys.path.insert/append/extend/remove, sys.path = ...,
    sys.path[...] = ..., sys.path += ..."""
    def is_sys_path(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys"

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            lines.append(node.lineno)
        elif isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)) for t in targets):
                lines.append(node.lineno)
    return sorted(lines)


# Entry points without a __main__: torchtitan imports the generated copy of titan_spec.py (its custom_import)
# in torchtitan's own process, where our root is not on sys.path.
FOREIGN_ENTRIES = {os.path.join("recipes", "titan_spec.py")}


def test_sys_path_is_edited_once_per_entry_script_and_never_in_a_library_module():
    edits = {}
    for folder, _, files in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        if rel.split(os.sep)[0] in (".venv", ".git", "tests") or "__pycache__" in rel:
            continue
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path) as f:
                source = f.read()
            if lines := _sys_path_edits(ast.parse(source, path)):
                rel_path = os.path.relpath(path, ROOT)
                edits[rel_path] = (lines, "__main__" in source or rel_path in FOREIGN_ENTRIES)
    assert edits, "the scan found no entry script at all"
    for path, (lines, is_entry) in edits.items():
        assert is_entry, f"{path} is a library module (no __main__) and edits sys.path at lines {lines}"
        assert len(lines) == 1, f"{path} edits sys.path {len(lines)} times (lines {lines}); once is enough"
        assert os.path.dirname(path) != "", f"{path} is at the root, which is on sys.path already"


def test_the_sys_path_scan_sees_every_form_of_edit():
    tree = ast.parse("import sys\nsys.path.insert(0, 'a')\nsys.path += ['b']\nsys.path[:] = []\nsys.path.append('c')\n")
    assert _sys_path_edits(tree) == [2, 3, 4, 5]


def _untimed_waits(tree: ast.AST) -> list[int]:
    """Lines of subprocess.run/call/check_call/check_output calls and of .wait()/.communicate() calls that pass
    no timeout (a `**kwargs` counts as passing one)."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        keywords = {k.arg for k in node.keywords}
        if "timeout" in keywords or None in keywords:
            continue
        runs = ast.unparse(node.func.value) == "subprocess" and node.func.attr in ("run", "call", "check_call",
                                                                                    "check_output")
        waits = node.func.attr in ("wait", "communicate") and not node.args
        if runs or waits:
            lines.append(node.lineno)
    return lines


def test_no_test_waits_on_a_process_without_a_timeout():
    """A hang fails its test instead of stalling CI. The scan is shown to fail on planted calls below."""
    planted = ast.parse("import subprocess\nsubprocess.run(['x'])\np = subprocess.Popen(['x'])\np.wait()\n"
                        "p.communicate()\nsubprocess.run(['x'], timeout=5)\np.wait(timeout=5)\nsubprocess.run(**kw)\n")
    assert _untimed_waits(planted) == [2, 4, 5]
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path) as f:
                if lines := _untimed_waits(ast.parse(f.read(), path)):
                    found[os.path.relpath(path, ROOT)] = lines
    assert not found, f"subprocess calls without a timeout: {found}"
