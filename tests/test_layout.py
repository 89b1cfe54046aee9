"""The package layout of docs/architecture.md: the parts import downwards only, and every module
at the top of agro_dist/ is a command (``python -m agro_dist.<name>`` has a main)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# part -> (folder, the parts of ours it may import); docs/architecture.md's table
PARTS = {
    "core": ("agro_dist/core", set()),
    "io": ("agro_dist/io", set()),
    "tasks": ("agro_dist/tasks", {"core", "io"}),
    "buffer": ("buffer", {"core"}),
    "actors": ("actors", {"core", "io", "tasks", "buffer"}),
    "learner": ("learner", {"core", "io", "tasks", "buffer"}),
    "run": ("agro_dist/run", {"core", "io", "tasks", "buffer", "actors", "learner"}),
}
COMMANDS = {"__init__", "__main__", "evaluate", "data", "memory", "bench_trl", "tabular"}


def _imports(path):
    """The agro_dist parts a file imports (the name after ``agro_dist.``), lazy imports included."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "agro_dist" else [])
        for n in names:
            bits = n.split(".")
            if bits[0] == "agro_dist" and len(bits) > 1:
                yield node.lineno, bits[1]


def test_parts_import_downwards_only():
    wrong = []
    for part, (folder, allowed) in PARTS.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    for line, used in _imports(path):
                        if used != part and used not in allowed:
                            wrong.append(f"{os.path.relpath(path, ROOT)}:{line}: {part} imports agro_dist.{used}")
    assert not wrong, "\n".join(wrong)


def test_top_level_modules_are_the_commands():
    top = {f[:-3] for f in os.listdir(os.path.join(ROOT, "agro_dist")) if f.endswith(".py")}
    assert top == COMMANDS, f"a module at the top of agro_dist/ that is not a command, or a command gone: {top ^ COMMANDS}"
    for name in COMMANDS - {"__init__", "__main__"}:
        src = open(os.path.join(ROOT, "agro_dist", f"{name}.py"), encoding="utf-8").read()
        assert 'if __name__ == "__main__":' in src, f"agro_dist/{name}.py is at the top but is not a command"
    folders = {d for d in os.listdir(os.path.join(ROOT, "agro_dist")) if os.path.isdir(os.path.join(ROOT, "agro_dist", d)) and d != "__pycache__"}
    assert folders == {"core", "io", "run", "tasks"}, folders
