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
    """Join the cluster of ``RAY_ADDRESS`` (``ray job submit``) or start this job's own loopback cluster.

    Without ``RAY_ADDRESS`` the job never joins another cluster on the machine (see ``_start_local``). Stopped by
    ``ray.shutdown()`` at exit (never ``ray stop``).
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
        # With token authentication the job inherits RAY_AUTH_MODE and the token from the head (cluster/README.md).
        env["env_vars"] = {k: v for k, v in env["env_vars"].items() if k not in os.environ}
        address = os.environ["RAY_ADDRESS"]
        if "://" not in address and address not in ("auto", "local"):
            # The job's tasks and actors get the GCS address too (see _start_local): the driver alone has it.
            env["env_vars"]["RAY_ADDRESS"] = address
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        atexit.register(ray.shutdown)
    else:
        _start_local(num_cpus, env)


def _start_local(num_cpus: int | None, env: dict) -> None:
    """Start a new single-node cluster for this job only, bound to 127.0.0.1, in a private temp dir.

    * ``address="local"``: never join the cluster named in ``/tmp/ray/ray_current_cluster``; a stopped
      ``ray start`` head leaves that file behind and joining it fails ("object_store_memory must not be provided").
    * A private ``_temp_dir`` and free ports: the sessions, sockets and logs of two jobs on one machine never mix.
    * The GCS address is exported as ``RAY_ADDRESS`` to the cluster's own processes and to this driver, and the
      dashboard (the State API) runs on 127.0.0.1: Ray Train's placement-group cleaner and Ray Data's hang detector
      look the cluster up through them instead of scanning the machine for GCS processes ("Found multiple active
      Ray instances") and asking another job's cluster whether this job's controller is alive.
    * A raylet that misses Ray's fixed 30 s registration window on a loaded machine ("The current node timed out
      during startup") gets one more try on new ports, after the half-started processes are stopped.
    Token authentication stays Ray's default for a new local cluster (on; token in ``~/.ray/auth_token``).
    """
    import atexit
    import shutil
    import tempfile

    import ray

    for k, v in DEFAULT_ENV.items():  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps _node_ip_address on loopback
        os.environ.setdefault(k, v)
    for attempt in (1, 2):
        before = _children()
        tmp = tempfile.mkdtemp(prefix="lsvcr-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
        gcs_port, dash_port = free_ports(2)
        address = f"127.0.0.1:{gcs_port}"
        env["env_vars"]["RAY_ADDRESS"] = address
        os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)  # read by the head node Ray starts (ray._private.node)
        try:
            ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
                     dashboard_host="127.0.0.1", dashboard_port=dash_port, _temp_dir=tmp, runtime_env=env,
                     object_store_memory=int(os.environ.get("LSVCR_OBJECT_STORE_BYTES", 1_000_000_000)),
                     # Ray starts its workers at nice 15: on a box shared with anything else (even a nice-10 job) the
                     # training workers then wait for CPU. The local cluster runs them at the driver's priority.
                     _system_config={"worker_niceness": int(os.environ.get("LSVCR_WORKER_NICENESS", 0))})
            break
        except Exception as e:
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            print(f"init_ray: {e} Retrying once.", file=sys.stderr, flush=True)
            _stop(_children() - before)
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
    os.environ["RAY_ADDRESS"] = address

    def stop() -> None:
        ray.shutdown()
        if os.environ.get("RAY_ADDRESS") == address:
            del os.environ["RAY_ADDRESS"]
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(stop)


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (the OS picks them; closed again before use)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _children() -> set[int]:
    import psutil

    return {c.pid for c in psutil.Process().children(recursive=True)}


def _stop(pids: set[int]) -> None:
    """SIGKILL the given processes (what a failed ``ray.init`` had started under this process), by id."""
    import psutil

    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def _passthrough_env() -> dict[str, str]:
    keys = ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "LSVCR_FAULT_INJECT")
    return {k: os.environ[k] for k in keys if k in os.environ}
