"""What the planner knows about hardware and models: device kinds, clusters, model shapes.

Device figures are vendor peak numbers (dense bf16, no sparsity) for GPUs, and for this
machine's CPU rough defaults that `relay profile` replaces with measured ones. Model
shapes are Llama-architecture configurations (the LLaMA-2 / CodeLlama sizes of the
ReaLHF paper, and Relay's own size presets).

Units are in the names: *_flops_s (FLOP/s), *_bytes_s (bytes/s), *_bytes, *_s.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

GB = 1e9
GIB = 1 << 30


@dataclass(frozen=True)
class DeviceKind:
    """One accelerator (or one CPU device slot) and the links around it.

    flops_s and mem_bytes_s are peaks; mfu and mbu are the shares of them that large
    matmuls and weight streaming reach in practice. intra_node_bytes_s is one device's
    link bandwidth to the others of its node (NVLink), inter_node_bytes_s its share of
    the node's network bandwidth, host_bytes_s its link to host memory (offload).
    """

    name: str
    flops_s: float
    memory_bytes: float
    mem_bytes_s: float
    intra_node_bytes_s: float
    inter_node_bytes_s: float
    host_bytes_s: float
    mfu: float = 0.5
    mbu: float = 0.7
    param_bytes: int = 2  # bytes of one weight as the engines keep it (bf16 on GPU)
    collective_latency_s: float = 10e-6  # one collective call (a ring all-reduce step)
    layer_overhead_s: float = 15e-6  # per layer per decode step: kernel launches
    # one tensor-parallel collective of a layer as the runtime pays it (None: a plain
    # collective, collective_latency_s)
    tp_collective_s: float | None = None
    # per decode step of generation, beyond the layers: the sampler's loop (transformers'
    # generate on CPU; GPU engines overlap it with the kernels)
    decode_step_overhead_s: float = 0.0
    # a data-parallel gradient all-reduce within a node as measured (bytes reduced per
    # second, every rank of the node at once; None: the ring model on intra_node_bytes_s)
    allreduce_bytes_s: float | None = None
    source: str = "catalogue"

    @property
    def compute_flops_s(self) -> float:
        return self.flops_s * self.mfu

    @property
    def stream_bytes_s(self) -> float:
        return self.mem_bytes_s * self.mbu


DEVICE_KINDS: dict[str, DeviceKind] = {
    # planner_cases.yaml: vendor peaks. Inter-node: 8 x 400 Gb/s NICs per node, 50 GB/s
    # per GPU. Host link: PCIe Gen5 x16 (H100/H200), Gen4 (A100).
    "h100-sxm": DeviceKind(
        "h100-sxm", 989e12, 80 * GIB, 3.35e12, 450 * GB, 50 * GB, 55 * GB
    ),  # NVLink 900 GB/s bidirectional = 450 GB/s each way
    "h200-sxm": DeviceKind("h200-sxm", 989e12, 141 * GIB, 4.8e12, 450 * GB, 50 * GB, 55 * GB),
    "a100-sxm-80g": DeviceKind(
        "a100-sxm-80g", 312e12, 80 * GIB, 2.04e12, 300 * GB, 25 * GB, 25 * GB
    ),
    # One CPU device slot (one torch thread, fp32), as `relay profile` measured it on the
    # 2-core development machine (2026-11-27): a decoder layer's forward + backward at
    # 75 GFLOP/s, its decode step at 8.4 GB/s, gloo between two processes 3.5 GB/s and
    # 60 us one way; a tensor-parallel collective of a sharded model (DTensor over gloo,
    # dispatch included) 5.7 ms, transformers' generate loop 1.6 ms per token, a 4-rank
    # gloo all-reduce of 9.6 MB at 0.58 GB/s (17 ms; the ring model says 4 ms). `relay
    # profile` measures your machine (profiles/cpu.json is then used instead). Memory: a
    # slot's share of 24 GiB.
    "cpu": DeviceKind(
        "cpu",
        flops_s=75e9,
        memory_bytes=6 * GIB,
        mem_bytes_s=8.4e9,
        intra_node_bytes_s=3.5e9,
        inter_node_bytes_s=1.2e9,
        host_bytes_s=22e9,
        mfu=1.0,
        mbu=1.0,
        param_bytes=4,
        collective_latency_s=60e-6,
        layer_overhead_s=20e-6,
        tp_collective_s=5.7e-3,
        decode_step_overhead_s=1.6e-3,
        allreduce_bytes_s=0.58e9,
    ),
}


def device_kind(name: str, profile: str | Path | None = None) -> DeviceKind:
    """The catalogue entry `name`, with measured figures from a `relay profile` file when
    `profile` names one, or else when profiles/<name>.json exists."""
    if name not in DEVICE_KINDS:
        raise KeyError(f"unknown device kind '{name}'; known: {sorted(DEVICE_KINDS)}")
    kind = DEVICE_KINDS[name]
    path = Path(profile) if profile else Path("profiles") / f"{name}.json"
    if profile or path.exists():
        kind = apply_profile(kind, json.loads(path.read_text()), str(path))
    return kind


def apply_profile(kind: DeviceKind, prof: dict[str, Any], source: str) -> DeviceKind:
    """Replace catalogue figures with measured ones: the measured figures are achieved
    rates, so mfu and mbu become 1."""
    return replace(
        kind,
        flops_s=float(prof["flops_s"]),
        mem_bytes_s=float(prof["bytes_s"]),
        intra_node_bytes_s=float(prof["link_bytes_s"]),
        collective_latency_s=float(prof["link_latency_s"]),
        tp_collective_s=float(prof["tp_collective_s"])
        if "tp_collective_s" in prof
        else kind.tp_collective_s,  # fmt: skip
        decode_step_overhead_s=float(
            prof.get("decode_step_overhead_s", kind.decode_step_overhead_s)
        ),
        allreduce_bytes_s=float(prof["allreduce_bytes_s"])
        if "allreduce_bytes_s" in prof
        else kind.allreduce_bytes_s,  # fmt: skip
        mfu=1.0,
        mbu=1.0,
        source=f"profile {source} ({prof.get('measured_at', '?')})",
    )


@dataclass(frozen=True)
class Cluster:
    """nodes x devices_per_node devices of one kind; device d sits on node d // per node."""

    num_nodes: int
    devices_per_node: int
    kind: DeviceKind

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.devices_per_node

    def node(self, device: int) -> int:
        return device // self.devices_per_node

    def describe(self) -> str:
        return (
            f"{self.num_nodes} node(s) x {self.devices_per_node} {self.kind.name} "
            f"({self.kind.source})"
        )


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture decoder: untied embedding and LM head, gated MLP, RMSNorm.

    value_head: the LM head is replaced by a scalar head (critic and reward models).
    extra: further tensors (name, shape) every rank holds whole, beside the decoder's (a
    PMOE policy's expert deltas, router and Q head).
    """

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    value_head: bool = False
    extra: tuple[tuple[str, tuple[int, ...]], ...] = ()
    qkv_bias: bool = False  # q, k and v projections with biases (Qwen2)
    o_bias: bool = False  # the output projection with a bias (Llama's attention_bias)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        kv = self.kv_heads * self.head_dim
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * kv  # q, o; k, v
        bias = (self.hidden + 2 * kv) * self.qkv_bias + self.hidden * self.o_bias
        return attn + bias + 3 * self.hidden * self.intermediate + 2 * self.hidden  # mlp, norms

    @property
    def head_out(self) -> int:
        return 1 if self.value_head else self.vocab

    @property
    def params(self) -> int:
        return (
            self.layers * self.layer_params
            + self.vocab * self.hidden  # embedding
            + self.head_out * self.hidden  # LM or value head
            + self.hidden  # final norm
            + sum(math.prod(dims) for _, dims in self.extra)
        )

    def kv_bytes_per_token(self, param_bytes: int) -> int:
        """Key and value cache of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * param_bytes

    def as_critic(self) -> ModelShape:
        return replace(self, value_head=True, name=self.name)


MODEL_SHAPES: dict[str, ModelShape] = {
    "llama2-7b": ModelShape("llama2-7b", 4096, 32, 32, 32, 11008, 32000),
    "llama2-13b": ModelShape("llama2-13b", 5120, 40, 40, 40, 13824, 32000),
    "codellama-34b": ModelShape("codellama-34b", 8192, 48, 64, 8, 22016, 32016),
    "llama2-70b": ModelShape("llama2-70b", 8192, 80, 64, 8, 28672, 32000),
}


def shape_from_hf_config(name: str, cfg: dict[str, Any]) -> ModelShape:
    """A shape from a Hugging Face Llama or Qwen2 config dict (config.json or a size
    preset). Qwen2 has biases on q, k and v; Llama's attention_bias adds them to o too."""
    qwen2 = cfg.get("model_type") == "qwen2"
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelShape(
        name,
        hidden=int(cfg["hidden_size"]),
        layers=int(cfg["num_hidden_layers"]),
        heads=int(cfg["num_attention_heads"]),
        kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        intermediate=int(cfg["intermediate_size"]),
        vocab=int(cfg.get("vocab_size", 32)),
        qkv_bias=qwen2 or attention_bias,
        o_bias=attention_bias and not qwen2,
    )
