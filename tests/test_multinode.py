"""Two Ray nodes on one machine (loopback), token auth on: alignment with a worker on each node, the second node's
raylet killed mid-run, the run finished from the last checkpoint with the losses of an uninterrupted run.

Head and node 2 each offer one ``train_slot`` (``scaling.worker_resource=train_slot``), so the two workers land one
per node. The run directory is shared by path, as NFS / a PVC is on a real cluster. Node 2's raylet is killed by
its process id as soon as the step-2 checkpoint is complete; a replacement node joins (as a Kubernetes replica or
the autoscaler would bring one); the failed attempt is retried from the newest complete checkpoint
(``RetryingTrainer``). One test of modest cost; every process started here is stopped by its process id.
"""

from __future__ import annotations

import json
import os
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
STEPS = ["max_steps=8", "checkpoint.every_steps=2", "global_batch=8", "deepspeed.micro_batch=4",
         "scaling.num_workers=2", "scaling.worker_resource=train_slot", "checkpoint.max_failures=1"]




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
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
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


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "align" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [d["step"] for d in lines]
    assert steps == list(range(1, 9)), steps  # contiguous, each step once
    return {d["step"]: d["loss"] for d in lines}


def _wait(p: subprocess.Popen, timeout: float, log: Path) -> None:
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    assert p.returncode == 0, log.read_text()[-5000:]


@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_two_nodes_worker_node_lost_mid_run_resumes_exactly(tiny_encoded, tmp_path):
    data, _, _ = tiny_encoded  # data + the base store (alignment standardises text vectors by its statistics)
    runs = {}
    for name in ("ref", "fault"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        (runs[name] / "data").symlink_to(Path(data) / "data")
        (runs[name] / "embeddings").mkdir()
        (runs[name] / "embeddings" / "base").symlink_to(Path(data) / "embeddings" / "base")
    cluster = _Cluster(tmp_path)
    drivers: list[subprocess.Popen] = []
    try:
        head_raylet = cluster.start("head", cpus=2, head=True)
        node2_raylet = cluster.start("node2", cpus=1)
        # the uninterrupted reference, on the same two nodes
        drivers.append(_align(cluster, runs["ref"], "ref.log"))
        _wait(drivers[-1], 600, tmp_path / "ref.log")
        drivers.append(_align(cluster, runs["fault"], "fault.log"))
        ckpt = runs["fault"] / "align" / "checkpoints" / "step_00000002" / "COMPLETE"
        end, placed = time.time() + 600, set()
        while time.time() < end and not ckpt.is_file() and drivers[-1].poll() is None:
            placed |= {n for n, r in (("head", head_raylet), ("node2", node2_raylet)) if _train_workers(r)}
            time.sleep(0.2)
        assert ckpt.is_file(), (tmp_path / "fault.log").read_text()[-5000:]
        assert placed == {"head", "node2"}  # one training worker under each node's raylet
        killed_at = max(json.loads(x)["step"] for x in
                        (runs["fault"] / "align" / "metrics.jsonl").read_text().splitlines() if x.strip())
        os.kill(node2_raylet.pid, signal.SIGKILL)
        assert killed_at < 8, "the run ended before the node was lost"
        cluster.start("node2b", cpus=1)  # the replacement node: the retried attempt needs its train_slot
        _wait(drivers[-1], 900, tmp_path / "fault.log")
    finally:
        for d in drivers:
            if d.poll() is None:
                os.killpg(d.pid, signal.SIGKILL)
                d.wait(timeout=60)
        cluster.stop()
    log = (tmp_path / "fault.log").read_text()
    assert "[retry] attempt 1 failed" in log and "resuming from" in log
    ref, fault = _losses(runs["ref"]), _losses(runs["fault"])
    for step in ref:  # the resumed run reproduces the uninterrupted losses at every step
        assert fault[step] == pytest.approx(ref[step], abs=1e-5), step
    state = json.loads((runs["fault"] / "align" / "checkpoints" / "step_00000008" / "state.json").read_text())
    assert (state["step"], state["world_size"]) == (8, 2)
