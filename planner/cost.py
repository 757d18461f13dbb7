"""Time and memory of one MFC under a mesh and a layout, from FLOPs and bytes.

The model is a roofline per pipeline stage and micro-batch: a pass over a stage takes
max(FLOPs / achieved FLOP/s, weight and KV bytes / achieved bandwidth), plus the
tensor-parallel all-reduces (two per layer and pass), the pipeline's point-to-point
sends, and on decode a fixed launch overhead per layer and step (and the sampler's own
per-step cost, measured on CPU). Pipelines pay their
bubble: m micro-batches over pp stages take (m + pp - 1) stage passes; a decode step
takes max(m, pp) of them (a token needs every stage before its successor can start).
Training adds the backward pass (2x the forward FLOPs), the data-parallel gradient
reduction (ZeRO-3 adds the parameter gathers) and the optimizer's sweep over its states.

Memory per device follows the ZeRO stage for a trainable role's states (weights,
gradients, Adam states: fp32 master + two moments with bf16 weights, two moments with
fp32 weights), activations after Korthikanti et al. 2022 (no recomputation), the KV
cache of generation and the fp32 logits of a micro-batch.

Shapes: tokens are counted per data-parallel rank and micro-batch unless said otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from algos.graph import CallKind
from planner.catalogue import Cluster, ModelShape
from planner.layout import Layout, Mesh
from planner.workload import CallWork


def stage_params(shape: ModelShape, pp: int) -> float:
    """Parameters of the largest pipeline stage (the embedding sits on the first stage,
    the final norm and the head on the last)."""
    layers = shape.layers / pp * shape.layer_params
    embed = shape.vocab * shape.hidden
    head = shape.head_out * shape.hidden + shape.hidden
    return layers + (embed + head if pp == 1 else max(embed, head))


def weight_bytes(shape: ModelShape, layout: Layout, param_bytes: int) -> float:
    """One replica's weights on one device."""
    return stage_params(shape, layout.pp) / layout.tp * param_bytes


def train_state_bytes(
    shape: ModelShape, layout: Layout, param_bytes: int, zero_stage: int
) -> float:
    """A trainable role's weights, gradients and optimizer states on one device of its
    train mesh, partitioned over the data-parallel ranks as the ZeRO stage says."""
    p = stage_params(shape, layout.pp) / layout.tp
    optim = 12 if param_bytes == 2 else 8  # fp32 master + m + v | m + v
    dp = layout.dp
    w = p * param_bytes / (dp if zero_stage >= 3 else 1)
    g = p * param_bytes / (dp if zero_stage >= 2 else 1)
    o = p * optim / (dp if zero_stage >= 1 else 1)
    return w + g + o


def _allreduce_s(nbytes: float, n: int, bw: float, latency: float) -> float:
    """All-reduce of nbytes over n ranks: a ring's bandwidth term, and a tree's latency
    (log2 n steps; NCCL's small-message all-reduce)."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bw + math.ceil(math.log2(n)) * latency


@dataclass(frozen=True)
class Placement:
    """A call's mesh and layout on a cluster, with the links its groups use."""

    mesh: Mesh
    layout: Layout
    cluster: Cluster

    @property
    def dp_bw(self) -> float:
        k = self.cluster.kind
        spans = self.mesh.size > self.cluster.devices_per_node and self.layout.dp > 1
        return k.inter_node_bytes_s if spans else k.intra_node_bytes_s

    @property
    def pp_bw(self) -> float:
        k = self.cluster.kind
        spans = self.layout.tp * self.layout.pp > self.cluster.devices_per_node
        return k.inter_node_bytes_s if spans else k.intra_node_bytes_s


def _layer_flops(shape: ModelShape, tokens: float, context: float) -> float:
    """Forward FLOPs of one decoder layer: matmuls plus attention scores and mixing."""
    matmul = shape.layer_params - 2 * shape.hidden
    return 2 * tokens * matmul + 4 * tokens * context * shape.hidden


def _stage_pass_s(
    shape: ModelShape,
    p: Placement,
    tokens: float,
    context: float,
    kv_bytes: float = 0.0,
    passes: float = 1.0,
    decode: bool = False,
) -> float:
    """One micro-batch of `tokens` through the slowest stage; passes=3 is forward plus
    backward. kv_bytes: KV cache the stage reads (decode)."""
    k, lay = p.cluster.kind, p.layout
    layers = shape.layers / lay.pp
    comm_passes = 2 if passes == 3 else 1  # forward; forward + backward
    head = 2 * tokens * shape.hidden * shape.head_out
    flops = (layers * _layer_flops(shape, tokens, context) + head) / lay.tp * passes
    nbytes = weight_bytes(shape, lay, k.param_bytes) * comm_passes + kv_bytes
    t = max(flops / k.compute_flops_s, nbytes / k.stream_bytes_s)
    act = tokens * shape.hidden * k.param_bytes
    tp_latency = k.collective_latency_s if k.tp_collective_s is None else k.tp_collective_s
    allreduce = _allreduce_s(act, lay.tp, k.intra_node_bytes_s, tp_latency)
    t += 2 * layers * comm_passes * allreduce  # after attention and after the MLP
    if lay.pp > 1:
        t += comm_passes * (act / p.pp_bw + k.collective_latency_s)
    if decode:
        t += layers * k.layer_overhead_s
    return t


