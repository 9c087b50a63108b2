"""The import contract: one package per layer, arrows one way (issue 15, README "How the parts
fit").

Every module under src/tokengateway is parsed with `ast`, and every `import` in it counts:
at module level, inside functions, under `if TYPE_CHECKING:`. An import is an arrow from the
module's package to the package it names. The layers, top to bottom (`|`: side by side):

    __main__
    cli
    runtime
    controlplane | dataplane
    config | observability
    auth | limits | resources
    expr | http | simulator | storage | wire

A package imports from itself and from the layers below it only: never from above, and
never from a package beside it in its own layer. `tokengateway` itself (`__version__`) is
below everything. On top of that, said separately so that a failure says which promise
broke: `http/` imports nothing of ours outside `http/`; the library (auth, limits, storage,
expr, wire, resources) imports none of the layers that make the gateway; and no module
imports itself back through others (no cycles, within a package too).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = "tokengateway"

LAYERS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"runtime"},
    {"controlplane", "dataplane"},
    {"config", "observability"},
    {"auth", "limits", "resources"},
    {"expr", "http", "simulator", "storage", "wire"},
]
LIBRARY = {"auth", "limits", "storage", "expr", "wire", "resources"}
APPLICATION = {"http", "dataplane", "config", "controlplane", "observability", "runtime", "cli"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, `tokengateway.http.server`
    target: str  # the module it names, `tokengateway.http.asgi`
    where: str  # `src/tokengateway/http/server.py:88`

    def __str__(self) -> str:
        return f"{self.where}: {self.module} imports {self.target}"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str) -> str:
    """`tokengateway.http.server` -> `http`; `tokengateway` itself -> ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_imports(src: Path) -> tuple[set[str], list[Import]]:
    """Every module of ours under `src`, and every import of ours in them."""
    paths = sorted((src / ROOT).rglob("*.py"))
    modules = {module_name(p, src) for p in paths}
    found: list[Import] = []
    for path in paths:
        module = module_name(path, src)
        is_package = path.name == "__init__.py"
        where = path.relative_to(src.parent)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                # `from tokengateway.http import server` names the module http.server
                names = [
                    f"{base_name}.{alias.name}"
                    if f"{base_name}.{alias.name}" in modules
                    else base_name
                    for alias in node.names
                ]
            else:
                continue
            for name in dict.fromkeys(names):
                if name == ROOT or name.startswith(ROOT + "."):
                    found.append(Import(module, name, f"{where}:{node.lineno}"))
    return modules, found


def layer_of(package: str) -> int:
    for index, layer in enumerate(LAYERS):
        if package in layer:
            return index
    raise KeyError(package)


def unplaced(modules: set[str]) -> list[str]:
    packages = {package_of(m) for m in modules} - {""}
    return sorted(p for p in packages if not any(p in layer for layer in LAYERS))


def http_problems(imports: list[Import]) -> list[str]:
    return [
        f"{i}: http/ may import nothing of tokengateway outside http/"
        for i in imports
        if package_of(i.module) == "http" and package_of(i.target) != "http"
    ]


def library_problems(imports: list[Import]) -> list[str]:
    return [
        f"{i}: the library ({package_of(i.module)}/) may not import {package_of(i.target)}/"
        for i in imports
        if package_of(i.module) in LIBRARY and package_of(i.target) in APPLICATION
    ]


def layer_problems(imports: list[Import]) -> list[str]:
    problems = []
    for i in imports:
        source, target = package_of(i.module), package_of(i.target)
        if source == target or target == "":
            continue
        if source == "":
            problems.append(f"{i}: tokengateway/__init__.py imports nothing of ours")
            continue
        above, below = layer_of(source), layer_of(target)
        if below < above:
            problems.append(f"{i}: {target}/ is in a layer above {source}/")
        elif below == above:
            problems.append(f"{i}: {target}/ is beside {source}/ in its layer")
    return problems


