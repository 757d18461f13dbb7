"""Parameter reallocation: which device sends which slice of which tensor to whom, so that
a role's replica under one layout receives the weights of its replica under another.

How a layout holds a Llama model's tensors (the runtime shards the same way):
- pipeline stage s of pp holds layers [s L/pp, (s+1) L/pp); the embedding sits on the
  first stage, the final norm and the head on the last;
- tensor parallelism splits q/k/v, gate and up projections and the embedding and LM head
  along their output rows (dim 0), o and down projections along their input columns
  (dim 1), into tp contiguous ranges of ceil(n / tp) rows (the last ones shorter, as
  torch.chunk and DTensor's Shard split); norms and a scalar value head are replicated;
- data-parallel replicas hold identical copies.

Each destination rank takes every piece it lacks from one source rank: the one on its
own device if there is one (a local copy, no traffic), else one on its node, choosing
among the equal candidates by the destination's device number so that the load spreads
over the source replicas. The choice depends on nothing else, so decoder layers whose
stages map alike move alike; `traffic` uses that to cost a 70B model in milliseconds,
and a test checks it against the full plan.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from planner.catalogue import Cluster, ModelShape
from planner.layout import Layout, Mesh


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    split_dim: int | None  # None: replicated over tensor-parallel ranks
    layer: int | None  # None: embedding (first stage) or final norm / head (last)
    first_stage: bool = False


@dataclass(frozen=True)
class CommOp:
    """Copy tensor[lo:hi] along `dim` (the whole tensor when dim is None) from `src` to
    `dst` (global device numbers); src == dst is a local copy."""

    tensor: str
    dim: int | None
    lo: int
    hi: int
    src: int
    dst: int
    nbytes: int


def layer_tensors(shape: ModelShape, layer: int) -> list[TensorSpec]:
    h, hd = shape.hidden, shape.head_dim
    q, kv, i = shape.heads * hd, shape.kv_heads * hd, shape.intermediate
    p = f"model.layers.{layer}."
    biases = []
    if shape.qkv_bias:  # split with their projections' rows
        biases += [TensorSpec(p + f"self_attn.{n}_proj.bias", (d,), 0, layer)
                   for n, d in (("q", q), ("k", kv), ("v", kv))]  # fmt: skip
    if shape.o_bias:  # added once after the row-parallel sum: replicated
        biases.append(TensorSpec(p + "self_attn.o_proj.bias", (h,), None, layer))
    return biases + [
        TensorSpec(p + "self_attn.q_proj.weight", (q, h), 0, layer),
        TensorSpec(p + "self_attn.k_proj.weight", (kv, h), 0, layer),
        TensorSpec(p + "self_attn.v_proj.weight", (kv, h), 0, layer),
        TensorSpec(p + "self_attn.o_proj.weight", (h, q), 1, layer),
        TensorSpec(p + "mlp.gate_proj.weight", (i, h), 0, layer),
        TensorSpec(p + "mlp.up_proj.weight", (i, h), 0, layer),
        TensorSpec(p + "mlp.down_proj.weight", (h, i), 1, layer),
        TensorSpec(p + "input_layernorm.weight", (h,), None, layer),
        TensorSpec(p + "post_attention_layernorm.weight", (h,), None, layer),
    ]


def edge_tensors(shape: ModelShape) -> list[TensorSpec]:
    h = shape.hidden
    head_split = None if shape.value_head else 0
    head = "score.weight" if shape.value_head else "lm_head.weight"
    out = [
        TensorSpec("model.embed_tokens.weight", (shape.vocab, h), 0, None, first_stage=True),
        TensorSpec("model.norm.weight", (h,), None, None),
        TensorSpec(head, (shape.head_out, h), head_split, None),
    ]
    if shape.value_head:  # the scalar head's bias
        out.append(TensorSpec("score.bias", (1,), None, None))
    out += [TensorSpec(name, dims, None, None) for name, dims in shape.extra]
    return out


def model_tensors(shape: ModelShape) -> list[TensorSpec]:
    out = [t for layer in range(shape.layers) for t in layer_tensors(shape, layer)]
    return out + edge_tensors(shape)


def stage_of(t: TensorSpec, layers: int, pp: int) -> int:
    if t.layer is None:
        return 0 if t.first_stage else pp - 1
    return t.layer * pp // layers


def _range(t: TensorSpec, tp: int, tp_i: int) -> tuple[int, int]:
    if t.split_dim is None:
        return 0, t.shape[0] if t.shape else 1
    n = t.shape[t.split_dim]
    step = -(-n // tp)  # torch.chunk's split, as DTensor shards: ceil(n / tp) rows per rank
    return min(tp_i * step, n), min((tp_i + 1) * step, n)


def held_range(
    t: TensorSpec, layers: int, mesh: Mesh, layout: Layout, device: int
) -> tuple[int, int] | None:
    """[lo, hi) along `t.split_dim` (the whole first dim if replicated) that `device`
    holds of `t` under (mesh, layout); None if it holds none of it."""
    for dev, _, pp_i, tp_i in layout.ranks(mesh):
        if dev == device:
            if pp_i != stage_of(t, layers, layout.pp):
                return None
            return _range(t, layout.tp, tp_i)
    return None


def _row_bytes(t: TensorSpec, param_bytes: int) -> int:
    """Bytes of one index along the split dim (or of the whole tensor if replicated)."""
    total = param_bytes
    for n in t.shape:
        total *= n
    if t.split_dim is None:
        return total
    return total // t.shape[t.split_dim]


def tensor_ops(
    t: TensorSpec,
    layers: int,
    src: tuple[Mesh, Layout],
    dst: tuple[Mesh, Layout],
    devices_per_node: int,
    param_bytes: int,
) -> Iterator[CommOp]:
    """The copies that give every destination rank its piece of tensor `t`."""
    (smesh, slay), (dmesh, dlay) = src, dst
    s_stage = stage_of(t, layers, slay.pp)
    d_stage = stage_of(t, layers, dlay.pp)
    holders: dict[int, list[int]] = defaultdict(list)  # source tp index -> devices
    for dev, _, pp_i, tp_i in slay.ranks(smesh):
        if pp_i == s_stage:
            holders[0 if t.split_dim is None else tp_i].append(dev)
    row = _row_bytes(t, param_bytes)
    for dev, _, pp_i, tp_i in dlay.ranks(dmesh):
        if pp_i != d_stage:
            continue
        lo, hi = _range(t, dlay.tp, tp_i)
        pieces = [0] if t.split_dim is None else range(slay.tp)
        for j in pieces:
            slo, shi = (lo, hi) if t.split_dim is None else _range(t, slay.tp, j)
            a, b = max(lo, slo), min(hi, shi)
            if a >= b:
                continue
            cands = holders[j]
            if dev in cands:
                src_dev = dev
            else:
                near = [c for c in cands if c // devices_per_node == dev // devices_per_node]
                pool = near or cands
                src_dev = pool[dev % len(pool)]
            size = row if t.split_dim is None else (b - a) * row
            yield CommOp(t.name, t.split_dim, a, b, src_dev, dev, size)


def plan_ops(
    shape: ModelShape,
    src: tuple[Mesh, Layout],
    dst: tuple[Mesh, Layout],
    devices_per_node: int,
    param_bytes: int = 4,
) -> list[CommOp]:
    """Every copy of a reallocation from layout `src` to layout `dst`, tensor by tensor
    (the order every process of the runtime walks them in)."""
    return [
        op
        for t in model_tensors(shape)
        for op in tensor_ops(t, shape.layers, src, dst, devices_per_node, param_bytes)
    ]


def comm_plan(
    shape: ModelShape,
    src: tuple[Mesh, Layout],
    dst: tuple[Mesh, Layout],
    cluster: Cluster,
) -> list[CommOp]:
    """`plan_ops` on `cluster`'s nodes and parameter width."""
    return plan_ops(shape, src, dst, cluster.devices_per_node, cluster.kind.param_bytes)


