"""Two Ray nodes on one machine (loopback), token auth on: alignment with a worker on each node, the second node's
raylet killed mid-run, the run finished from the last checkpoint, recomputing the steps it lost with the losses it
had logged for them before the node died.

Head and node 2 each offer one ``train_slot`` (``scaling.worker_resource=train_slot``), so the two workers land one
per node. The run directory is shared by path, as NFS / a PVC is on a real cluster. Node 2's raylet is killed by
its process id once the step-4 checkpoint is complete and step 5 is logged; a replacement node joins (as a
Kubernetes replica or the autoscaler would bring one); the failed attempt is retried from the newest complete
checkpoint (``RetryingTrainer``). The steps logged after that checkpoint are computed twice, by the lost attempt
and by the retry, which must agree: that is the uninterrupted curve, without a second run to compare with. Every
process started here is stopped by its process id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from _cli import free_ports  # jobs/ (conftest puts it on sys.path)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A small shuffle window and 1 MiB blocks: the first step waits for 16 rows per worker, not the whole tiny split.
STEPS = ["max_steps=12", "checkpoint.every_steps=4", "global_batch=8", "deepspeed.micro_batch=4",
         "scaling.num_workers=2", "scaling.worker_resource=train_slot", "checkpoint.max_failures=1",
         "ingest.shuffle_window=16", "ingest.block_mb=1"]


def _head_host() -> str:
    """How the joining node names the head (GCS on 127.0.0.1 only): a joining node runs with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, under which Ray replaces the literal 127.0.0.1 by the machine's outward
    address, where nothing of the head listens. The machine's host name, when it resolves to loopback (/etc/hosts),
    reaches the head unchanged."""
    name = socket.gethostname()
    try:
        return name if socket.gethostbyname(name).startswith("127.") else "127.0.0.1"
    except OSError:
        return "127.0.0.1"

class _Cluster:
    """``ray start --block`` processes on loopback (head 127.0.0.1, others 127.0.0.2) sharing one temp dir;
    stopped by their process ids."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.temp_dir = tmp, tempfile.mkdtemp(prefix="lsvcr-mn-", dir="/tmp")  # short socket paths
        home = tmp / "home"
        home.mkdir()
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "HOME": str(home),
                    "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # head and drivers: 127.0.0.1 stays 127.0.0.1
                    "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                    # a dead node is declared dead in ~3 s instead of ~15 s
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    # SIGTERM stops a node at once: the default 30 s drain lets Ray Serve move replicas away, and
                    # nothing here runs Serve (the drain ran out its 30 s at every stop)
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(k, None)
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=self.env, check=True,
                       capture_output=True, timeout=300)
        self.procs: list[subprocess.Popen] = []
        self.gcs = free_ports(1)[0]

    def start(self, name: str, cpus: int, head: bool = False, tries: int = 3) -> psutil.Process:
        """Start a node (retried on new ports if it misses Ray's 30 s start-up window on a loaded machine); return
        its raylet process."""
        for attempt in range(1, tries + 1):
            if head:
                self.gcs = free_ports(1)[0]
            log = self.tmp / f"{name}-{attempt}.log"
            # A joining node needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, under which Ray swaps 127.0.0.1 for the
            # machine's outward address: it runs on 127.0.0.2, loopback as well.
            env = self.env if head else {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
            p = subprocess.Popen(self._cmd(cpus, head), env=env, start_new_session=True,
                                 stdout=open(log, "w"), stderr=subprocess.STDOUT)
            self.procs.append(p)
            end = time.time() + 300
            while time.time() < end and p.poll() is None and "Ray runtime started" not in log.read_text():
                time.sleep(1)
            if p.poll() is None and "Ray runtime started" in log.read_text():
                return next(c for c in psutil.Process(p.pid).children(recursive=True) if c.name() == "raylet")
        raise RuntimeError(f"{name} did not start in {tries} tries:\n{log.read_text()[-3000:]}")

    def _cmd(self, cpus: int, head: bool) -> list[str]:
        node_mgr, obj_mgr, agent_http, agent_grpc, metrics, rt_agent, client = free_ports(7)
        # no dashboard: its nine module processes start alongside the raylet and, on a loaded machine, push it past
        # Ray's fixed 30 s registration window (Ray Train's placement-group cleaner then only logs that it cannot ask)
        where = [f"--port={self.gcs}", "--head", "--include-dashboard=false", f"--temp-dir={self.temp_dir}",
                 f"--ray-client-server-port={client}"] if head else [
            f"--address={_head_host()}:{self.gcs}"]
        ip = "127.0.0.1" if head else "127.0.0.2"
        return [str(BIN / "ray"), "start", "--block", f"--node-ip-address={ip}", *where, f"--num-cpus={cpus}",
                '--resources={"train_slot": 1}', "--object-store-memory=150000000",
                f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
                f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_agent}"]

    def stop(self) -> None:
        for p in self.procs:  # `ray start --block` stops the processes it started on SIGTERM
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever is left in the session we started (e.g. workers orphaned by the killed raylet)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _train_workers(raylet: psutil.Process) -> list[psutil.Process]:
    try:
        return [c for c in raylet.children() if "RayTrainWorker" in " ".join(c.cmdline())]
    except psutil.NoSuchProcess:
        return []


def _align(cluster: _Cluster, run: Path, log: str) -> subprocess.Popen:
    env = {**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs}"}
    cmd = [sys.executable, "jobs/align.py", "--config", "jobs/configs/tiny.yaml", f"run_dir={run}", *STEPS]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, text=True,
                            stdout=open(cluster.tmp / log, "w"), stderr=subprocess.STDOUT)


