"""The folder tree is the architecture: imports flow one way and no two modules import each other.

Every module's imports are read with ``ast`` (module level, inside functions and under
``TYPE_CHECKING`` alike) and checked against the layers of docs/architecture.md:

    distributed  <  technique packages  <  training  <  integrations  <  app  <  study  <  top

A module may import its own layer or a lower one, never a higher one. Technique packages
(regularization, gradients, stopping, checkpoints, averaging, ensembles, metrics) import
only their own package, ``trainwell.distributed``, the standard library, torch, safetensors,
numpy and xxhash (the checkpoint checksum). The import graph has no cycle, however long.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import trainwell

SRC = Path(trainwell.__file__).resolve().parent

TECHNIQUES = (
    "metrics",
    "stopping",
    "regularization",
    "gradients",
    "checkpoints",
    "averaging",
    "ensembles",
)
LAYER = {
    "distributed": 0,
    **dict.fromkeys(TECHNIQUES, 1),
    "training": 2,
    "integrations": 3,
    "app": 4,
    "study": 5,
    "": 6,  # trainwell/__init__.py (the public API), __main__.py and cli.py
    "__main__": 6,
    "cli": 6,
}
TECHNIQUE_THIRD_PARTY = {"torch", "safetensors", "numpy", "xxhash"}
OPTIONAL = {"ray", "lightning", "pytorch_lightning", "transformers", "tensorboard", "mlflow"}


def module_files(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of the package at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] == "examples":  # user code shipped as data (init)
            continue
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """``(imported module, at module level)`` for every import in the file, resolved.

    ``from pkg import x`` counts as importing ``pkg.x`` when that is a module, else ``pkg``.
    """
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target if target in modules else base, id(node) in top_level))
    return found


def component(module: str, root: str) -> str:
    """The layer component of a module of the package: ``trainwell.app.data`` -> ``app``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(root: Path) -> list[str]:
    """Every broken rule in the package at ``root``, one line each."""
    modules = module_files(root)
    package = root.name
    stdlib = set(sys.stdlib_module_names)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for module, path in modules.items():
        here = component(module, package)
        for target, at_top in imports_of(module, path, modules):
            top = target.split(".")[0]
            if top == package:
                if target not in modules:
                    problems.append(f"{module} imports {target}, which does not exist")
                    continue
                if target != module:
                    graph[module].add(target)
                there = component(target, package)
                if LAYER.get(there, 99) > LAYER.get(here, 99):
                    problems.append(f"{module} ({here or 'top'}) imports {target} from above")
                if here in TECHNIQUES and there not in (here, "distributed"):
                    problems.append(f"technique module {module} imports {target}")
            elif here in TECHNIQUES and top not in stdlib | TECHNIQUE_THIRD_PARTY:
                problems.append(f"technique module {module} imports third-party {target}")
            elif top in OPTIONAL and LAYER.get(here, 99) < LAYER["integrations"]:
                problems.append(f"{module} imports optional {target} below the integrations")
            elif top in OPTIONAL and at_top and not _subclasses_third_party(module):
                problems.append(f"{module} imports optional {target} outside a function")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


#: modules whose classes subclass a third-party base (a Lightning ``Callback``, a
#: ``transformers.TrainerCallback``): they import it at module level, and nothing in trainwell
#: imports them (test_commands_and_integrations_package_import_no_extra).
SUBCLASSING = {"lightning", "hf"}


def _subclasses_third_party(module: str) -> bool:
    parts = module.split(".")
    return len(parts) == 3 and parts[1] == "integrations" and parts[2] in SUBCLASSING


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_trainwell_follows_the_layers() -> None:
    assert violations(SRC) == []


def test_every_module_sits_in_a_known_layer() -> None:
    unknown = {m for m in module_files(SRC) if component(m, "trainwell") not in LAYER}
    assert unknown == set(), "add the new package to LAYER and docs/architecture.md"


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "trainwell" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "trainwell"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (  # a loop of two modules, one side inside a function
            {
                "__init__.py": "",
                "averaging/__init__.py": "",
                "averaging/weights.py": "def f():\n    from trainwell.averaging import running\n",
                "averaging/running.py": "from trainwell.averaging.weights import f\n",
            },
            "import cycle: trainwell.averaging.running -> trainwell.averaging.weights",
        ),
        (  # a longer loop through a package __init__
            {
                "__init__.py": "",
                "app/__init__.py": "from trainwell.app.runner import x\n",
                "app/runner.py": "from .config import y\nx = 1\n",
                "app/config.py": "from trainwell.app import runner\ny = 2\n",
            },
            "import cycle: trainwell.app.config -> trainwell.app.runner",
        ),
        (  # the training loop reaching up into the app
            {
                "__init__.py": "",
                "training/__init__.py": "",
                "training/loop.py": "def f():\n    import trainwell.app.config\n",
                "app/__init__.py": "",
                "app/config.py": "",
            },
            "trainwell.training.loop (training) imports trainwell.app.config from above",
        ),
        (  # one technique package importing another
            {
                "__init__.py": "",
                "metrics.py": "",
                "ensembles/__init__.py": "",
                "ensembles/calibration.py": "from trainwell.metrics import nll\n",
            },
            "technique module trainwell.ensembles.calibration imports trainwell.metrics",
        ),
        (  # a technique importing a heavy third-party library
            {"__init__.py": "", "stopping.py": "import pandas\n"},
            "technique module trainwell.stopping imports third-party pandas",
        ),
        (  # an optional integration imported at module level
            {"__init__.py": "", "study/__init__.py": "", "study/execute.py": "import ray\n"},
            "trainwell.study.execute imports optional ray outside a function",
        ),
    ],
)
def test_the_checker_finds_each_kind_of_violation(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    problems = violations(write_tree(tmp_path, files))
    assert expected in problems


def test_the_checker_accepts_imports_that_follow_the_rules(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "__init__.py": "from trainwell.averaging import EMA\n",
            "distributed.py": "import torch\n",
            "averaging/__init__.py": "from trainwell.averaging.running import EMA\n",
            "averaging/weights.py": "import numpy\nfrom trainwell.distributed import torch\n",
            "averaging/running.py": "from .weights import numpy\nEMA = 1\n",
            "study/__init__.py": "",
            "study/execute.py": "def f():\n    import ray\n",
        },
    )
    assert violations(root) == []


def test_import_trainwell_stays_light() -> None:
    """The public API loads the technique layer and the loop: no app, study or extras."""
    code = (
        "import sys, trainwell; "
        "print(' '.join(sorted(m for m in sys.modules "
        "if m.split('.')[0] != 'trainwell' or m.split('.')[1:2] in (['app'], ['study']))))"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())  # fmt: skip
    heavy = {"trainwell.app", "trainwell.study", "matplotlib", "sqlalchemy", "typer", "rich",
             "pydantic", "scipy", "sklearn", *OPTIONAL}  # fmt: skip
    assert loaded & heavy == set()


def test_commands_and_integrations_package_import_no_extra() -> None:
    """The CLI, one run, a study and ``trainwell.integrations`` itself load no optional
    library, and no trainwell module imports the subclassing integrations at all."""
    code = (
        "import sys, trainwell.cli, trainwell.app.runner, trainwell.study.execute, "
        "trainwell.integrations; print(' '.join(sorted(sys.modules)))"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())  # fmt: skip
    assert {m for m in loaded if m.split(".")[0] in OPTIONAL} == set()
    modules = module_files(SRC)
    for module, path in modules.items():
        for target, _ in imports_of(module, path, modules):
            assert not _subclasses_third_party(target), f"{module} imports {target}"
