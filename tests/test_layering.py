"""Imports point one way (docs/DESIGN.md, "Layering"): no cycles, and the runtime never needs the exporter."""
import ast
import os

import clock_deploy

PACKAGE = os.path.dirname(clock_deploy.__file__)


def _imports(path, top_level_only):
    """Modules `path` imports (`from a.b import c` counts as a.b and a.b.c)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


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


def test_no_runtime_module_imports_the_export_package():
    # export produces artifacts and the runtime consumes them; both share clock_deploy.artifact,
    # so the runtime never needs the exporter (nor its onnx / onnxslim / torch imports)
    runtime = {m: p for m, p in _modules().items() if m.startswith("clock_deploy.runtime")}
    offenders = {m: sorted(i for i in _imports(p, top_level_only=False) if i.startswith("clock_deploy.export"))
                 for m, p in runtime.items()}
    assert len(runtime) >= 5 and {m: i for m, i in offenders.items() if i} == {}


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {m: {i for i in _imports(p, top_level_only=False) if i in modules and i != m}
             for m, p in modules.items()}
    assert "clock_deploy.data.kitti" in graph["clock_deploy.eval.kitti"]  # the graph is read at all
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_product_never_imports_the_studies_and_nothing_edits_sys_path():
    # studies/ is research on the product, never installed with it; tests import it from the repository root
    offenders = {m: sorted(i for i in _imports(p, top_level_only=False) if i.split(".")[0] == "studies")
                 for m, p in _modules().items()}
    assert {m: i for m, i in offenders.items() if i} == {}
    root = os.path.dirname(PACKAGE)
    studies = [os.path.join(folder, name) for folder, _, files in os.walk(os.path.join(root, "studies"))
               for name in files if name.endswith(".py")]
    assert any(p.endswith(os.path.join("studies", "bookkeeping.py")) for p in studies)
    assert [p for p in studies if "sys.path" in open(p).read()] == []  # one package, imported as one
