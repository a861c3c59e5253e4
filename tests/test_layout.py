"""The package's layout rules, read from the import statements of every module.

Data flows one way (config -> storage -> data -> train (model, loss) -> tracking /
checkpoint); the model imports nothing from train, data, storage or tracking; the
library never imports the commands (sg2dist/cli/); no two modules import each other,
even through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sg2dist"
ROOT_MODULES = {
    "__init__",
    "__main__",
    "config",
    "errors",
    "metrics",
    "sampling",
    "storage",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """sg2dist modules that `path` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "sg2dist"}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in imports_of(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def test_the_package_root_holds_only_library_modules():
    root = {path.stem for path in PACKAGE.glob("*.py")}
    assert root == ROOT_MODULES


def test_the_library_never_imports_the_commands():
    offenders = {
        name: sorted(t for t in targets if t.startswith("sg2dist.cli"))
        for name, targets in import_graph().items()
        if not name.startswith("sg2dist.cli") and name != "sg2dist.__main__"
    }
    assert {name: t for name, t in offenders.items() if t} == {}


# What the model and the augmentation may not import: they are pure functions of tensors.
PIPELINE_PACKAGES = ("sg2dist.train", "sg2dist.data", "sg2dist.storage", "sg2dist.tracking")


def forbidden_imports(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """{module of `package`: the `forbidden` modules it imports}, for modules that do."""
    offenders = {
        name: sorted(t for t in targets if t.startswith(forbidden))
        for name, targets in import_graph().items()
        if name.startswith(package)
    }
    return {name: targets for name, targets in offenders.items() if targets}


def test_model_code_imports_nothing_from_train_data_storage_or_tracking():
    assert forbidden_imports("sg2dist.model", PIPELINE_PACKAGES) == {}
    assert any(name.startswith("sg2dist.model.") for name in import_graph())


def test_augmentation_code_imports_nothing_from_train_data_storage_or_tracking():
    assert forbidden_imports("sg2dist.augment", PIPELINE_PACKAGES) == {}
    assert any(name.startswith("sg2dist.augment.") for name in import_graph())


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    # A package's __init__ importing its own submodules is how it re-exports them: the
    # submodule never needs its package's names to load, so that edge is not a cycle.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for target in graph[node]:
                if target == start:
                    cycles.append(" -> ".join([*path, start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    assert cycles == []
