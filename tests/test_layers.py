"""Issue 25: the import graph points down. Every module of moca_fast/ and kernels/ (installed as moca_fast.kernels),
launch/, bench/ and scripts/ is parsed with `ast`; each import at any depth (a function's body included) that
names a module of the project is an edge. The test fails on a module missing from LAYERS, on an import into a
higher layer, on an import between two units of a layer whose units stay apart (the applications; the shared
cores), and on any import circle. Imports through importlib with a computed name are not seen (the
sub-command dispatch of moca_fast.subcommands and moca_fast.io's lazy names use them within their own package).

LAYERS, bottom first: a module may import from its own layer's units (unless the layer is in APART) and from any
layer below. A unit is a package (all modules under it) or a single module; the package root `moca_fast` (its
__init__: the public names Config, load_config, build_model, MOCA) is a unit of its own. README.md's Architecture
section describes the same table.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS = [
    ("errors", ["moca_fast.errors"]),
    ("runtime", ["moca_fast.peers", "moca_fast.ending", "moca_fast.entry", "moca_fast.subcommands",
                 "moca_fast.output_files", "moca_fast.distributed", "moca_fast.cpu_threads"]),
    ("settings", ["moca_fast.config", "moca_fast.config_checks", "moca_fast.config_file", "moca_fast.config_parse",
                  "moca_fast.config_presets"]),
    ("reference ops", ["moca_fast.reference_ops"]),
    ("kernels", ["moca_fast.kernels"]),
    ("model", ["moca_fast.model", "moca_fast.fakegpu"]),
    ("data", ["moca_fast.data"]),
    ("io", ["moca_fast.io"]),
    ("shared cores", ["moca_fast.probes", "moca_fast.figures"]),
    ("applications", ["moca_fast.train", "moca_fast.eval", "moca_fast.viz"]),
    ("public face and tools", ["moca_fast", "launch", "bench", "scripts"]),
]
#: layers whose units never import one another
APART = {"shared cores", "applications"}
#: folders of scripts that import their neighbours by bare name (`from common import ...`)
SCRIPT_FOLDERS = ("launch", "bench", "scripts")


def project_modules(repo: Path) -> dict[str, Path]:
    """{dotted module name: file} of every Python file the layers cover."""
    modules = {}
    for path in sorted(repo.glob("moca_fast/**/*.py")) + sorted(repo.glob("kernels/*.py")):
        parts = list(path.relative_to(repo).with_suffix("").parts)
        if parts[0] == "kernels":
            parts = ["moca_fast"] + parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    for folder in SCRIPT_FOLDERS:
        for path in sorted((repo / folder).glob("*.py")):
            modules[f"{folder}.{path.stem}"] = path
    return modules


def _known(name: str, modules) -> str | None:
    """`name`, or the longest prefix of it that is a module of the project (an imported class's module)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imports_of(module: str, path: Path, modules) -> set[str]:
    """The project modules `module` imports, at any depth of its file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    folder = module.split(".")[0] if module.split(".")[0] in SCRIPT_FOLDERS else None
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            submodules = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
            names = submodules if len(submodules) == len(node.names) else [source] + submodules
        for name in names:
            if folder is not None and f"{folder}.{name}" in modules:
                name = f"{folder}.{name}"
            target = _known(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(repo: Path = REPO) -> dict[str, set[str]]:
    modules = project_modules(repo)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def unit_of(module: str) -> tuple[int, str, str] | None:
    """(layer index, layer name, unit) of a module: the longest unit that is the module or a package above it
    (the root `moca_fast` only as itself); None when no unit covers it."""
    best = None
    for index, (layer, units) in enumerate(LAYERS):
        for unit in units:
            covers = module == unit or (unit != "moca_fast" and module.startswith(unit + "."))
            if covers and (best is None or len(unit) > len(best[2])):
                best = (index, layer, unit)
    return best


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per module outside LAYERS, per import into a higher layer and per import across APART units."""
    problems = [f"{module} is in no layer of tests/test_layers.py LAYERS" for module in sorted(graph)
                if unit_of(module) is None]
    for module in sorted(graph):
        here = unit_of(module)
        for target in sorted(graph[module]):
            there = unit_of(target)
            if here is None or there is None:
                continue
            if there[0] > here[0]:
                problems.append(f"{module} ({here[1]}) imports {target} from the higher layer {there[1]}")
            elif there[0] == here[0] and here[1] in APART and there[2] != here[2]:
                problems.append(f"{module} imports {target}: {here[2]} and {there[2]} stay apart ({here[1]})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each strongly connected group of two or more modules (Tarjan), sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(groups)


def test_every_import_points_down():
    graph = import_graph()
    assert len(graph) > 100 and graph["moca_fast.train.loop"], "the graph covers the project"
    problems = layer_violations(graph)
    assert not problems, "\n".join(problems)


def test_no_import_circle():
    circles = cycles(import_graph())
    assert not circles, "\n".join(" <-> ".join(circle) for circle in circles)


def test_the_checks_catch_an_upward_import_a_cross_application_import_and_a_circle():
    graph = {"moca_fast.data.scan": {"moca_fast.train.loop"}, "moca_fast.train.loop": {"moca_fast.eval.knn"},
             "moca_fast.eval.knn": {"moca_fast.errors"}, "moca_fast.errors": set(),
             "moca_fast.config": {"moca_fast.config_file"}, "moca_fast.config_file": {"moca_fast.config"},
             "moca_fast.newcomer": set()}
    assert layer_violations(graph) == [
        "moca_fast.newcomer is in no layer of tests/test_layers.py LAYERS",
        "moca_fast.data.scan (data) imports moca_fast.train.loop from the higher layer applications",
        "moca_fast.train.loop imports moca_fast.eval.knn: moca_fast.train and moca_fast.eval stay apart (applications)"]
    assert cycles(graph) == [["moca_fast.config", "moca_fast.config_file"]]


def test_imports_inside_functions_relative_imports_and_script_neighbours_are_edges(tmp_path):
    (tmp_path / "moca_fast" / "data").mkdir(parents=True)
    (tmp_path / "moca_fast" / "train").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "moca_fast" / "__init__.py").write_text("")
    (tmp_path / "moca_fast" / "errors.py").write_text("")
    (tmp_path / "moca_fast" / "train" / "loop.py").write_text("")
    (tmp_path / "moca_fast" / "data" / "__init__.py").write_text("def f():\n    from ..train.loop import Trainer\n")
    (tmp_path / "moca_fast" / "data" / "scan.py").write_text("def f():\n    import moca_fast.errors\n")
    (tmp_path / "bench" / "common.py").write_text("")
    (tmp_path / "bench" / "steps.py").write_text("from common import sync\nfrom moca_fast import errors\n")
    graph = import_graph(tmp_path)
    assert graph["moca_fast.data"] == {"moca_fast.train.loop"}
    assert graph["moca_fast.data.scan"] == {"moca_fast.errors"}
    assert graph["bench.steps"] == {"bench.common", "moca_fast.errors"}
    assert layer_violations(graph) == [
        "moca_fast.data (data) imports moca_fast.train.loop from the higher layer applications"]
