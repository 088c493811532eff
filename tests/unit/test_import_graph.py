"""No import cycle among the package's modules, and each layer imports only the layers below it.

Read from the source with ``ast`` (no module is imported): every import statement of every module
under ``airflow_elspeth``, those inside functions included (a late import is still a dependency: a
cycle through one only waits for the first call to bite), leaving out ``if TYPE_CHECKING:`` blocks.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "airflow_elspeth"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for path in PACKAGE.rglob("*.py")
        if "migrations" not in path.parts  # Alembic loads revisions by path, never by import
    }


def _is_type_checking(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.Module) -> list[ast.stmt]:
    """Every statement of a module, at any depth, but those under ``if TYPE_CHECKING:``."""
    found: list[ast.stmt] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.stmt):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _statements(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:
                    found.add(target)
                elif base in modules:
                    found.add(base)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_module_graph_has_no_cycle() -> None:
    graph = _graph()
    # The edges the parser must see for the check to mean anything (a plain and a from-import).
    assert "airflow_elspeth.topology" in graph["airflow_elspeth.operators.branch"]
    assert "airflow_elspeth.runtime.branch" in graph["airflow_elspeth.operators.branch"]
    assert "airflow_elspeth.core.policy" in graph["airflow_elspeth.audit.coalesce"]
    assert "airflow_elspeth.operators.branch" not in graph["airflow_elspeth.sensors.coalesce"]
    # an import inside a function counts (the sensor's trigger is imported where it defers)
    assert "airflow_elspeth.triggers.coalesce" in graph["airflow_elspeth.sensors.coalesce"]
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as cycle:
        raise AssertionError(f"import cycle: {' -> '.join(cycle.args[1])}") from None


def test_layers_import_only_downwards() -> None:
    """The pure core imports nothing of the package outside it (and ``exceptions``); the audit layer
    imports no runtime and no shell; a runtime no shell (docs/ARCHITECTURE.md, "Layers and what each
    may import")."""
    below = {
        "airflow_elspeth.core": ("airflow_elspeth.core", "airflow_elspeth.exceptions"),
        "airflow_elspeth.audit": (
            "airflow_elspeth.core",
            "airflow_elspeth.audit",
            "airflow_elspeth.exceptions",
        ),
        "airflow_elspeth.runtime": (
            "airflow_elspeth.core",
            "airflow_elspeth.audit",
            "airflow_elspeth.runtime",
            "airflow_elspeth.exceptions",
        ),
    }
    wrong = sorted(
        (name, target)
        for name, targets in _graph().items()
        for layer, allowed in below.items()
        if name == layer or name.startswith(layer + ".")
        for target in targets
        if not target.startswith(allowed)
    )
    assert not wrong, wrong


def test_the_coalesce_shells_reach_the_audit_layer_through_its_service() -> None:
    """The sensor, its trigger, its finalizer and what they share import one audit entry point: the
    coalesce service (and the spec it takes); they get it from the hook (docs/ARCHITECTURE.md)."""
    entry = {"airflow_elspeth.audit.service", "airflow_elspeth.audit.model"}
    graph = _graph()
    for shell in (
        "airflow_elspeth.sensors.coalesce",
        "airflow_elspeth.triggers.coalesce",
        "airflow_elspeth.operators.finalize",
        "airflow_elspeth.coalesce_task",
    ):
        audit = {target for target in graph[shell] if target.startswith("airflow_elspeth.audit")}
        assert audit <= entry, f"{shell} imports {sorted(audit - entry)}"


def test_read_models_do_not_depend_on_the_write_path() -> None:
    """The read models (``audit/read``) read through the model and the log (``audit/model.py``,
    ``audit/log.py``), never through the coalesce pass or the writers: a change to how rows are
    decided or written cannot break a read, and the read side can be followed without the pass."""
    graph = _graph()
    assert "airflow_elspeth.audit.model" in graph["airflow_elspeth.audit.read.runs"]
    write_path = {"airflow_elspeth.audit.coalesce", "airflow_elspeth.audit.store"}
    wrong = sorted(
        (name, target)
        for name, targets in graph.items()
        if name.startswith("airflow_elspeth.audit.read.")
        for target in targets & write_path
    )
    assert not wrong, wrong
