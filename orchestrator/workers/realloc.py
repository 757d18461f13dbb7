"""Executing a parameter reallocation: the planner's comm plan (planner.realloc) run with
torch.distributed point-to-point messages: gloo on CPU (each message its own isend /
irecv), NCCL on GPUs (all of a device's messages in one batch_isend_irecv, which NCCL needs
to pair them without deadlock).

Every process of the group is one device (global device number = process rank unless a
mapping is given). It holds, for the source layout, the slices of the model's tensors
that the planner's sharding rules give its device (`shard_state`), and it ends with the
slices the destination layout gives it. Each CommOp is a copy of tensor[lo:hi] along one
dimension: a local copy when source and destination are the same device; otherwise the
pieces one device sends another travel as one message, packed back to back in the plan's
order, which both sides walk alike. Nothing is reduced or cast: the weights arrive bit
for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from planner.catalogue import ModelShape
from planner.layout import Layout, Mesh
from planner.realloc import CommOp, TensorSpec, held_range, model_tensors, plan_ops

Sharding = tuple[Mesh, Layout]


def _narrow(tensor: torch.Tensor, t: TensorSpec, lo: int, hi: int) -> torch.Tensor:
    dim = t.split_dim if t.split_dim is not None else 0
    return tensor.narrow(dim, lo, hi - lo)


def shard_state(
    full: Mapping[str, torch.Tensor], shape: ModelShape, sharding: Sharding, device: int
) -> dict[str, torch.Tensor]:
    """The (cloned, contiguous) slices of the full state dict `device` holds under
    `sharding`; empty if the device is not in the mesh."""
    mesh, layout = sharding
    out: dict[str, torch.Tensor] = {}
    for t in model_tensors(shape):
        held = held_range(t, shape.layers, mesh, layout, device)
        if held is not None:
            out[t.name] = _narrow(full[t.name], t, *held).clone().contiguous()
    return out


@dataclass
class ReallocStats:
    ops: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    local_bytes: int = 0


class _Done:
    """A finished request (NCCL's batch was waited for already)."""

    def wait(self) -> None:
        return None


_DONE = _Done()


def _pair_tag(src: int, dst: int) -> int:
    return src * 65536 + dst


def reallocate(
    shards: Mapping[str, torch.Tensor],
    shape: ModelShape,
    src: Sharding,
    dst: Sharding,
    device: int,
    *,
    devices_per_node: int,
    dtype: torch.dtype = torch.float32,
    rank_of: Mapping[int, int] | None = None,
    group: dist.ProcessGroup | None = None,
    ops: list[CommOp] | None = None,
    stats: ReallocStats | None = None,
    target: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Run the comm plan from `src` to `dst` on this process (device `device`, holding
    `shards` of `src`); returns the slices it holds of `dst`. Every process of the group
    that appears in either mesh must call it with the same arguments but its own shards
    and device. `rank_of` maps device numbers to process ranks (identity if None);
    `target` is where received slices go (default: where `shards` are, else the CPU; a
    process that sends nothing over NCCL must name its GPU)."""
    tensors = {t.name: t for t in model_tensors(shape)}
    odd = sorted(k for k, v in shards.items() if v.dtype != dtype)
    if odd:
        raise ValueError(f"shards {odd[:3]} are not {dtype}: every rank must agree on the dtype")
    if ops is None:
        ops = plan_ops(shape, src, dst, devices_per_node)
    ranks = rank_of or {}
    dmesh, dlay = dst
    smesh, slay = src
    # what this device holds of each tensor, before and after: [lo, hi) or None
    src_held = {n: held_range(t, shape.layers, smesh, slay, device) for n, t in tensors.items()}
    dst_held = {n: held_range(t, shape.layers, dmesh, dlay, device) for n, t in tensors.items()}
    out: dict[str, torch.Tensor] = {}
    like = next(iter(shards.values()), None)
    if target is None:
        target = like.device if like is not None else torch.device("cpu")
    for name, held in dst_held.items():
        if held is not None:
            t = tensors[name]
            dims = list(t.shape)
            dims[t.split_dim if t.split_dim is not None else 0] = held[1] - held[0]
            out[name] = torch.empty(dims, dtype=dtype, device=target)
    st = stats if stats is not None else ReallocStats()
    # One message per (source, destination) pair: the pieces packed back to back, in
    # plan order, so each side knows the layout of the buffer without telling the other.
    sends: dict[int, list[torch.Tensor]] = {}
    recvs: dict[int, list[torch.Tensor]] = {}
    for op in ops:
        if device not in (op.src, op.dst):
            continue
        t = tensors[op.tensor]
        st.ops += 1
        if op.src == device:
            slo = src_held[op.tensor][0]  # type: ignore[index]  # the plan sends held pieces
            piece = _narrow(shards[op.tensor], t, op.lo - slo, op.hi - slo)
        if op.dst == device:
            dlo = dst_held[op.tensor][0]  # type: ignore[index]
            into = _narrow(out[op.tensor], t, op.lo - dlo, op.hi - dlo)
        if op.src == device and op.dst == device:
            into.copy_(piece)
            st.local_bytes += piece.numel() * piece.element_size()
        elif op.src == device:
            sends.setdefault(op.dst, []).append(piece)
        else:
            recvs.setdefault(op.src, []).append(into)
    recv_bufs: list[tuple[int, torch.Tensor, list[torch.Tensor]]] = []
    send_bufs: list[tuple[int, torch.Tensor]] = []
    for peer, pieces in sorted(recvs.items()):
        buf = torch.empty(sum(p.numel() for p in pieces), dtype=dtype, device=target)
        recv_bufs.append((peer, buf, pieces))
        st.received_bytes += buf.numel() * buf.element_size()
    for peer, pieces in sorted(sends.items()):
        buf = torch.cat([p.reshape(-1) for p in pieces]) if len(pieces) > 1 else pieces[0]
        buf = buf.contiguous().reshape(-1)
        send_bufs.append((peer, buf))
        st.sent_bytes += buf.numel() * buf.element_size()
    pending: list[tuple[dist.Work, torch.Tensor, list[torch.Tensor] | None]] = []
    if recv_bufs or send_bufs:
        if dist.get_backend(group) == "nccl":
            ops = [dist.P2POp(dist.irecv, buf, ranks.get(peer, peer), group)
                   for peer, buf, _ in recv_bufs]  # fmt: skip
            ops += [dist.P2POp(dist.isend, buf, ranks.get(peer, peer), group)
                    for peer, buf in send_bufs]  # fmt: skip
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            pending = [(_DONE, buf, pieces) for _, buf, pieces in recv_bufs]
        else:
            for peer, buf, pieces in recv_bufs:
                tag = _pair_tag(peer, device)
                work = dist.irecv(buf, ranks.get(peer, peer), group=group, tag=tag)
                pending.append((work, buf, pieces))
            for peer, buf in send_bufs:
                tag = _pair_tag(device, peer)
                pending.append((dist.isend(buf, ranks.get(peer, peer), group=group, tag=tag),
                                buf, None))  # fmt: skip
    for work, buf, pieces in pending:
        work.wait()
        offset = 0
        for into in pieces or []:
            n = into.numel()
            into.copy_(buf[offset : offset + n].view(into.shape))
            offset += n
    return out
