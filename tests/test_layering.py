"""The import graph between arcdiff's parts follows the architecture: data flows service -> Redis ->
worker -> model, the contract is neutral, the client is torch-free, and no two parts import each
other. Every import counts, also those inside functions: a lazy import is still a dependency.

Read from the source with `ast` (nothing is imported), so a violation is found even in code that
the tests never run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import arcdiff

ROOT = Path(arcdiff.__file__).parent
PARTS = ("model", "training", "eval", "worker", "contract", "settings", "service", "client", "cli", "bench")
# what runs in production: none of it may import the offline tooling (training, evaluation)
SERVING = ("service", "worker", "contract", "client", "settings")
TOOLING = ("training", "eval")

# part -> the parts it may import
ALLOWED: dict[str, set[str]] = {
    "model": set(),  # the method and the model format: no web, queue or worker code, no tooling
    "training": {"model"},  # the offline tooling that makes models (training loop, data, distillation)
    "eval": {"model", "training"},  # evaluation (arcdiff/eval/); reads the data through training's loaders
    "contract": {"model"},  # neutral and torch-free (the client and the API import it): solver names only
    "settings": set(),  # the settings the API and the workers share (arcdiff/settings.py): pydantic only
    "client": {"contract"},  # torch-free HTTP client
    "worker": {"model", "contract", "settings"},
    "service": {"contract", "model", "worker", "settings"},  # model and worker only through the modules below
    "bench": {"model", "worker", "client", "contract", "settings"},
    "cli": set(PARTS) - {"cli"},  # the console script may use everything
}
# (importing module prefix, imported part) -> the modules of that part it may import
NARROW: dict[tuple[str, str], tuple[str, ...]] = {
    # the torch-free model modules only: the catalogue (config.json and the weights' header: names,
    # shapes, parameters, a distilled model's defaults) and the solver table, which the API validates
    # and answers with. Not registry, solvers, format or anything else that imports torch: a
    # Redis-mode API process loads no torch (test_the_api_in_redis_mode_loads_no_torch below)
    ("arcdiff.service", "model"): ("arcdiff.model.catalog", "arcdiff.model.solver_names"),
    # the solver and grid names, from the model's torch-free list of them
    ("arcdiff.contract", "model"): ("arcdiff.model.solver_names",),
    # the engine runs in the API process only in embedded mode
    ("arcdiff.service.embedded", "worker"): ("arcdiff.worker",),
    # `arcdiff serve`'s settings compose the engine's (embedded mode runs the engine in-process)
    ("arcdiff.service.settings", "worker"): ("arcdiff.worker.settings",),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str | None:
    bits = module.split(".")
    if bits[0] != "arcdiff" or len(bits) < 2:
        return None
    return bits[1] if bits[1] in PARTS else None


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every arcdiff module the file at `path` imports, with its line."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    """Every arcdiff module `source` (the text of `module`) imports, with its line."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from arcdiff import contract` imports arcdiff.contract; `from x.y import name` imports x.y
            out.append((target, node.lineno))
            out += [(f"{target}.{alias.name}", node.lineno) for alias in node.names if target == "arcdiff"]
    return [(name, line) for name, line in out if name == "arcdiff" or name.startswith("arcdiff.")]