@dataclass(frozen=True)
class Traffic:
    """Bytes each device sends and receives in a reallocation, within and across nodes."""

    send_intra: dict[int, int]
    recv_intra: dict[int, int]
    send_inter: dict[int, int]
    recv_inter: dict[int, int]
    local_bytes: int
    peers: dict[int, int]  # device -> number of distinct devices it exchanges with

    @property
    def moved_bytes(self) -> int:
        return sum(self.send_intra.values()) + sum(self.send_inter.values())


def _add(traffic: dict[str, defaultdict], op: CommOp, per_node: int, times: int) -> None:
    if op.src == op.dst:
        traffic["local"][0] += op.nbytes * times
        return
    inter = op.src // per_node != op.dst // per_node
    traffic["send_inter" if inter else "send_intra"][op.src] += op.nbytes * times
    traffic["recv_inter" if inter else "recv_intra"][op.dst] += op.nbytes * times
    traffic["pairs"][(op.src, op.dst)] += 1


def _layer_classes(
    shape: ModelShape, layers: list[int], src_tp: int, dst_tp: int, param_bytes: int
) -> list[tuple[TensorSpec, int, int]]:
    """A decoder layer's tensors as two stand-ins that move alike: the split tensors as one
    unit tensor of lcm(tp) rows (each row standing for `scale` bytes) and the replicated
    ones as one tensor; (tensor, scale, times). Falls back to the real tensors when a
    split dimension is not a multiple of both tp degrees."""
    tensors = layer_tensors(shape, layers[0])
    unit = math.lcm(src_tp, dst_tp)
    split = [t for t in tensors if t.split_dim is not None]
    if any(t.shape[t.split_dim] % unit for t in split):  # type: ignore[index]
        return [(t, param_bytes, len(layers)) for t in tensors]
    split_bytes = sum(math.prod(t.shape) for t in split) * param_bytes
    rep_bytes = sum(math.prod(t.shape) for t in tensors if t.split_dim is None) * param_bytes
    layer = layers[0]
    return [
        (TensorSpec("split", (unit,), 0, layer), split_bytes // unit, len(layers)),
        (TensorSpec("replicated", (1,), None, layer), rep_bytes, len(layers)),
    ]


@lru_cache(maxsize=65536)
def traffic(
    shape: ModelShape,
    src: tuple[Mesh, Layout],
    dst: tuple[Mesh, Layout],
    cluster: Cluster,
) -> Traffic:
    """The per-device totals of `comm_plan(shape, src, dst, cluster)`, computed from one
    representative layer per (source stage, destination stage) pair."""
    per_node, pb = cluster.devices_per_node, cluster.kind.param_bytes
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for layer in range(shape.layers):
        key = (layer * src[1].pp // shape.layers, layer * dst[1].pp // shape.layers)
        groups[key].append(layer)
    acc: dict[str, defaultdict] = {
        k: defaultdict(int)
        for k in ("send_intra", "recv_intra", "send_inter", "recv_inter", "local", "pairs")
    }
    for ls in groups.values():
        for t, scale, times in _layer_classes(shape, ls, src[1].tp, dst[1].tp, pb):
            for op in tensor_ops(t, shape.layers, src, dst, per_node, 1):
                _add(acc, op, per_node, times * scale)
    for t in edge_tensors(shape):
        for op in tensor_ops(t, shape.layers, src, dst, per_node, pb):
            _add(acc, op, per_node, 1)
    peers: dict[int, set[int]] = defaultdict(set)
    for s, d in acc["pairs"]:
        peers[s].add(d)
        peers[d].add(s)
    return Traffic(
        dict(acc["send_intra"]),
        dict(acc["recv_intra"]),
        dict(acc["send_inter"]),
        dict(acc["recv_inter"]),
        acc["local"][0],
        {d: len(p) for d, p in peers.items()},
    )


def realloc_s(tr: Traffic, cluster: Cluster) -> float:
    """Time of a reallocation: the busiest device's link, each device sending and
    receiving at once on its intra-node and its inter-node link, plus a latency per peer."""
    k = cluster.kind
    worst = 0.0
    for d in set(tr.send_intra) | set(tr.recv_intra) | set(tr.send_inter) | set(tr.recv_inter):
        intra = max(tr.send_intra.get(d, 0), tr.recv_intra.get(d, 0)) / k.intra_node_bytes_s
        inter = max(tr.send_inter.get(d, 0), tr.recv_inter.get(d, 0)) / k.inter_node_bytes_s
        worst = max(worst, max(intra, inter) + tr.peers.get(d, 0) * k.collective_latency_s)
    return worst
