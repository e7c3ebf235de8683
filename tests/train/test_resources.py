"""Resource plan before ``fit()``: workers + Ray Data fit the cluster (fewer CPUs per worker) or fail fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.data import ActorPoolStrategy
from ray.data._internal.compute import TaskPoolStrategy

from lsvcr_dist.config import load_config
from lsvcr_dist.train.resources import (
    MIN_CPUS_PER_WORKER,
    ClusterResourceError,
    data_cpus,
    plan_worker_resources,
    worker_resources,
)


class _Op:
    def __init__(self, compute=None, args=None, *inputs):
        self.compute, self.ray_remote_args, self.input_dependencies = compute, args, list(inputs)


class _Plan:
    def __init__(self, dag):
        self.dag = dag


class _Ds:
    """The two attributes ``data_cpus`` reads of a lazy ``ray.data.Dataset``."""

    def __init__(self, dag):
        self._logical_plan = _Plan(dag)


def _align_like(actor_cpus=0.5, actors=1):
    """ListFiles -> ReadFiles (task, SPREAD) -> MapBatches(flatten) (task) -> MapBatches(transform) (actor pool)."""
    listing = _Op()
    read = _Op(TaskPoolStrategy(), {"scheduling_strategy": "SPREAD"}, listing)
    flatten = _Op(TaskPoolStrategy(), {}, read)
    return _Ds(_Op(ActorPoolStrategy(size=actors), {"num_cpus": actor_cpus}, flatten))


def test_data_cpus_counts_actor_pools_plus_one_task():
    # the alignment pipeline: one 1-CPU task at a time + one 0.5-CPU transform actor held for the whole run
    assert data_cpus([_align_like()]) == pytest.approx(1.5)
    # two actors of 0.25 + a task asking 2 CPUs
    two = _Ds(_Op(ActorPoolStrategy(size=2), {"num_cpus": 0.25}, _Op(TaskPoolStrategy(), {"num_cpus": 2}, _Op())))
    assert data_cpus([two]) == pytest.approx(2.5)
    # one dataset per epoch draw streams at a time: the busiest counts, not the sum
    assert data_cpus([_align_like(), two, _align_like(1.0)]) == pytest.approx(2.5)


def test_readme_head_on_two_cpus_fits_with_a_quarter_cpu_per_worker():
    # `ray start --head` on a 2-core machine: 2 workers x 0.5 + Ray Data 1.5 = 2.5 > 2 -> (2 - 1.5) / 2 each
    plan = plan_worker_resources([{"CPU": 2.0, "memory": 1e9}], 2, {"CPU": 0.5}, 1.5)
    assert plan == {"CPU": 0.25}
    # room for the request: unchanged
    assert plan_worker_resources([{"CPU": 4.0}], 2, {"CPU": 0.5}, 1.5) == {"CPU": 0.5}
    # CPUs of every alive node count (a 0-CPU head plus a worker node)
    assert plan_worker_resources([{"CPU": 0.0}, {"CPU": 3.0}], 2, {"CPU": 1.0}, 1.5) == {"CPU": 0.75}


def test_too_few_cpus_fail_fast_naming_what_and_the_flag():
    with pytest.raises(ClusterResourceError) as e:
        plan_worker_resources([{"CPU": 1.0}], 2, {"CPU": 0.5}, 1.5)
    msg = str(e.value)
    # needed = 2 x MIN_CPUS_PER_WORKER + 1.5 = 2.0 -> the flag that provides it
    assert MIN_CPUS_PER_WORKER == 0.25 and "need at least 2," in msg and "--num-cpus=2" in msg and "1 logical CPUs" in msg
    with pytest.raises(ClusterResourceError, match="--num-cpus=3"):
        plan_worker_resources([{"CPU": 2.0}], 3, {"CPU": 0.5}, 1.5)  # 3 x 0.25 + 1.5 = 2.25 > 2


def test_gpu_and_custom_resources_are_counted_per_node():
    gpu_nodes = [{"CPU": 0.0}, {"CPU": 96.0, "GPU": 8.0}, {"CPU": 96.0, "GPU": 8.0}]
    assert plan_worker_resources(gpu_nodes, 16, {"CPU": 4.0, "GPU": 1.0}, 1.5) == {"CPU": 4.0, "GPU": 1.0}
    with pytest.raises(ClusterResourceError, match=r"GPU=1 each \(17 in all\).*room for 16.*--num-gpus"):
        plan_worker_resources(gpu_nodes, 17, {"CPU": 4.0, "GPU": 1.0}, 1.5)
    # a slot that does not divide across nodes: 1.5 + 1.5 slots hold 2 workers of 1 slot, not 3
    slots = [{"CPU": 2.0, "train_slot": 1.5}, {"CPU": 2.0, "train_slot": 1.5}]
    assert plan_worker_resources(slots, 2, {"CPU": 0.5, "train_slot": 1.0}, 1.5)["train_slot"] == 1.0
    with pytest.raises(ClusterResourceError, match="train_slot.*room for 2"):
        plan_worker_resources(slots, 3, {"CPU": 0.5, "train_slot": 1.0}, 1.5)


def test_worker_resources_without_ray_or_when_off_returns_the_request():
    cfg = load_config(Path(__file__).resolve().parents[2] / "jobs/configs/tiny.yaml", "align", ["scaling.worker_resource=train_slot",
                                                          "scaling.check_resources=false"])
    assert worker_resources(cfg.scaling, [_align_like()]) == {"CPU": 0.5, "train_slot": 1.0}
