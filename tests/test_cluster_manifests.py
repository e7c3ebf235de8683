"""Every cluster manifest parses, and every entrypoint / preset / path it names exists in the repository."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from lsvcr_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
MANIFESTS = sorted(CLUSTER.rglob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _commands(path: Path) -> list[str]:
    """Every `python jobs/...` command in a manifest: RayJob entrypoints and commented submit lines."""
    text = path.read_text()
    cmds = [d["spec"]["entrypoint"] for d in _docs(path) if d.get("kind") == "RayJob"]
    cmds += [m.group(0) for m in re.finditer(r"python jobs/\S+\.py[^\n\\]*", text)]
    return cmds


def test_every_manifest_parses_and_is_known():
    assert {p.relative_to(CLUSTER).as_posix() for p in MANIFESTS} == {
        "ray-cluster-gpu.yaml", "runtime_env.yaml", "kuberay/storage.yaml", "kuberay/raycluster.yaml",
        "kuberay/rayjob-align.yaml", "kuberay/rayjob-finetune.yaml"}
    kinds = {}
    for p in MANIFESTS:
        docs = _docs(p)
        assert docs, f"{p} is empty"
        for d in docs:
            kinds.setdefault(d.get("kind", p.name), []).append(p.name)
    assert sorted(kinds["RayJob"]) == ["rayjob-align.yaml", "rayjob-finetune.yaml"]
    assert kinds["RayCluster"] == ["raycluster.yaml"] and kinds["PersistentVolumeClaim"] == ["storage.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_named_entrypoints_and_configs_exist(path):
    for cmd in _commands(path):
        argv = shlex.split(cmd)
        assert argv[0] == "python" and (ROOT / argv[1]).is_file(), f"{path.name}: {argv[1]} does not exist"
        assert "--config" in argv, f"{path.name}: {cmd!r} names no --config"
        preset = ROOT / argv[argv.index("--config") + 1]
        assert preset.is_file(), f"{path.name}: preset {preset} does not exist"
        stage = {"align.py": "align", "finetune.py": "finetune"}.get(Path(argv[1]).name)
        if stage:  # the preset plus the manifest's overrides must load (unknown keys would raise)
            overrides = [a for a in argv[argv.index("--config") + 2:] if "=" in a]
            cfg = load_config(preset, stage, overrides)
            assert cfg.run_dir.startswith("/mnt/shared/"), f"{path.name}: run_dir must be on the shared volume"


def test_rayjobs_mount_the_shared_claim_everywhere():
    claim = _docs(CLUSTER / "kuberay/storage.yaml")[0]["metadata"]["name"]
    for name in ("rayjob-align.yaml", "rayjob-finetune.yaml", "raycluster.yaml"):
        d = _docs(CLUSTER / "kuberay" / name)[0]
        spec = d["spec"]["rayClusterSpec"] if d["kind"] == "RayJob" else d["spec"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for g in groups:
            pod = g["template"]["spec"]
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
            assert claims == {claim}, f"{name}: a group does not mount {claim}"
            mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
            assert "/mnt/shared" in mounts
        gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert gpu and int(gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_upload_excludes_outputs_and_venv():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    rayignore = (ROOT / ".rayignore").read_text().split()
    for must in (".venv/", "runs/", "data/"):
        assert must in env["excludes"] and must in rayignore
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_readme_covers_the_operations():
    text = (CLUSTER / "README.md").read_text()
    for topic in ("## Submit", "## Token authentication", "## Resources", "## Local jobs", "## Elastic",
                  "## Scale", "## Choose the ZeRO stage", "## Resume", "## Throughput", "benchmarks/RESULTS.md"):
        assert topic in text


SECRET = "lsvcr-ray-auth"


def test_token_auth_reaches_every_ray_container_and_submitter():
    """Every head/worker container and each RayJob's submitter pod runs in token mode with the Secret's token."""
    for name in ("raycluster.yaml", "rayjob-align.yaml", "rayjob-finetune.yaml"):
        path = CLUSTER / "kuberay" / name
        d = _docs(path)[0]
        spec = d["spec"]["rayClusterSpec"] if d["kind"] == "RayJob" else d["spec"]
        pods = [g["template"]["spec"] for g in (spec["headGroupSpec"], *spec["workerGroupSpecs"])]
        if d["kind"] == "RayJob":  # KubeRay's submitter pod runs `ray job submit` against the head
            pods.append(d["spec"]["submitterPodTemplate"]["spec"])
        for pod in pods:
            for c in pod["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}: {c['name']} not in token mode"
                ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
                assert ref == {"name": SECRET, "key": "auth_token"}, f"{name}: {c['name']} has no token from {SECRET}"
        assert f"kubectl create secret generic {SECRET}" in path.read_text(), f"{name}: how to create the Secret"
    launcher = _docs(CLUSTER / "ray-cluster-gpu.yaml")[0]
    starts = [c for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert launcher["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    readme = (CLUSTER / "README.md").read_text()
    for must in (f"kubectl create secret generic {SECRET}", "submitterPodTemplate", "export RAY_AUTH_MODE=token",
                 "RAY_AUTH_TOKEN", "Authorization: Bearer"):
        assert must in readme, must
