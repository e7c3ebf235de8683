"""The README's cluster commands, as written, with Ray's token authentication on, on a 2-CPU head.

`export RAY_AUTH_MODE=token`, `ray get-auth-token --generate`, `ray start --head --node-ip-address=127.0.0.1
--dashboard-host=127.0.0.1`, then `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python
jobs/align.py --config jobs/configs/tiny.yaml` (plus a short run's overrides, free ports and a private temp dir).
The submitter's home is a private folder, so the token is this test's own (never ~/.ray/auth_token). The head has
2 logical CPUs, as a 2-core machine's default: the job must fit its workers next to Ray Data instead of waiting
forever. Everything started here is stopped by its process id. One test on purpose: a head and a job cost
about a minute on 2 idle cores.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _cli import free_ports  # jobs/ (conftest puts it on sys.path)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


README_COMMANDS = [
    "export RAY_AUTH_MODE=token",
    "ray get-auth-token --generate > /dev/null",
    "ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1",
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/align.py --config "
    "jobs/configs/tiny.yaml",
]


def _readme_commands() -> list[str]:
    """The indented command block after the README's "submitted as Ray jobs" sentence."""
    text = (ROOT / "README.md").read_text().split("submitted as Ray jobs", 1)[1]
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("    "))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("    "):
            break
        block.append(ln.strip())
    return block



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


def _start_head(start: list[str], env: dict, log: Path, tries: int = 3) -> tuple[subprocess.Popen, int, str]:
    """The README's `ray start --head ...` plus free ports, 2 CPUs and a private temp dir, until its dashboard answers
    (a try that misses Ray's fixed 30 s raylet start-up window on a loaded machine is repeated on new ports)."""
    for attempt in range(1, tries + 1):
        # Every port explicit: other Ray instances on this machine hold the fixed defaults (e.g. agent port 52365).
        gcs, dash, client, agent_http, agent_grpc, metrics, rt_agent, node_mgr, obj_mgr = free_ports(9)
        # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep for --temp-dir.
        ray_tmp = tempfile.mkdtemp(prefix="lsvcr-js-", dir="/tmp")
        head = subprocess.Popen(
            [str(BIN / "ray"), *start[1:], "--block", f"--port={gcs}",
             f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_agent}",
             f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
             "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={ray_tmp}"],
            env=env, start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        try:
            _wait_http(f"http://127.0.0.1:{dash}/api/version", 480, head, log, ray_tmp)
            return head, dash, ray_tmp
        except RuntimeError:
            _stop_head(head, ray_tmp)
            if attempt == tries or "timed out during startup" not in log.read_text():
                raise


def _stop_head(head: subprocess.Popen, ray_tmp: str) -> None:
    if head.poll() is None:
        os.kill(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # whatever is left of the session we started, by its id
    except ProcessLookupError:
        pass
    head.wait(timeout=30)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _submit(submit_cmd: list[str], address: str, env: dict, sub_id: str, overrides: list[str]):
    """The README's `ray job submit ...` against ``address``, with a submission id, not waiting, plus overrides."""
    cut = submit_cmd.index("--")
    opts = [address if a == "http://127.0.0.1:8265" else a for a in submit_cmd[1:cut]]
    for _ in range(20):  # the job agent starts after the dashboard: "No available agent" until then
        submit = subprocess.run([str(BIN / "ray"), *opts, "--submission-id", sub_id, "--no-wait", *submit_cmd[cut:],
                                 *overrides], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if submit.returncode == 0 or "No available agent" not in submit.stderr + submit.stdout:
            break
        time.sleep(15)
    assert submit.returncode == 0, submit.stdout + submit.stderr


@pytest.mark.ray
@pytest.mark.timeout(1800)
def test_ray_job_submit_align_token_auth_two_cpus(tiny_encoded, tmp_path):
    data, _, _ = tiny_encoded
    run_dir = tmp_path / "run"
    (run_dir / "embeddings").mkdir(parents=True)
    (run_dir / "data").symlink_to(Path(data) / "data")
    (run_dir / "embeddings" / "base").symlink_to(Path(data) / "embeddings" / "base")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "HOME": str(home), "RAY_AUTH_MODE": "token",  # README: export RAY_AUTH_MODE=token
           # SIGTERM stops the head at once: the default 30 s drain is for Ray Serve replicas, and none run here
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    readme = _readme_commands()
    assert readme == README_COMMANDS  # the commands this test runs are the README's
    gen = subprocess.run(["bash", "-c", readme[1]], env=env, capture_output=True, text=True, timeout=300)
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert gen.returncode == 0 and len(token) >= 32, gen.stderr
    head, dash, ray_tmp = _start_head(shlex.split(readme[2]), env, tmp_path / "head.log")
    address = f"http://127.0.0.1:{dash}"
    try:
        # token authentication is on: no token -> 401, a wrong one -> 403
        assert _status(f"{address}/api/jobs/") == 401
        assert _status(f"{address}/api/jobs/", "Bearer " + "0" * len(token)) == 403
        # a submitter without RAY_AUTH_MODE=token sends no token and is refused, naming the cause
        plain = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=plain,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0 and "no authentication token was found" in refused.stdout + refused.stderr
        sub_id = f"lsvcr-align-{os.getpid()}"
        # a small window and 1 MiB blocks: the first step waits for 16 rows per worker, not the whole tiny split
        _submit(shlex.split(readme[3]), address, env, sub_id, [f"run_dir={run_dir}", "max_steps=3", "global_batch=8",
                                                               "deepspeed.micro_batch=4", "checkpoint.every_steps=3",
                                                               "ingest.shuffle_window=16", "ingest.block_mb=1"])
        # Poll through the job SDK (the CLI's status wording differs between Ray versions), token in the header.
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
        status, end = None, time.time() + 900
        while time.time() < end:
            status = client.get_job_status(sub_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(5)
        logs = client.get_job_logs(sub_id)
        assert status == JobStatus.SUCCEEDED, f"{status}: {logs[-4000:]}"
    finally:
        _stop_head(head, ray_tmp)
    # Ray Train's actors resolve this cluster from RAY_ADDRESS, not by scanning the machine's GCS processes
    assert "Found multiple active Ray instances" not in logs
    # 2 workers x 0.5 CPU + Ray Data's 1.5 exceed the head's 2 CPUs: the workers got 0.25 each instead of a hang
    assert "[resources] 2 workers x 0.5 CPU + Ray Data 1.5 CPU exceed the cluster's 2 CPUs: 0.25" in logs
    lines = [json.loads(x) for x in (run_dir / "align" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [d["step"] for d in lines] == [1, 2, 3]
    assert all(d["pool_size"] == 8 and d["world_size"] == 2 for d in lines)
    assert (run_dir / "align" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    summaries = [json.loads(x) for x in logs.splitlines() if x.startswith('{"run_dir"')]
    assert summaries and summaries[-1]["steps"] == 3 and summaries[-1]["workers"] == 2


def _status(url: str, auth: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
