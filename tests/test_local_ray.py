"""A local job (no ``RAY_ADDRESS``) always starts and uses its own loopback cluster (``jobs/_cli.py: init_ray``).

Two tiny fine-tune jobs (one epoch of the comment task: Ray Data + Ray Train, the cheapest job that has both) start
at the same moment on one machine, in a Ray temp folder holding a stale ``ray_current_cluster`` (what a stopped
``ray start`` head leaves): before, every local job then failed with "When connecting to an existing cluster,
object_store_memory must not be provided", and two jobs at once made Ray Train's actors look for "the" cluster among
all GCS processes ("Found multiple active Ray instances"). Every job starts Ray through the same ``init_ray``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_two_local_jobs_at_once_despite_a_stale_cluster_file(tiny_encoded, tmp_path):
    data, _, _ = tiny_encoded  # data + the base store (init=scratch fine-tunes on it)
    ray_tmp = tmp_path / "raytmp"  # RAY_TMPDIR: Ray's default temp folder becomes ray_tmp/ray
    (ray_tmp / "ray").mkdir(parents=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")  # head long gone
    # RAY_DEDUP_LOGS=0: the log holds every line a worker printed, so a line printed twice shows as two
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "LSVCR_OBJECT_STORE_BYTES": "200000000", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_TRAIN_ENABLE_PRINT_PATCH", None)  # an in-process Ray test may have set it: the job sets its own
    procs, runs = [], []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        (run / "data").symlink_to(Path(data) / "data")
        (run / "embeddings").mkdir()
        (run / "embeddings" / "base").symlink_to(Path(data) / "embeddings" / "base")
        runs.append(run)
        cmd = [sys.executable, "jobs/finetune.py", "--config", "jobs/configs/tiny.yaml", f"run_dir={run}",
               "init=scratch", "tasks=[comment]", "max_epochs=1", "scaling.num_workers=1"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, text=True,
                                      stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT))
    try:
        end = time.time() + 1000
        while time.time() < end and any(p.poll() is None for p in procs):
            time.sleep(3)
    finally:
        for p in procs:  # a job still running past the limit: its own session, stopped by its process group id
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=60)
    logs = [(tmp_path / f"{n}.log").read_text() for n in ("a", "b")]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
        assert "Found multiple active Ray instances" not in log, log[-4000:]
        done = [x for x in log.splitlines() if "finetune comment epoch 1: step" in x and "done in" in x]
        assert len(done) == 1, done  # one line per print (Ray Train's print patch doubled it: print_lines_once)
    curves = []
    for run, log in zip(runs, logs):
        out = run / "finetune" / "comment"
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert [d["epoch"] for d in lines] == [0, 1] and lines[1]["steps"] > 0
        curves.append((lines[1]["loss"], lines[0]["val"]["ndcg@10"], lines[1]["val"]["ndcg@10"]))
        assert (out / "best" / "COMPLETE").is_file()
        summary = json.loads([x for x in log.splitlines() if x.startswith('{"run_dir"')][-1])
        assert summary["run_dir"] == str(run) and set(summary["finetune"]) == {"comment"}
    # same data, seed and world: the two runs, each on its own cluster, trained and validated the same
    assert curves[0] == pytest.approx(curves[1], abs=1e-6)
