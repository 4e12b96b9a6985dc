"""Imports point one way (docs/DESIGN.md, "Layering"): no cycles between modules or between packages, imports
inside functions count, each import inside a function says why it is there, and the runtime never needs the
exporter."""
import ast
import os

import clock_deploy

PACKAGE = os.path.dirname(clock_deploy.__file__)
# the reasons an import may wait until a function runs (docs/DESIGN.md, "Layering")
LAZY_REASONS = ("torch-free", "start-up", "optional", "memory")


def _import_nodes(path, top_level_only):
    with open(path) as f:
        tree = ast.parse(f.read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    return [n for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))]


def _names(node):
    """Modules one import statement reaches (`from a.b import c` counts as a.b and a.b.c)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if not node.module:
        return set()
    return {node.module} | {f"{node.module}.{a.name}" for a in node.names}


def _imports(path, top_level_only=False):
    return set().union(*(_names(n) for n in _import_nodes(path, top_level_only)))


def _modules():
    """{module name: file} of every clock_deploy module."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path[:-3], os.path.dirname(PACKAGE)).replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def _package(module):
    """'clock_deploy.export.onnx' -> 'export'; top-level modules are their own package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycles(graph):
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_runtime_module_imports_the_export_package():
    # export produces artifacts and the runtime consumes them; both share clock_deploy.artifact,
    # so the runtime never needs the exporter (nor its onnx / onnxslim / torch imports)
    runtime = {m: p for m, p in _modules().items() if m.startswith("clock_deploy.runtime")}
    offenders = {m: sorted(i for i in _imports(p) if i.startswith("clock_deploy.export")) for m, p in runtime.items()}
    assert len(runtime) >= 5 and {m: i for m, i in offenders.items() if i} == {}


def test_the_module_graph_has_no_cycle():
    modules = _modules()
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    assert "clock_deploy.data.kitti" in graph["clock_deploy.eval.kitti"]  # the graph is read at all
    assert _cycles(graph) == []


def test_the_package_graph_has_no_cycle():
    # imports inside functions count: a cycle hidden in a function is still a cycle
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        deps = {_package(i) for i in _imports(path) if i in modules and _package(i) != "__init__"}
        graph.setdefault(_package(module), set()).update(deps - {_package(module), "clock_deploy"})
    graph = {p: {d for d in deps if d in graph} for p, deps in graph.items()}
    assert {"checkpoint", "data"} <= graph["training"]  # the graph is read at all
    assert _cycles(graph) == []


def _unexplained_lazy_imports(source):
    """Line numbers of imports inside functions with no reason (LAZY_REASONS) in a comment on their line or in the
    comment / import lines right above them."""
    lines, tree = source.splitlines(), ast.parse(source)
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
            continue
        row, context = node.lineno - 1, [lines[node.lineno - 1]]
        while row > 0 and lines[row - 1].strip().startswith(("#", "import ", "from ")):
            row -= 1
            context.append(lines[row])
        comments = [line[line.index("#"):] for line in context if "#" in line]
        if not any(reason in c for c in comments for reason in LAZY_REASONS):
            found.append(node.lineno)
    return found


def test_every_import_inside_a_function_says_why():
    # an import waits for its function only to keep the runtime torch-free, the CLI's start-up light, or an
    # optional dependency (TensorRT, cuda-python, ...) from being needed at import time
    unexplained = []
    for path in _modules().values():
        with open(path) as f:
            unexplained += [f"{os.path.relpath(path, PACKAGE)}:{n}" for n in _unexplained_lazy_imports(f.read())]
    assert unexplained == []


def test_the_reason_check_finds_unexplained_imports():
    source = ("import os\n\n\ndef f():\n    import json\n\n\ndef g():\n    # start-up: numba compiles on import\n"
              "    import numba\n    import rich  # optional\n")
    assert _unexplained_lazy_imports(source) == [5]


def test_the_product_never_imports_the_studies_and_nothing_edits_sys_path():
    # studies/ is research on the product, never installed with it; tests import it from the repository root
    offenders = {m: sorted(i for i in _imports(p) if i.split(".")[0] == "studies") for m, p in _modules().items()}
    assert {m: i for m, i in offenders.items() if i} == {}
    root = os.path.dirname(PACKAGE)
    studies = [os.path.join(folder, name) for folder, _, files in os.walk(os.path.join(root, "studies"))
               for name in files if name.endswith(".py")]
    assert any(p.endswith(os.path.join("studies", "bookkeeping.py")) for p in studies)
    assert [p for p in studies if "sys.path" in open(p).read()] == []  # one package, imported as one
