"""Shared job plumbing: ``--config FILE [dotted.key=value ...]`` parsing and a loopback-only local Ray.

Jobs import this as ``from _cli import ...`` (the script's folder is on ``sys.path`` when run as
``python jobs/<job>.py``, also under ``ray job submit --working-dir .``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from lsvcr_dist.config import ConfigError, load_config  # noqa: E402

# Quiet, offline, CPU-safe defaults; a GPU cluster overrides DS_ACCELERATOR through its runtime env.
DEFAULT_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def parse(stage: str, description: str, argv: list[str] | None = None, extra=None):
    """Parse ``--config FILE`` plus overrides into the ``stage`` dataclass; exit 2 with the bad key named."""
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="preset YAML under jobs/configs/")
    if extra:
        extra(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 scaling.num_workers=2")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, stage, args.overrides)
    except ConfigError as e:
        p.exit(2, f"config error: {e}\n")
    return cfg, args


def init_ray(num_cpus: int | None = None, runtime_env: dict | None = None) -> None:
    """Join the cluster of ``RAY_ADDRESS`` (``ray job submit``) or start a local one bound to 127.0.0.1.

    The local cluster is stopped by ``ray.shutdown()`` at exit (never ``ray stop``).
    """
    import atexit

    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {**DEFAULT_ENV, "PYTHONPATH": str(ROOT), **_passthrough_env()}}
    if runtime_env:
        env = {**env, **runtime_env, "env_vars": {**env["env_vars"], **runtime_env.get("env_vars", {})}}
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the job's runtime_env already applies and Ray refuses a driver runtime_env that
        # repeats one of its env keys: add only variables the job did not set (they are in os.environ already).
        env["env_vars"] = {k: v for k, v in env["env_vars"].items() if k not in os.environ}
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            runtime_env=env,
            object_store_memory=int(os.environ.get("LSVCR_OBJECT_STORE_BYTES", 1_000_000_000)),
            # Ray starts its workers at nice 15: on a box shared with anything else (even a nice-10 job) the training
            # workers then wait for CPU while that job runs. The local cluster runs them at the driver's priority.
            _system_config={"worker_niceness": int(os.environ.get("LSVCR_WORKER_NICENESS", 0))},
        )
    atexit.register(ray.shutdown)


def _passthrough_env() -> dict[str, str]:
    keys = ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "LSVCR_FAULT_INJECT")
    return {k: os.environ[k] for k in keys if k in os.environ}
