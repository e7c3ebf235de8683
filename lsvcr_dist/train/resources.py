"""Fit a Ray Train worker group and its Ray Data pipeline into the cluster before ``fit()``, or fail fast.

Training workers and Ray Data draw on the same logical CPUs. Ray Train holds ``num_workers x
resources_per_worker`` for the whole run, and Ray Data only plans with what is left (``DataConfig`` excludes
the trainer's resources). If what is left is below what the pipeline needs to move at all, ``fit()`` waits forever
("Cluster resources are not enough to run any task from TaskPoolMapOperator[...]. The job may hang forever").
``plan_worker_resources`` compares the cluster's totals with the workers plus that minimum and either returns
per-worker resources that fit (fewer logical CPUs per worker, never below ``MIN_CPUS_PER_WORKER``) or raises
``ClusterResourceError`` naming what is needed and the flag that provides it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

MIN_CPUS_PER_WORKER = 0.25
"""Lowest logical CPU share a worker is shrunk to: below it one core would be promised to more than four workers."""


class ClusterResourceError(RuntimeError):
    """The cluster can never run the trainer and its data pipeline together (``fit()`` would wait forever)."""


def data_cpus(datasets: Iterable) -> float:
    """Logical CPUs Ray Data needs to make progress on the busiest of ``datasets`` (lazy ``ray.data.Dataset``).

    Per dataset: every actor pool holds ``min_size x num_cpus`` for the whole execution, while tasks come and go, so
    one task of the largest CPU request is enough to move the task stages (Ray's default is 1 CPU per task).
    Datasets are not summed: the training loop streams one at a time (one per epoch, ``ingest.epoch_draws``).
    """
    need = 0.0
    for ds in datasets:
        actors, task = 0.0, 0.0
        for op in _operators(ds._logical_plan.dag):
            compute, args = getattr(op, "compute", None), getattr(op, "ray_remote_args", None)
            if compute is None and args is None:
                continue  # planning-only operators (file listing) run no Ray task of their own
            cpus = float((args or {}).get("num_cpus", 1.0))
            if type(compute).__name__ == "ActorPoolStrategy":
                actors += compute.min_size * cpus
            else:
                task = max(task, cpus)
        need = max(need, actors + task)
    return need


def _operators(op):
    yield op
    for child in op.input_dependencies:
        yield from _operators(child)


def plan_worker_resources(nodes: list[Mapping[str, float]], num_workers: int, per_worker: Mapping[str, float],
                          data_cpu: float) -> dict[str, float]:
    """Per-worker resources that let ``num_workers`` workers and Ray Data run together on ``nodes``.

    Args:
        nodes: total resources of each alive node (``ray.nodes()[i]["Resources"]``).
        num_workers: training workers.
        per_worker: requested resources of one worker, e.g. ``{"CPU": 0.5}`` or ``{"CPU": 8, "GPU": 1}``.
        data_cpu: logical CPUs Ray Data needs besides the workers (``data_cpus``).

    Returns:
        ``per_worker`` unchanged when it fits; else the same with ``CPU`` lowered to ``(total - data_cpu) /
        num_workers`` (Ray's CPUs are logical: the workers then share cores with the data pipeline).

    Raises:
        ClusterResourceError: a non-CPU resource (GPU, custom) has fewer worker slots than ``num_workers``, or the
            CPUs cannot give every worker ``MIN_CPUS_PER_WORKER`` after Ray Data's share.
    """
    plan = {k: float(v) for k, v in per_worker.items() if v}
    for name, need in plan.items():
        if name == "CPU":
            continue
        slots = sum(math.floor(n.get(name, 0.0) / need + 1e-9) for n in nodes)
        if slots < num_workers:
            flag = "--num-gpus" if name == "GPU" else f"--resources='{{\"{name}\": N}}'"
            raise ClusterResourceError(
                f"scaling.num_workers={num_workers} workers need {name}={need:g} each ({num_workers * need:g} in "
                f"all) but the cluster's nodes hold room for {slots}: add nodes or start them with `ray start "
                f"{flag}` (KubeRay: more workerGroupSpecs replicas), or lower scaling.num_workers")
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    want = plan.get("CPU", 0.0)
    if num_workers * want + data_cpu <= total_cpu + 1e-9:
        return plan
    fit = (total_cpu - data_cpu) / num_workers
    if fit + 1e-9 >= MIN_CPUS_PER_WORKER:
        return {**plan, "CPU": math.floor(fit * 1000) / 1000}
    needed = num_workers * MIN_CPUS_PER_WORKER + data_cpu
    raise ClusterResourceError(
        f"the cluster has {total_cpu:g} logical CPUs, but {num_workers} training workers (scaling.cpus_per_worker="
        f"{want:g}, at least {MIN_CPUS_PER_WORKER:g} each) plus Ray Data's {data_cpu:g} (read tasks and transform "
        f"actors) need at least {needed:g}, so fit() would wait forever. Start the head with `ray start --head "
        f"--num-cpus={math.ceil(needed)}` (or more), add a node, or lower scaling.num_workers")


def worker_resources(scaling, datasets: Iterable) -> dict[str, float]:
    """``resources_per_worker`` for a trainer of ``scaling`` (``config_blocks.ScalingConfig``) streaming ``datasets``.

    Reads the connected cluster's alive nodes; without a connected Ray (nothing to compare with) or with
    ``scaling.check_resources`` off (an autoscaling cluster adds nodes after submission) it returns the request.
    Prints one line when it lowers the CPUs per worker.
    """
    import ray

    want = {"CPU": scaling.cpus_per_worker, **({"GPU": 1.0} if scaling.use_gpu else {}),
            **({scaling.worker_resource: 1.0} if scaling.worker_resource else {})}
    if not ray.is_initialized() or not scaling.check_resources:
        return want
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = data_cpus(datasets)
    plan = plan_worker_resources(nodes, scaling.num_workers, want, need)
    if plan != want:
        print(f"[resources] {scaling.num_workers} workers x {want['CPU']:g} CPU + Ray Data {need:g} CPU exceed the "
              f"cluster's {sum(n.get('CPU', 0.0) for n in nodes):g} CPUs: {plan['CPU']:g} logical CPU per worker",
              flush=True)
    return plan
