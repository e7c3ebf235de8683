"""Test tiers: unit (seconds), ``ray`` integration (real local Ray, 2 workers), ``gpu`` (off without CUDA)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for k, v in {
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(k, v)
sys.path.insert(0, str(ROOT / "jobs"))
sys.path.insert(1, str(ROOT))  # `benchmarks` is a package of the checkout, not of the installed library


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """One loopback-only local Ray for the whole session (4 logical CPUs so 2 workers + Ray Data fit)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="lsvcr-ray-", dir="/tmp")
    ray.init(
        num_cpus=4,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _temp_dir=tmp,
        object_store_memory=500_000_000,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                  "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A generated + prepared tiny run dir shared by tests (built once per session, outside Ray)."""
    from lsvcr_dist.config import load_config

    run_dir = tmp_path_factory.mktemp("tiny_run")
    cfg_path = ROOT / "jobs" / "configs" / "tiny.yaml"
    overrides = [f"run_dir={run_dir}"]
    from lsvcr_dist.data.generate import generate_logs

    generate_logs(load_config(cfg_path, "generate", overrides))
    return run_dir, cfg_path, overrides


@pytest.fixture(scope="session")
def tiny_prepared(tiny_run, ray_local):
    """``tiny_run`` plus ``prepare`` on the session Ray: ``(run_dir, cfg_path, overrides)`` with ``run_dir/data``
    holding the manifest, tables and Parquet + WebDataset shards of the tiny preset (built once per session)."""
    from lsvcr_dist.config import load_config
    from lsvcr_dist.data.prepare import prepare

    run_dir, cfg_path, overrides = tiny_run
    prepare(load_config(cfg_path, "prepare", overrides), log=lambda *_: None)
    return run_dir, cfg_path, overrides


@pytest.fixture(scope="session")
def tiny_encoded(tiny_prepared, tmp_path_factory):
    """A run dir whose ``data`` links to ``tiny_prepared``'s and that holds the real base store (alignment under
    ``llm.text_norm=standardize`` reads its statistics), encoded in-process once per session. Its own folder: other
    tests write stand-in stores into ``tiny_prepared``'s run dir."""
    from lsvcr_dist.config import load_config
    from lsvcr_dist.encode import encode_texts_local

    run_dir, cfg_path, _ = tiny_prepared
    enc = tmp_path_factory.mktemp("tiny_encoded")
    (enc / "data").symlink_to(Path(run_dir) / "data")
    overrides = [f"run_dir={enc}"]
    encode_texts_local(load_config(cfg_path, "encode", overrides), log=lambda *_: None)
    return enc, cfg_path, overrides
