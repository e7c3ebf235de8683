"""`ray job submit` of jobs/align.py to a head started here (loopback only), stopped by its process id.

One test on purpose: starting a head and running a job costs about a minute on 2 cores.
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
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, timeout: float, head: subprocess.Popen, log: Path, ray_tmp: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError:
            return  # the dashboard answers (e.g. 401 when token auth is on): it is up
        except OSError:
            time.sleep(2)
    dash_logs = "".join(p.read_text()[-1500:] for p in Path(ray_tmp).glob("session_latest/logs/dashboard*"))
    raise TimeoutError(f"{url} did not answer within {timeout}s\n{dash_logs}")


@pytest.mark.ray
@pytest.mark.timeout(1800)
def test_ray_job_submit_align(tiny_encoded, tmp_path):
    data, _, _ = tiny_encoded
    run_dir = tmp_path / "run"
    (run_dir / "embeddings").mkdir(parents=True)
    (run_dir / "data").symlink_to(Path(data) / "data")
    (run_dir / "embeddings" / "base").symlink_to(Path(data) / "embeddings" / "base")
    # Every port explicit: other Ray instances on this machine hold the fixed defaults (e.g. agent port 52365).
    gcs, dash, client, agent_http, agent_grpc, metrics, rt_agent, node_mgr, obj_mgr = _free_ports(9)
    # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep for --temp-dir.
    ray_tmp = tempfile.mkdtemp(prefix="lsvcr-js-", dir="/tmp")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "RAY_AUTH_MODE": "disabled"}  # loopback-only test head: no token for the CLI to find
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_agent}",
         f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
         "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={ray_tmp}"],
        env=env, start_new_session=True, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(f"{address}/api/version", 480, head, tmp_path / "head.log", ray_tmp)
        runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                    "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}}
        sub_id = f"lsvcr-align-{os.getpid()}"
        for _ in range(20):  # the job agent starts after the dashboard: "No available agent" until then
            submit = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", sub_id, "--no-wait",
                 "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
                 "python", "jobs/align.py", "--config", "jobs/configs/tiny.yaml", f"run_dir={run_dir}",
                 "max_steps=3", "global_batch=8", "deepspeed.micro_batch=4", "checkpoint.every_steps=3"],
                env=env, capture_output=True, text=True, timeout=180)
            if submit.returncode == 0 or "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(15)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        # Poll through the job SDK: the CLI's status wording differs between Ray versions.
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(address)
        status, end = None, time.time() + 600
        while time.time() < end:
            status = client.get_job_status(sub_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(5)
        logs = client.get_job_logs(sub_id)
        assert status == JobStatus.SUCCEEDED, f"{status}: {logs[-4000:]}"
    finally:
        os.kill(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the session we started, by its id
            head.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [json.loads(x) for x in (run_dir / "align" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [d["step"] for d in lines] == [1, 2, 3]
    assert all(d["pool_size"] == 8 and d["world_size"] == 2 for d in lines)
    assert (run_dir / "align" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    summaries = [json.loads(x) for x in logs.splitlines() if x.startswith('{"run_dir"')]
    assert summaries and summaries[-1]["steps"] == 3 and summaries[-1]["workers"] == 2
