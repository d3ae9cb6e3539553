"""The layout: no import circle between the project's modules, and model.py imports only its loss leaf.

Every import counts, at the top of a file or inside a function: a lazy import hides a circle from
Python's import machinery, not from a reader.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("", "finetune", "recipes", "bench")  # the repository root and the folders of scripts beside it


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

    The root comes first on sys.path in every script (finetune/train.py's `import train` is the root's
    train.py), then the file's own folder (finetune/'s `from config import` is finetune/config.py).
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
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"model", "hf_checkpoint"}
