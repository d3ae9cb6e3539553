"""The layout: no import circle between the project's modules, model.py imports only its loss leaf, and
sys.path is edited once at most, at the top of an entry script outside the root, never in a library module.

Every import counts, at the top of a file or inside a function: a lazy import hides a circle from
Python's import machinery, not from a reader.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("", "finetune", "finetune/data", "recipes", "bench", "plots")  # the root and the folders of scripts


def project_modules() -> dict[str, str]:
    """Module name -> file: 'model' for model.py, 'finetune/lora' for finetune/lora.py."""
    out = {}
    for folder in FOLDERS:
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                out[f"{folder}/{name[:-3]}" if folder else name[:-3]] = os.path.join(ROOT, folder, name)
    return out


def _resolve(name: str, folder: str, modules: dict[str, str]) -> str | None:
    """The project module that `import name` means in a file of folder, or None (torch, transformers...).

    The root comes first on sys.path in every script (`import loop` is the root's loop.py; finetune's modules
    are the package finetune.*), then the file's own folder (plots/'s `import runlogs` is plots/runlogs.py).
    """
    parts = name.split(".")
    candidates = ["/".join(parts[:2])] if parts[0] in FOLDERS else []  # finetune.lora, recipes.generate
    candidates += [parts[0], f"{folder}/{parts[0]}"]
    return next((c for c in candidates if c in modules), None)


def import_graph() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports anywhere in its file."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        folder = module.rpartition("/")[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        names = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names += [f"{node.module}.{a.name}" for a in node.names]  # from recipes import generate
        graph[module] = {m for n in names if (m := _resolve(n, folder, modules)) not in (None, module)}
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
