"""The layers of docs/architecture.md hold: a module of medldm/ imports only from its own layer or those below, so
inference never pulls in training or evaluation code by accident."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import cast

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {  # docs/architecture.md, lowest first
    0: ("errors", "outputs", "choices"),
    1: ("volume", "dicom", "intensity", "bids", "provenance"),
    2: ("degrade", "resample"),
    3: ("spec", "config", "diffusion", "nets", "checkpoint", "perceptual"),
    4: (
        *("data", "stages", "train", "model", "pipeline", "adapt", "scope"),
        *("fusion", "registration", "figures", "cohort", "batch"),
    ),
    5: ("api", "cli", "evaluation"),
}
LAYER = {module: level for level, modules in LAYERS.items() for module in modules}
MODULES = sorted(p for p in (ROOT / "medldm").glob("*.py") if p.stem != "__init__")


def medldm_imports(path: Path) -> set[str]:
    """The medldm modules ``path`` imports, at the top or inside functions (``medldm.x.y`` counts as ``x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medldm":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names if a.name in LAYER}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("medldm.")}
    return found


def test_every_module_has_a_layer():
    assert [p.stem for p in MODULES if p.stem not in LAYER] == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_a_module_imports_only_its_layer_and_below(path):
    upward = sorted(m for m in medldm_imports(path) if LAYER[m] > LAYER[path.stem])
    assert upward == [], f"{path.stem} (layer {LAYER[path.stem]}) imports {upward}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from medldm.evaluation.baselines import baseline\n    import medldm.train\n")
    assert medldm_imports(source) == {"evaluation", "train"}


MAX_FUNCTION_LINES = 60  # CONTRIBUTING.md: a longer function does several jobs; split it


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's code: from the first statement after its docstring to its end (a signature of many
    options, or a long docstring, is not several jobs)."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return cast(int, node.end_lineno) - body[0].lineno + 1


def test_no_function_is_longer_than_60_lines():
    long = []
    for folder in ("medldm", "cli", "evaluation"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _code_lines(node) > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({_code_lines(node)} lines)")
    assert long == []


@pytest.mark.parametrize("module", ["nets", "pipeline"])
def test_inference_reads_the_model_spec_not_the_training_config(module):
    """A model is its spec (medldm.spec); the training config (config), training data (data) and trainer (train,
    stages) stay out of the networks and the upscaler."""
    assert medldm_imports(ROOT / "medldm" / f"{module}.py") & {"config", "data", "train", "stages"} == set()
