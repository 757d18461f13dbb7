"""Device meshes and parallel layouts.

A mesh is a contiguous block of devices: 1, 2, 4, ... devices inside one node, aligned to
its size, or a power-of-two number of whole nodes, aligned likewise. A layout splits a
mesh into dp x tp x pp ranks, tensor-parallel innermost (tp ranks are neighbouring
devices, so they share a node), then pipeline stages, then data-parallel replicas:

    device(dp_i, pp_i, tp_i) = mesh.start + (dp_i * pp + pp_i) * tp + tp_i
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from planner.catalogue import Cluster


@dataclass(frozen=True, order=True)
class Mesh:
    start: int
    size: int

    @property
    def devices(self) -> range:
        return range(self.start, self.start + self.size)

    def overlaps(self, other: Mesh) -> bool:
        return self.start < other.start + other.size and other.start < self.start + self.size

    def __str__(self) -> str:
        if self.size == 1:
            return f"d{self.start}"
        return f"d{self.start}-{self.start + self.size - 1}"

    @staticmethod
    def parse(text: str) -> Mesh:
        """'d3' or 'd0-7' (what str() writes)."""
        body = text.strip().lstrip("d")
        lo, _, hi = body.partition("-")
        start = int(lo)
        end = int(hi.lstrip("d")) if hi else start
        if end < start:
            raise ValueError(f"mesh '{text}': the last device comes before the first")
        return Mesh(start, end - start + 1)


@dataclass(frozen=True, order=True)
class Layout:
    dp: int
    tp: int
    pp: int
    micro_batches: int = 1

    @property
    def size(self) -> int:
        return self.dp * self.tp * self.pp

    def device(self, mesh: Mesh, dp_i: int, pp_i: int, tp_i: int) -> int:
        return mesh.start + (dp_i * self.pp + pp_i) * self.tp + tp_i

    def ranks(self, mesh: Mesh) -> Iterator[tuple[int, int, int, int]]:
        """(device, dp_i, pp_i, tp_i) for every rank."""
        for dp_i in range(self.dp):
            for pp_i in range(self.pp):
                for tp_i in range(self.tp):
                    yield self.device(mesh, dp_i, pp_i, tp_i), dp_i, pp_i, tp_i

    def __str__(self) -> str:
        return f"dp{self.dp} tp{self.tp} pp{self.pp} mb{self.micro_batches}"


def powers_of_two(limit: int) -> list[int]:
    out, p = [], 1
    while p <= limit:
        out.append(p)
        p *= 2
    return out


def is_valid_mesh(mesh: Mesh, cluster: Cluster) -> str | None:
    """None if `mesh` is one the planner uses on `cluster`, else the rule it breaks."""
    n = cluster.devices_per_node
    if mesh.start < 0 or mesh.size < 1 or mesh.start + mesh.size > cluster.num_devices:
        return f"devices d0-{cluster.num_devices - 1} exist"
    if mesh.size <= n:
        if mesh.size & (mesh.size - 1) and mesh.size != n:
            return "a mesh inside a node has 1, 2, 4, ... devices or the whole node"
        if mesh.start % mesh.size:
            return "a mesh inside a node starts at a multiple of its size"
        if cluster.node(mesh.start) != cluster.node(mesh.start + mesh.size - 1):
            return "a mesh smaller than a node stays inside one node"
        return None
    nodes, rem = divmod(mesh.size, n)
    if rem or mesh.start % n:
        return "a mesh larger than a node is a block of whole nodes"
    if nodes & (nodes - 1) and nodes != cluster.num_nodes:
        return "a multi-node mesh has 1, 2, 4, ... nodes or all of them"
    if (mesh.start // n) % nodes:
        return "a multi-node mesh starts at a multiple of its node count"
    return None


def meshes(cluster: Cluster) -> list[Mesh]:
    """Every mesh of the cluster, smallest first."""
    n, out = cluster.devices_per_node, []
    sizes = sorted(
        {s for s in powers_of_two(n)}
        | {n}
        | {n * k for k in powers_of_two(cluster.num_nodes)}
        | {cluster.num_devices}
    )
    for size in sizes:
        for start in range(0, cluster.num_devices - size + 1):
            m = Mesh(start, size)
            if is_valid_mesh(m, cluster) is None:
                out.append(m)
    return out


def whole_cluster(cluster: Cluster) -> Mesh:
    return Mesh(0, cluster.num_devices)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(
    size: int, devices_per_node: int, heads: int, kv_heads: int, layers: int
) -> Iterator[tuple[int, int, int]]:
    """(dp, tp, pp) with dp x tp x pp = size that the model's shape allows: tp divides the
    attention and key/value heads and stays inside a node, pp divides the layers."""
    for tp in divisors(size):
        if tp > devices_per_node or heads % tp or kv_heads % tp:
            continue
        for pp in divisors(size // tp):
            if layers % pp:
                continue
            yield size // (tp * pp), tp, pp