def edges() -> list[tuple[str, str, int, str]]:
    """(importing module, imported module, line, file) for every import between two parts."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        src = module_name(path)
        for target, line in imports_of(path):
            a, b = part_of(src), part_of(target)
            if a and b and a != b:
                found.append((src, target, line, str(path.relative_to(ROOT.parent))))
    return found


def test_the_walk_sees_the_imports_it_must_see():
    """Guards the checker itself: known edges of the tree are found, with lazy imports too."""
    pairs = {(src, dst) for src, dst, _, _ in edges()}
    assert ("arcdiff.worker.engine", "arcdiff.contract") in pairs
    assert ("arcdiff.service.embedded", "arcdiff.worker.main") in pairs  # inside a function
    assert ("arcdiff.training.train", "arcdiff.model.configs") in pairs
    assert ("arcdiff.eval.reference", "arcdiff.training.data") in pairs
    assert ("arcdiff.eval.table", "arcdiff.model.registry") in pairs
    assert {"worker", "service", "bench", "cli", "training", "eval"} <= {part_of(src) for src, *_ in edges()}


def test_nothing_that_serves_imports_the_tooling():
    """The service, the worker, the contract, the settings and the client run in production, and
    the model is what they run: the training and evaluation tooling (and their data loaders) stay
    out of them, whatever else changes. Checked on the rules and on the imports themselves."""
    for part in (*SERVING, "model"):
        assert not ALLOWED[part] & set(TOOLING), part
    bad = [
        f"{file}:{line}: {src} imports {dst}"
        for src, dst, line, file in edges()
        if part_of(src) in (*SERVING, "model") and part_of(dst) in TOOLING
    ]
    assert not bad, "\n".join(bad)


def test_the_tooling_has_its_own_packages():
    """Evaluation and training are packages of their own (arcdiff/eval/, arcdiff/training/), not
    folders inside the method's: arcdiff.model holds the schedule, network, loss, solvers, format
    and registry only."""
    for part in TOOLING:
        assert (ROOT / part / "__init__.py").is_file(), part
    nested = sorted(str(p.relative_to(ROOT.parent)) for p in (ROOT / "model").rglob("*.py") if p.parent.name in TOOLING)
    assert not nested, nested


@pytest.mark.parametrize(
    "module, source",
    [
        ("arcdiff.service.probe", "from arcdiff.eval.table import main"),
        ("arcdiff.worker.probe", "from arcdiff.training import data"),
        ("arcdiff.contract", "import arcdiff.eval.metrics"),
        ("arcdiff.model.probe", "from ..eval import features"),
    ],
)
def test_a_serving_import_of_the_tooling_is_caught(module, source):
    """Guards the rules: such an import, wherever it stands, is an edge that the rules refuse."""
    (dst, _line), *_ = imports_in(source, module)
    assert part_of(dst) in TOOLING and part_of(dst) not in ALLOWED[part_of(module)]


def test_parts_import_only_what_the_architecture_allows():
    bad = []
    for src, dst, line, file in edges():
        a, b = part_of(src), part_of(dst)
        if b not in ALLOWED[a]:
            bad.append(f"{file}:{line}: {a} must not import {b} ({dst})")
            continue
        rules = [(prefix, mods) for (prefix, part), mods in NARROW.items() if part == b and a == part_of(prefix)]
        if not rules:
            continue
        allowed = [mods for prefix, mods in rules if src == prefix or src.startswith(prefix + ".")]
        if not any(dst == m or dst.startswith(m + ".") for mods in allowed for m in mods):
            bad.append(f"{file}:{line}: {src} must not import {dst}")
    assert not bad, "\n".join(bad)


def test_no_cycle_between_parts():
    graph: dict[str, set[str]] = {p: set() for p in PARTS}
    for src, dst, _, _ in edges():
        graph[part_of(src)].add(part_of(dst))

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        for nxt in sorted(graph[node]):
            found = cycle_from(nxt, [*path, node])
            if found:
                return found
        return None

    for part in PARTS:
        assert cycle_from(part, []) is None, " -> ".join(cycle_from(part, []))


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from arcdiff.model.solvers import nfe", "arcdiff.model.solvers"),
        ("import arcdiff.worker.metrics as m", "arcdiff.worker.metrics"),
        ("from arcdiff import contract", "arcdiff.contract"),
        ("def f():\n    from arcdiff.cli.main import main", "arcdiff.cli.main"),
        ("from ..worker import engine", "arcdiff.worker"),
    ],
)
def test_import_forms_are_recognised(source, expected):
    assert expected in [name for name, _ in imports_in(source, "arcdiff.service.probe")]


def test_tests_never_import_a_conftest_by_name():
    """Several folders have a conftest.py; `from conftest import X` takes whichever is first on
    sys.path, which changes with the set of tests collected. Shared helpers live in plain modules."""
    tests = Path(__file__).parent
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if "conftest" in names:
                offenders.append(f"{path.relative_to(tests)}:{node.lineno}")
    assert not offenders, f"import a helper module (servicekit) instead of a conftest: {offenders}"


# modules that load without torch (the engine's policy, tested without a model; what the API and the
# client import), so nothing they import, however indirectly, may import it
TORCH_FREE = (
    "arcdiff.worker.scheduler",
    "arcdiff.contract",
    "arcdiff.client",
    "arcdiff.model.catalog",
    "arcdiff.settings",
    "arcdiff.worker.settings",
)
# the same for the API, except the one module that brings the engine in, imported only in embedded
# mode (app.make_backend): everything a Redis-mode API process runs
TORCH_FREE_BUT = {"arcdiff.service.app": ("arcdiff.service.embedded",)}


def source_file(module: str) -> Path | None:
    base = ROOT.parent.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def module_closure(module: str, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """Every arcdiff module that importing `module` runs: its imports, theirs, and the packages above
    each (a name that is no module, as in `from arcdiff.x import name`, stands for its module);
    the modules in `skip` and what only they import are left out."""
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        while name and source_file(name) is None:
            name = name.rpartition(".")[0]
        if not name or name in found or name in skip:
            continue
        found[name] = path = source_file(name)  # type: ignore[assignment]
        parent = name.rpartition(".")[0]
        todo += [parent] if parent else []
        todo += [target for target, _line in imports_of(path)]
        # `from arcdiff.worker import metrics` imports the module arcdiff.worker.metrics too
        froms = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and not n.level]
        todo += [f"{n.module}.{a.name}" for n in froms if (n.module or "").startswith("arcdiff") for a in n.names]
    return found


def test_torch_free_modules_import_nothing_that_imports_torch():
    bad = []
    for module, skip in [(m, ()) for m in TORCH_FREE] + list(TORCH_FREE_BUT.items()):
        for name, path in module_closure(module, skip).items():
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                if any(n.split(".")[0] == "torch" or n.endswith(".torch") for n in names):
                    bad.append(
                        f"{path.relative_to(ROOT.parent)}:{node.lineno}: {name} (imported by {module}) imports torch"
                    )
    assert not bad, "\n".join(bad)


def test_the_closure_follows_imports_and_packages():
    """Guards the walk above: it reaches the modules it must (or the test would pass on nothing)."""
    closure = module_closure("arcdiff.worker.scheduler")
    assert {"arcdiff", "arcdiff.worker", "arcdiff.contract", "arcdiff.model.solver_names"} <= set(closure)
    assert {"arcdiff.model.solvers", "arcdiff.worker.metrics"} <= set(module_closure("arcdiff.worker.engine"))
    api = module_closure("arcdiff.service.app", TORCH_FREE_BUT["arcdiff.service.app"])
    assert {"arcdiff.service.queue", "arcdiff.service.api.routes.generations", "arcdiff.model.catalog"} <= set(api)
    assert "arcdiff.service.embedded" not in api and "arcdiff.service.embedded" in module_closure("arcdiff.service.app")