def _logged(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The complete lines of ``align/<name>`` (a line being written is left out)."""
    path = run / "align" / name
    return [json.loads(x) for x in path.read_text().split("\n")[:-1] if x.strip()] if path.is_file() else []


def _wait(p: subprocess.Popen, timeout: float, log: Path) -> None:
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    assert p.returncode == 0, log.read_text()[-5000:]


@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_two_nodes_worker_node_lost_mid_run_resumes_exactly(tiny_encoded, tmp_path):
    data, _, _ = tiny_encoded  # data + the base store (alignment standardises text vectors by its statistics)
    run = tmp_path / "run"
    (run / "embeddings").mkdir(parents=True)
    (run / "data").symlink_to(Path(data) / "data")
    (run / "embeddings" / "base").symlink_to(Path(data) / "embeddings" / "base")
    cluster = _Cluster(tmp_path)
    driver = None
    try:
        head_raylet = cluster.start("head", cpus=2, head=True)
        node2_raylet = cluster.start("node2", cpus=1)
        driver = _align(cluster, run, "fault.log")
        ckpt = run / "align" / "checkpoints" / "step_00000004" / "COMPLETE"
        end, placed = time.time() + 600, set()
        while time.time() < end and driver.poll() is None and not (
                ckpt.is_file() and max((d["step"] for d in _logged(run)), default=0) >= 5):
            placed |= {n for n, r in (("head", head_raylet), ("node2", node2_raylet)) if _train_workers(r)}
            time.sleep(0.1)
        os.kill(node2_raylet.pid, signal.SIGKILL)
        killed_at = max((d["step"] for d in _logged(run)), default=0)
        assert ckpt.is_file() and killed_at >= 5, (tmp_path / "fault.log").read_text()[-5000:]
        assert placed == {"head", "node2"}  # one training worker under each node's raylet
        assert killed_at < 12, "the run ended before the node was lost"
        cluster.start("node2b", cpus=1)  # the replacement node: the retried attempt needs its train_slot
        _wait(driver, 900, tmp_path / "fault.log")
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=60)
        cluster.stop()
    log = (tmp_path / "fault.log").read_text()
    assert "[retry] attempt 1 failed" in log
    resumed = re.search(r"resuming from \S*step_(\d+)", log)
    assert resumed, log[-5000:]
    final = {d["step"]: d["loss"] for d in _logged(run)}
    assert sorted(final) == list(range(1, 13))  # contiguous, each step once
    # what the lost attempt logged past the checkpoint the retry started from (moved aside by the retry)
    lost = {d["step"]: d["loss"] for d in _logged(run, "metrics.replaced.jsonl")}
    assert lost and min(lost) == int(resumed.group(1)) + 1 and max(lost) >= killed_at, (lost, resumed.group(0))
    for step, loss in lost.items():  # recomputed by the retry with the same losses: the uninterrupted curve
        assert final[step] == pytest.approx(loss, abs=1e-5), step
    state = json.loads((run / "align" / "checkpoints" / "step_00000012" / "state.json").read_text())
    assert (state["step"], state["world_size"]) == (12, 2)
