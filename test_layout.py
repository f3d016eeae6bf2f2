# The house's shape, checked on the source: modules import each other in one direction only (imports inside functions
# count too), none uses another's private names, and every file stays readable in one sitting.
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and not f.startswith(("test_", "conftest")))
PROJECT = set(MODULES) | {"kernels"}


def imports(name):
    # {imported project module: [names taken from it]} of a module, from every import statement anywhere in it
    tree = ast.parse(open(os.path.join(ROOT, name + ".py"), encoding="utf-8").read())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PROJECT:
                    out.setdefault(a.name.split(".")[0], [])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in PROJECT:
            out.setdefault(node.module.split(".")[0], []).extend(a.name for a in node.names)
    # attribute access on an imported module (checkpoint._private)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in out:
            out[node.value.id].append(node.attr)
    out.pop(name, None)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_no_module_imports_one_that_imports_it_back():
    # depth-first search for a cycle in the import graph: one direction only, so each module reads on its own
    state = {}

    def visit(m, path):
        state[m] = "open"
        for dep in GRAPH.get(m, {}):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"
    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_no_module_uses_another_modules_private_names():
    bad = [(m, dep, n) for m, deps in GRAPH.items() for dep, names in deps.items() for n in names
           if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_data_modules_sit_in_floors():
    # the row reader at the bottom, token files above it, the loader above those, chat's formats above it, preparation
    # on top
    floor = {"rows": 0, "corpus": 0, "sources": 1, "tokenfiles": 1, "tokenizer": 1, "data": 2, "chat": 3, "prepare": 4}
    for m, f in floor.items():
        for dep in GRAPH[m]:
            assert floor.get(dep, -1) < f, (m, dep)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_reads_in_one_sitting(name):
    n = sum(1 for _ in open(os.path.join(ROOT, name + ".py"), encoding="utf-8"))
    assert n <= 600, f"{name}.py has {n} lines (600 at most: split it by concern)"
