"""Boundary rule (ARCHITECTURE.md): model/loss/metric/transform code imports no Ray, DeepSpeed or
torch.distributed; no entry points (``__main__``, argparse, ``ray.init``) anywhere in the library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lsvcr_dist"
PURE = ["models", "losses.py", "metrics.py", "data/transforms.py", "data/ft_transforms.py", "data/comdiv.py",
        "data/prompts.py"]
# lsvcr_dist.train holds the collectives: importing it from a pure module would pull torch.distributed in.
FORBIDDEN = ("ray", "deepspeed", "torch.distributed", "lsvcr_dist.train")


def _pure_files() -> list[Path]:
    out = []
    for rel in PURE:
        p = PKG / rel
        if p.is_dir():
            out += sorted(p.rglob("*.py"))
        elif p.exists():
            out.append(p)
    return out


def _imported(tree: ast.AST, path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import, with ``from a import b`` also giving ``a.b``; relative resolved."""
    pkg_parts = ["lsvcr_dist", *path.relative_to(PKG).parent.parts]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg_parts[: len(pkg_parts) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def forbidden_imports(source: str, path: Path) -> list[str]:
    """Violations of the import rule in ``source`` as ``file:line module``."""
    bad = []
    for line, mod in _imported(ast.parse(source), path):
        if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN):
            bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod}")
    return bad


def entry_points(source: str, path: Path) -> list[str]:
    """``__main__`` checks, argparse imports and ``ray.init`` calls in ``source`` as ``file:line what``."""
    where = path.relative_to(PKG.parent)
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value == "__main__":
            bad.append(f"{where}:{node.lineno} __main__")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray":
            bad.append(f"{where}:{node.lineno} ray.init")
        if isinstance(node, ast.ImportFrom) and node.module == "ray" and any(a.name == "init" for a in node.names):
            bad.append(f"{where}:{node.lineno} from ray import init")
    for line, mod in _imported(ast.parse(source), path):
        if mod == "argparse" or mod.startswith("argparse."):
            bad.append(f"{where}:{line} imports argparse")
    if path.name == "__main__.py":
        bad.append(f"{where} is a __main__ module")
    return bad


def test_pure_modules_import_no_distributed_stack():
    files = _pure_files()
    assert any(f.name == "sr_model.py" for f in files) and any(f.name == "losses.py" for f in files)
    bad = [v for f in files for v in forbidden_imports(f.read_text(), f)]
    assert bad == [], "\n".join(bad)


def test_library_has_no_entry_points():
    bad = [v for f in sorted(PKG.rglob("*.py")) for v in entry_points(f.read_text(), f)]
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize("src,hit", [
    ("import ray.data\n", "imports ray.data"),
    ("from torch import distributed as dist\n", "imports torch.distributed"),
    ("import torch.distributed.nn\n", "imports torch.distributed.nn"),
    ("from deepspeed.comm import comm\n", "imports deepspeed.comm"),
    ("from ..train.distributed import all_gather_with_grad\n", "imports lsvcr_dist.train.distributed"),
    ("import importlib\nimportlib.import_module('ray')\n", "imports ray"),
])
def test_checker_catches_forbidden_imports(src, hit):
    bad = forbidden_imports(src, PKG / "models" / "x.py")
    assert any(hit in b and b.startswith("lsvcr_dist/models/x.py:") for b in bad), bad
    assert forbidden_imports("import torch\nfrom torch import nn\nimport numpy\n", PKG / "losses.py") == []


@pytest.mark.parametrize("src,hit", [
    ("if __name__ == '__main__':\n    pass\n", "__main__"),
    ("import argparse\n", "argparse"),
    ("import ray\nray.init(num_cpus=1)\n", "ray.init"),
])
def test_checker_catches_entry_points(src, hit):
    assert any(hit in b for b in entry_points(src, PKG / "data" / "y.py"))
