"""The plan's devices as Ray actors, seen from the controller.

`DeviceCluster` places one DeviceWorker per device with one placement group per node of
the plan, each a STRICT_PACK group of that node's device slots, so device d of a plan lands
on the plan's node d // devices_per_node and meshes map to Ray nodes as the plan says.
(A placement group per mesh would not do: the meshes of a plan overlap.) The workers then
join one torch.distributed world (rank = device) and create every group the plan's
shardings use.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from orchestrator.workers.device_worker import DeviceWorker
from orchestrator.workers.failures import gather
from orchestrator.workers.groups import Sharding, plan_groups
from planner.layout import Mesh

# what one device takes of a Ray node, by device kind
DEVICE_RESOURCE = {"cpu": "relay_device", "cuda": "GPU"}


def clear_stale_engine_memory() -> list[str]:
    """Remove vLLM's CPU shared-memory segments (/dev/shm/*cpushm*) that no process maps:
    a killed worker leaves its segments behind, and the next engine of the same ranks
    fails to create them ("create shm in SHMManager failed. errno: 17")."""
    stale = set(glob.glob("/dev/shm/*cpushm*"))
    if not stale:
        return []
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                stale -= {line.split(None, 5)[-1].strip() for line in f if "cpushm" in line}
        except OSError:  # a process that ended meanwhile, or one we may not read
            continue
    removed = []
    for path in sorted(stale):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


class DeviceCluster:
    """One DeviceWorker per device slot, joined into one torch.distributed world with the
    groups of `shardings` (their tp and dp groups) created up front."""

    def __init__(
        self,
        num_nodes: int,
        devices_per_node: int,
        shardings: list[Sharding],
        device: str = "cpu",
        threads: int = 1,
        timeout_s: float = 120.0,
        roles_on: Any = None,  # device -> the roles it hosts, to name them in failures
    ) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if device not in DEVICE_RESOURCE:
            raise ValueError(f"cluster.device = {device!r}: use one of {sorted(DEVICE_RESOURCE)}")
        resource = DEVICE_RESOURCE[device]
        self.devices_per_node = devices_per_node
        n = num_nodes * devices_per_node
        self.groups = [
            placement_group([{resource: 1}] * devices_per_node, strategy="STRICT_PACK")
            for _ in range(num_nodes)
        ]
        ready = [g.ready() for g in self.groups]
        done, _ = ray.wait(ready, num_returns=len(ready), timeout=timeout_s)
        if len(done) < len(ready):
            for g in self.groups:
                ray.util.remove_placement_group(g)
            raise RuntimeError(
                f"the Ray cluster could not place {num_nodes} node(s) of {devices_per_node} "
                f"'{resource}' slots each within {timeout_s:.0f} s; ray.cluster_resources() "
                f"= {ray.cluster_resources()}"
            )
        clear_stale_engine_memory()
        actor = ray.remote(DeviceWorker)
        per_device: dict[str, Any] = (
            {"num_gpus": 1} if device == "cuda" else {"resources": {resource: 1}}
        )
        self.workers = [
            actor.options(
                num_cpus=0,
                max_concurrency=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.groups[d // devices_per_node],
                    placement_group_bundle_index=d % devices_per_node,
                ),
                runtime_env={
                    "env_vars": {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
                },
                **per_device,
            ).remote(d, n, threads, device)  # fmt: skip
            for d in range(n)
        ]
        self.roles_on: Any = roles_on or (lambda device: [])
        try:
            (master,) = gather([(self.workers[0].address.remote(), 0)], self.roles_on,
                               "its start")  # fmt: skip
            groups = plan_groups(n, shardings)
            joins = [(w.join.remote(master, groups), d) for d, w in enumerate(self.workers)]
            # each worker's process id and host, for the run folder's workers.json
            self.processes: list[dict[str, Any]] = gather(
                joins, self.roles_on, "joining the devices' torch.distributed world"
            )
        except BaseException:
            self.shutdown(grace_s=0.0)
            raise

    def node_ids(self) -> list[str]:
        import ray

        return ray.get([w.node_id.remote() for w in self.workers])

    def on(self, mesh: Mesh) -> list[Any]:
        return [self.workers[d] for d in mesh.devices]

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Close the workers (their engines release shared memory), kill what is left,
        free the placement groups."""
        import ray

        closing = [w.close.remote() for w in self.workers]
        ray.wait(closing, num_returns=len(closing), timeout=grace_s)
        for w in self.workers:
            ray.kill(w)
        for g in self.groups:
            ray.util.remove_placement_group(g)
