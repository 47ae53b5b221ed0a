"""Import boundaries of the rooms in DESIGN.md: MLflow only in tracking (and the report's
loader), Optuna only in the scheduler. Read from the source with `ast`, so an import inside a
function or under TYPE_CHECKING counts as much as one at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

import ddsweep

PACKAGE = Path(ddsweep.__file__).resolve().parent
ROOT = PACKAGE.parent

# Where each library may be imported (paths relative to the repository root; a folder
# allows everything under it). Modules named here need not exist yet.
ALLOWED = {
    "mlflow": ("ddsweep/tracking/", "ddsweep/report/loader.py"),
    "optuna": ("ddsweep/scheduler/",),
}


def imported_roots(tree: ast.AST) -> set[str]:
    """The top-level package of every absolute import in `tree`, wherever it sits, including
    `importlib.import_module("x.y")` and `__import__("x")` with a literal name."""
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant):
                roots.add(str(first.value).split(".")[0])
    return roots


def offenders() -> dict[str, list[str]]:
    """library -> the modules that import it outside where it is allowed."""
    out: dict[str, list[str]] = {lib: [] for lib in ALLOWED}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        roots = imported_roots(ast.parse(path.read_text(), filename=rel))
        for lib, allowed in ALLOWED.items():
            if lib in roots and not any(
                rel.startswith(a) if a.endswith("/") else rel == a for a in allowed
            ):
                out[lib].append(rel)
    return out


def test_the_scan_sees_every_form_of_import() -> None:
    source = """
import os, mlflow.tracking as mt
from optuna.trial import TrialState
from . import sibling
def f():
    from mlflow import MlflowClient
if TYPE_CHECKING:
    import torch
importlib.import_module("yaml.loader")
"""
    roots = imported_roots(ast.parse(source))
    assert roots == {"os", "mlflow", "optuna", "torch", "yaml"}


def test_mlflow_only_in_tracking_and_the_report_loader_optuna_only_in_the_scheduler() -> None:
    assert offenders() == {"mlflow": [], "optuna": []}


# Where an MLflow run's raw tags and params, and MLflow's entity classes, may be read: the rest
# of ddsweep reads tracking's typed records (ddsweep.tracking.records).
RAW_RUN_ALLOWED = ("ddsweep/tracking/", "ddsweep/report/loader.py")
RAW_ATTRIBUTES = ("tags", "params")


def raw_run_reads(tree: ast.AST) -> set[str]:
    """`.data.tags`, `.data.params` and `mlflow.entities` (imported or named) in `tree`."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in RAW_ATTRIBUTES
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "data"
        ):
            found.add(f".data.{node.attr}")
        elif (
            (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlflow.entities"))
            or (
                isinstance(node, ast.Import)
                and any(a.name.startswith("mlflow.entities") for a in node.names)
            )
            or (
                isinstance(node, ast.Attribute)
                and node.attr == "entities"
                and isinstance(node.value, ast.Name)
                and node.value.id == "mlflow"
            )
        ):
            found.add("mlflow.entities")
    return found


def test_the_raw_run_scan_sees_every_form() -> None:
    source = """
from mlflow.entities import Run
import mlflow.entities
def f(run, client):
    run.data.tags.get("x")
    client.get_run("id").data.params["y"]
    mlflow.entities.RunStatus
    run.data.metrics  # metrics are read freely
"""
    assert raw_run_reads(ast.parse(source)) == {".data.tags", ".data.params", "mlflow.entities"}


def test_raw_mlflow_runs_are_read_only_in_tracking_and_the_report_loader() -> None:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(a) if a.endswith("/") else rel == a for a in RAW_RUN_ALLOWED):
            continue
        found = raw_run_reads(ast.parse(path.read_text(), filename=rel))
        if found:
            out[rel] = sorted(found)
    assert out == {}


# tracking's own functions that hand out MLflow's runs: every other room gets a record.
RUN_GIVERS_ALLOWED = {"run_entity", "training_entities"}


def raw_run_returns(tree: ast.AST) -> set[str]:
    """Functions in `tree` whose return annotation names MLflow's `Run` (as `Run`,
    `mlflow.entities.Run`, or inside a container such as `list[Run]`)."""
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.returns is None:
            continue
        returns = node.returns
        if isinstance(returns, ast.Constant) and isinstance(returns.value, str):
            returns = ast.parse(returns.value, mode="eval").body  # a quoted annotation
        names = {n.id for n in ast.walk(returns) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(returns) if isinstance(n, ast.Attribute)}
        if "Run" in names:
            found.add(node.name)
    return found


def test_the_return_scan_sees_every_form() -> None:
    source = """
def a() -> Run: ...
def b() -> list[Run]: ...
def c() -> "mlflow.entities.Run | None": ...
async def d() -> dict[str, Run]: ...
def e() -> TrainingRun: ...
def f(run: Run) -> str: ...
"""
    assert raw_run_returns(ast.parse(source)) == {"a", "b", "c", "d"}


def test_no_function_hands_out_a_raw_mlflow_run_but_trackings_own_two() -> None:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        found = raw_run_returns(ast.parse(path.read_text(), filename=rel))
        if rel.startswith("ddsweep/tracking/"):
            found -= RUN_GIVERS_ALLOWED
        if found:
            out[rel] = sorted(found)
    assert out == {}
