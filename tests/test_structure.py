"""The shape of the package stays readable: small modules, short functions, one place for the
ImageNet statistics, library code that never prints."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "hpseg"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_modules_are_small() -> None:
    long = {str(p.relative_to(SRC)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_functions_are_short() -> None:
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(SRC)}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_imagenet_statistics_live_in_one_place() -> None:
    holders = [str(p.relative_to(SRC)) for p in _modules() if "0.485" in p.read_text()]
    assert holders == ["imaging.py"], holders


def test_only_the_cli_prints() -> None:
    printing = []
    for path in _modules():
        rel = path.relative_to(SRC)
        if rel.parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{rel}:{node.lineno}")
    assert not printing, f"library code prints (log instead): {printing}"


#: the layers of docs/DEVELOPING.md: a module may import from its own layer and the layers below
LAYERS = {
    "foundations": ["errors", "io", "config", "schedule", "imaging", "runtime", "distributed", "preemption"],
    "math and modules": ["hidden_positives", "metrics", "crf", "clustering", "heads", "backbones", "model",
                         "diagnostics", "label_free", "verdict"],
    "data and files": ["data", "checkpoint", "results", "viz"],
    "engines": ["train", "checkpointing", "evaluate", "segmenter", "export", "feature_cache"],
    "presentation": ["report", "compare", "sweep_page"],
    "entry": ["pipeline", "run_data", "demo", "sweep"],
    "commands": ["cli", "__main__"],
}


def _layer_of(module: str) -> int:
    top = module.split(".")[0]
    for rank, names in enumerate(LAYERS.values()):
        if top in names:
            return rank
    raise AssertionError(f"hpseg.{module} is in no layer of docs/DEVELOPING.md: add it")


def test_imports_follow_the_layers() -> None:
    upward = []
    for path in _modules():
        rel = path.relative_to(SRC).with_suffix("")
        if rel.parts == ("__init__",):
            continue  # the package's lazy public names
        here = _layer_of(".".join(p for p in rel.parts if p != "__init__"))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hpseg."):
                there = _layer_of(node.module[len("hpseg."):])
                if there > here:
                    upward.append(f"{'/'.join(rel.parts)} → {node.module}")
    assert not upward, f"imports of a higher layer: {upward}"