def forward_s(shape: ModelShape, p: Placement, seqs: float, seq_tokens: float) -> float:
    """A forward pass over `seqs` sequences of `seq_tokens` tokens (all dp ranks)."""
    lay = p.layout
    tokens = seqs / lay.dp * seq_tokens / lay.micro_batches
    return (lay.micro_batches + lay.pp - 1) * _stage_pass_s(shape, p, tokens, seq_tokens / 2)


def train_step_s(
    shape: ModelShape, p: Placement, seqs: float, seq_tokens: float, zero_stage: int
) -> float:
    """One optimizer step over `seqs` sequences: forward + backward, gradient
    reduction and the optimizer's update."""
    k, lay = p.cluster.kind, p.layout
    tokens = seqs / lay.dp * seq_tokens / lay.micro_batches
    compute = (lay.micro_batches + lay.pp - 1) * _stage_pass_s(
        shape, p, tokens, seq_tokens / 2, passes=3
    )
    grads = stage_params(shape, lay.pp) / lay.tp * k.param_bytes
    volume = grads * (1.5 if zero_stage >= 3 else 1.0)
    reduce = _allreduce_s(volume, lay.dp, p.dp_bw, k.collective_latency_s)
    if k.allreduce_bytes_s is not None and lay.dp > 1 and p.dp_bw == k.intra_node_bytes_s:
        reduce = volume / k.allreduce_bytes_s  # measured, the node's ranks all at once
    # Adam reads and writes weights and both moments and reads the gradient: about 28
    # bytes a parameter (bf16 weights with an fp32 master copy, or fp32 weights).
    update = stage_params(shape, lay.pp) / lay.tp / (lay.dp if zero_stage else 1) * 28
    return compute + reduce + update / k.stream_bytes_s


def generate_s(
    shape: ModelShape, p: Placement, seqs: float, prompt_tokens: float, gen_tokens: float
) -> float:
    """Prefill of the prompts, then gen_tokens decode steps over the whole batch."""
    k, lay = p.cluster.kind, p.layout
    prefill = forward_s(shape, p, seqs, prompt_tokens)
    batch = seqs / lay.dp / lay.micro_batches
    context = prompt_tokens + gen_tokens / 2
    kv = batch * context * shape.kv_bytes_per_token(k.param_bytes) / (lay.tp * lay.pp)
    step = _stage_pass_s(shape, p, batch, context, kv_bytes=kv, decode=True)
    step += k.decode_step_overhead_s  # the sampler's loop: once per step, whatever the model
    return prefill + gen_tokens * max(lay.micro_batches, lay.pp) * step


def call_time_s(work: CallWork, shape: ModelShape, p: Placement, zero_stage: int) -> float:
    """Time of one MFC per iteration."""
    if work.kind is CallKind.GENERATE:
        return generate_s(shape, p, work.batch_seqs, work.prompt_tokens, work.gen_tokens)
    if work.kind is CallKind.INFERENCE:
        return forward_s(shape, p, work.batch_seqs, work.seq_tokens)
    per_step = work.batch_seqs * work.passes / max(work.optimizer_steps, 1)
    step = train_step_s(shape, p, per_step, work.seq_tokens, zero_stage)
    return max(work.optimizer_steps, 1) * step


def activation_bytes(work: CallWork, shape: ModelShape, p: Placement) -> float:
    """Transient memory of a call on one device: activations (train: every layer of the
    stage, for min(m, pp) micro-batches in flight; inference: one layer), the KV cache of
    generation, and the fp32 logits (and their gradient when training)."""
    k, lay = p.cluster.kind, p.layout
    b = k.param_bytes
    if work.kind is CallKind.TRAIN:
        seqs = work.batch_seqs * work.passes / max(work.optimizer_steps, 1) / lay.dp
    else:
        seqs = work.batch_seqs / lay.dp
    seqs_mb = seqs / lay.micro_batches
    s = work.seq_tokens
    tokens = seqs_mb * s
    logits = tokens * shape.head_out / lay.tp * 4
    if work.kind is CallKind.TRAIN:
        h, a, t = shape.hidden, shape.heads, lay.tp
        per_layer = tokens * h * (10 + 24 / t + 5 * a * s / (h * t)) * b / 2
        in_flight = min(lay.micro_batches, lay.pp)
        return per_layer * shape.layers / lay.pp * in_flight + 2 * logits
    if work.kind is CallKind.GENERATE:
        kv = seqs * s * shape.kv_bytes_per_token(b) / (lay.tp * lay.pp)
        step_logits = seqs_mb * shape.head_out / lay.tp * 4
        prefill = seqs_mb * work.prompt_tokens * shape.hidden * b * 4
        return kv + max(step_logits, prefill)
    return tokens * shape.hidden * b * 4 + logits
