"""Boundary rules (ARCHITECTURE.md): model/loss/metric/transform code imports no Ray, DeepSpeed or
torch.distributed; no entry points (``__main__``, argparse, ``ray.init``) anywhere in the library; no import cycle
in the library; imports run one way, down the layers of ``LAYERS`` and from ``benchmarks/`` to ``jobs/`` to
``lsvcr_dist/``, never back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lsvcr_dist"
PURE = ["models", "losses.py", "metrics.py", "data/transforms.py", "data/ft_transforms.py", "data/comdiv.py",
        "data/prompts.py", "data/history.py", "data/tables.py", "data/manifest.py"]
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


# ------------------------------------------------------------------------------------------------ import direction
ROOT = PKG.parent
LAYERS = (
    ("foundation", ("__init__.py", "schema.py", "config_blocks.py", "config_stages.py", "config.py", "losses.py",
                    "metrics.py", "flops.py", "embeddings.py", "plots.py", "checksums.py", "store_progress.py", "store_stats.py",
                    "progress.py")),
    ("models", ("models/",)),
    ("data", ("data/", "finetuned.py", "raw_source.py")),
    ("stage libraries", ("encode.py", "evaluate.py", "serve.py")),
    ("training", ("train/",)),
    ("pipeline", ("stages.py", "ablations.py", "ablation_seeds.py")),
)
"""The library's layers, lowest first: a module imports its own layer and the ones below, never one above."""


def module_name(path: Path) -> str:
    """``lsvcr_dist/data/raw.py`` -> ``lsvcr_dist.data.raw`` (a package's ``__init__.py`` -> the package)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_graph(files: list[Path]) -> dict[str, set[str]]:
    """``{module: modules of the library it imports}``, function-local imports included (a late import is still a
    dependency); ``from pkg import name`` counts as importing ``pkg.name`` when that is a module."""
    mods = {module_name(f): f for f in files}
    graph = {}
    for name, f in mods.items():
        deps = set()
        for _, mod in _imported(ast.parse(f.read_text()), f):
            while mod and mod not in mods:
                mod = mod.rpartition(".")[0]
            if mod and mod != name:
                deps.add(mod)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every set of two or more modules that import each other in a loop (Tarjan's strongly connected components)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of a library module; ValueError for a module no layer names."""
    parts = module.split(".")[1:]
    rel = "/".join(parts) + ".py" if (PKG.joinpath(*parts).with_suffix(".py")).is_file() else "/".join(parts) + "/"
    rel = "__init__.py" if rel == "/" else rel
    for i, (_, places) in enumerate(LAYERS):
        if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in places):
            return i
    raise ValueError(f"{module} is in no layer of LAYERS: place it there (and in ARCHITECTURE.md)")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import from a lower layer to a higher one."""
    bad = []
    for a, deps in sorted(graph.items()):
        for b in sorted(deps):
            if layer_of(b) > layer_of(a):
                bad.append(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})")
    return bad


def top_level_imports(files: list[Path], names: set[str]) -> list[str]:
    """``file:line module`` for imports of a top-level module or package in ``names`` (``jobs``, ``_cli`` ...)."""
    bad = []
    for f in files:
        for line, mod in _imported(ast.parse(f.read_text()), f if f.is_relative_to(PKG) else PKG / "x.py"):
            if mod.split(".")[0] in names:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    return sorted(set(bad))


JOB_MODULES = {p.stem for p in (ROOT / "jobs").glob("*.py")} | {"jobs"}
BENCH_MODULES = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"} | {"benchmarks"}


def test_library_has_no_import_cycle():
    graph = library_graph(sorted(PKG.rglob("*.py")))
    assert "lsvcr_dist.train.loop" in graph["lsvcr_dist.train.align_run"]  # the graph sees late imports too
    assert cycles(graph) == []


def test_library_imports_run_down_the_layers():
    assert upward_imports(library_graph(sorted(PKG.rglob("*.py")))) == []


def paths_into(files: list[Path], folders: tuple[str, ...]) -> list[str]:
    """``file:line`` where code names one of ``folders`` as a path part (``ROOT / "jobs"``): the library reaching
    into the entry points without importing them."""
    bad = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip("/") in folders:
                bad.append(f"{f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}:{node.lineno} names {node.value!r}")
    return bad


def test_library_uses_neither_jobs_nor_benchmarks_and_jobs_use_no_benchmark():
    lib = sorted(PKG.rglob("*.py"))
    assert top_level_imports(lib, JOB_MODULES | BENCH_MODULES) == []
    assert paths_into(lib, ("jobs", "benchmarks")) == []
    assert top_level_imports(sorted((ROOT / "jobs").glob("*.py")), BENCH_MODULES) == []


def test_architecture_states_the_same_layers():
    """ARCHITECTURE.md's layer table is the one tested here (lowest first, same modules)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    table = text[text.index("| layer (lowest first) | modules |"):].split("\n\n")[0].splitlines()[2:]
    stated = [(row.split("|")[1].strip(), tuple(m.strip(" `") for m in row.split("|")[2].split(",")))
              for row in table]
    assert stated == [(name, tuple(m for m in mods if m != "__init__.py")) for name, mods in LAYERS]


def test_cycle_and_direction_checkers_catch_violations(tmp_path):
    loop = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(loop) == [["a", "b", "c"]]
    assert upward_imports({"lsvcr_dist.models.layers": {"lsvcr_dist.train.loop"}}) == [
        "lsvcr_dist.models.layers (models) imports lsvcr_dist.train.loop (training)"]
    assert upward_imports({"lsvcr_dist.train.loop": {"lsvcr_dist.models.layers", "lsvcr_dist.config"}}) == []
    assert layer_of("lsvcr_dist.finetuned") == layer_of("lsvcr_dist.data.raw") == 2
    with pytest.raises(ValueError, match="no layer"):
        layer_of("lsvcr_dist.newthing")
    fake = ROOT / "lsvcr_dist" / "x.py"
    (tmp_path / "s.py").write_text('"""jobs/align.py runs it."""\nJOB = ROOT / "jobs" / "align.py"\n')
    assert paths_into([tmp_path / "s.py"], ("jobs",)) == [f"{tmp_path / 's.py'}:2 names 'jobs'"]
    bad = forbidden_imports("import pipeline\n", fake)  # the import-walker the rules share sees plain imports
    assert bad == [] and [m for _, m in _imported(ast.parse("from benchmarks.align_bench import x\n"), fake)] == [
        "benchmarks.align_bench", "benchmarks.align_bench.x"]
