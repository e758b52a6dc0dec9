"""The import rule (docs/architecture.md), checked on the source with `ast`:

    core (pipeline/, less cli.py and apps/)   -> nothing of the project but the core
    cluster/                                  -> core
    stages/lib/                               -> core, cluster, stages/lib
    a stage (stages/<name>.py)                -> core, cluster, stages/lib; never another stage
    apps (pipeline/apps/, pipeline/cli.py)    -> anything

Every import counts, at module level or inside a function. No two project modules may import
each other, directly or through others (no cycles)."""
from __future__ import annotations

import ast
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipeline", "stages", "cluster")


def project_modules() -> dict[str, str]:
    """{module name: file} for every .py file of the project's packages."""
    found = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(REPO, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), REPO)[:-3]
                    module = rel.replace(os.sep, ".").removesuffix(".__init__")
                    found[module] = os.path.join(folder, name)
    return found


MODULES = project_modules()


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports (a `from pkg import name` is pkg.name when that is
    a module, else pkg)."""
    path = MODULES[module]
    is_package = path.endswith("__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                base = importlib.util.resolve_name("." * node.level + base, package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


def layer(module: str) -> str:
    if module == "pipeline.cli" or module.startswith("pipeline.apps"):
        return "app"
    if module.startswith("pipeline"):
        return "core"
    if module.startswith("cluster"):
        return "cluster"
    if module.startswith("stages.lib"):
        return "lib"
    if module == "stages":
        return "stages"  # the STAGES dict: imports every stage
    return "stage"


ALLOWED = {
    "core": {"core"},
    "cluster": {"core", "cluster"},
    "lib": {"core", "cluster", "lib"},
    "stage": {"core", "cluster", "lib"},
    "stages": {"core", "cluster", "lib", "stage"},
    "app": {"core", "cluster", "lib", "stage", "stages", "app"},
}


def test_every_import_follows_the_layers():
    wrong = [f"{m} ({layer(m)}) imports {i} ({layer(i)})"
             for m in sorted(MODULES) for i in sorted(imports_of(m))
             if layer(i) not in ALLOWED[layer(m)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: imports_of(m) for m in MODULES}
    # A package's own submodules importing it (or it them) is how Python packages work; the
    # cycle that matters is between sibling modules.
    for m in graph:
        graph[m] = {i for i in graph[m] if not (m.startswith(i + ".") or i.startswith(m + "."))}
    cycles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for i in sorted(graph[m]):
            if state.get(i) == "open":
                cycles.append(" -> ".join(path[path.index(i):] + [i]))
            elif i not in state:
                visit(i, path + [i])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_stages_holds_exactly_the_stages():
    from stages import STAGES

    stage_modules = {m.rpartition(".")[2] for m in MODULES if layer(m) == "stage"}
    assert stage_modules == set(STAGES), stage_modules ^ set(STAGES)


def test_the_checker_sees_a_violation(tmp_path):
    """The rule can fail: a core module that imports a stage is reported."""
    MODULES["pipeline._probe"] = str(tmp_path / "probe.py")
    (tmp_path / "probe.py").write_text("def f():\n    from stages.lib.chat import split_think\n")
    try:
        assert imports_of("pipeline._probe") == {"stages.lib.chat"}
        assert layer("stages.lib.chat") not in ALLOWED[layer("pipeline._probe")]
    finally:
        del MODULES["pipeline._probe"]


HEAVY = ("torch", "ray", "vllm", "transformers", "deepspeed", "trl", "datasets", "duckdb",
         "fastapi", "matplotlib")


def test_the_cli_and_every_stage_import_without_the_heavy_libraries():
    """`distillery --help`, `inspect` and the runner's start import every stage: those heavy
    libraries (seconds each) are imported inside the functions that use them."""
    import subprocess
    import sys

    code = ("import sys, pipeline.cli, stages, pipeline.runner\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip()
    assert out == "", f"imported at start-up: {out}"