def cycles(imports: list[Import]) -> list[str]:
    """Each set of modules that import one another (Tarjan's strongly connected components),
    with the imports that close the circle."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.module, set()).add(i.target)
        graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [
        "import cycle between "
        + ", ".join(sorted(component))
        + ":\n    "
        + "\n    ".join(str(i) for i in imports if i.module in component and i.target in component)
        for component in components
    ]


def report(problems: list[str]) -> str:
    return "\n" + "\n".join(problems)


# --- the contract, on our sources --------------------------------------------------------------

MODULES, IMPORTS = find_imports(SRC)


def test_the_sources_are_found() -> None:
    assert "tokengateway.http.server" in MODULES
    assert any(i.module == "tokengateway.dataplane.app" for i in IMPORTS)


def test_every_package_has_a_layer() -> None:
    assert unplaced(MODULES) == [], "add the new package to LAYERS in tests/test_layers.py"


def test_http_imports_nothing_of_ours_but_http() -> None:
    problems = http_problems(IMPORTS)
    assert not problems, report(problems)


def test_the_library_imports_no_layer_of_the_gateway() -> None:
    problems = library_problems(IMPORTS)
    assert not problems, report(problems)


def test_imports_point_down_the_layers() -> None:
    problems = layer_problems(IMPORTS)
    assert not problems, report(problems)


def test_no_module_imports_itself_back() -> None:
    problems = cycles(IMPORTS)
    assert not problems, report(problems)


# --- the checks catch what they must -----------------------------------------------------------


def write(src: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = src / ROOT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_an_arrow_up_is_named_with_its_file_and_line(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "__init__.py": "",
            "http/__init__.py": "",
            "http/server.py": "import json\n\n\ndef f():\n    from tokengateway.dataplane import errors\n",
            "dataplane/__init__.py": "",
            "dataplane/errors.py": "",
            "limits/__init__.py": "",
            "limits/limit.py": "from tokengateway.observability.metrics import Metrics\n",
            "observability/__init__.py": "",
            "observability/metrics.py": "from tokengateway.config import routing\n",
            "config/__init__.py": "",
            "config/routing.py": "",
        },
    )
    _, imports = find_imports(tmp_path)
    assert http_problems(imports) == [
        f"{tmp_path.name}/tokengateway/http/server.py:5: tokengateway.http.server imports "
        "tokengateway.dataplane.errors: http/ may import nothing of tokengateway outside http/"
    ]
    assert library_problems(imports) == [
        f"{tmp_path.name}/tokengateway/limits/limit.py:1: tokengateway.limits.limit imports "
        "tokengateway.observability.metrics: the library (limits/) may not import observability/"
    ]
    assert layer_problems(imports) == [
        f"{tmp_path.name}/tokengateway/http/server.py:5: tokengateway.http.server imports "
        "tokengateway.dataplane.errors: dataplane/ is in a layer above http/",
        f"{tmp_path.name}/tokengateway/limits/limit.py:1: tokengateway.limits.limit imports "
        "tokengateway.observability.metrics: observability/ is in a layer above limits/",
        f"{tmp_path.name}/tokengateway/observability/metrics.py:1: tokengateway.observability.metrics "
        "imports tokengateway.config.routing: config/ is beside observability/ in its layer",
    ]
    write(tmp_path, {"newthing/__init__.py": ""})
    assert unplaced(find_imports(tmp_path)[0]) == ["newthing"]


def test_a_cycle_is_named_with_the_imports_that_close_it(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "__init__.py": "",
            "runtime/__init__.py": "",
            "runtime/serve.py": "from tokengateway.runtime.workers import WorkerPool\n",
            # relative, and inside a function: still an import
            "runtime/workers.py": "def f():\n    from .serve import load\n",
            "runtime/process.py": "from tokengateway.runtime import workers\n",
        },
    )
    _, imports = find_imports(tmp_path)
    (problem,) = cycles(imports)
    assert problem.startswith(
        "import cycle between tokengateway.runtime.serve, tokengateway.runtime.workers:"
    )
    assert "runtime/serve.py:1: tokengateway.runtime.serve imports" in problem
    assert "runtime/workers.py:2: tokengateway.runtime.workers imports" in problem
    assert "runtime.process" not in problem
