"""`relay profile`: measure this machine's per-layer costs for the execution planner.

Writes one JSON file (default profiles/cpu.json) that `planner.catalogue.device_kind`
reads in place of the catalogue's rough CPU figures. Everything runs in fp32 with
`--threads` torch threads, the compute one CPU device slot gets. The figures the planner
reads are:

  flops_s         effective FLOP/s of one Llama decoder layer's forward+backward at the
                  largest token count. FLOPs = 3 x forward FLOPs, forward FLOPs =
                  2 x layer matmul params x tokens + 4 x tokens x seq_len x hidden
                  (QK^T and AV of attention), divided by forward_backward_s.
  bytes_s         effective bandwidth of one decode step of that layer: (layer weights in
                  fp32 + KV cache bytes read) / decode_step_s.
  link_bytes_s    one-way gloo send/recv bandwidth between two processes of this machine.
  link_latency_s  one-way gloo send/recv time of a one-element tensor.
  allreduce_bytes_s  bytes per second of a gloo all-reduce over 4 processes at once (a
                  node's device slots reducing gradients together).
  decode_step_overhead_s  seconds per token of transformers' generate at batch 1 on a
                  2-layer model: the sampler loop's fixed cost per decode step.
  tp_collective_s one tensor-parallel collective as a sharded model pays it (DTensor over
                  gloo, dispatch included), from a 2-layer model's forward+backward at
                  tp=2 against tp=1 (measure_tp_collective).

matmul_flops_s (square fp32 matmul) and copy_bytes_s (tensor copy, bytes read + written)
are the machine's raw rates, kept for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch

from orchestrator.models.hf import MODEL_PRESETS

SEQ_LEN = 128  # token counts are measured as batches of sequences of this length
MIB = 1 << 20
# option name -> LlamaConfig (and orchestrator.models.hf.MODEL_PRESETS) name
HF_NAMES = dict(
    hidden="hidden_size",
    intermediate="intermediate_size",
    heads="num_attention_heads",
    kv_heads="num_key_value_heads",
)


@dataclass(frozen=True)
class Settings:
    """Defaults of the options (layer shape from a model preset) and the buffer sizes."""

    preset: str = "small"
    threads: int = 1
    tokens: str = "256,1024"
    decode_batch: int = 32
    kv_len: int = 128
    repeats: int = 5
    matmul_n: int = 1024
    copy_bytes: int = 64 * MIB
    link_bytes: int = 16 * MIB

    def defaults(self) -> dict[str, Any]:
        shape = {k: MODEL_PRESETS[self.preset][hf] for k, hf in HF_NAMES.items()}
        return {**asdict(self), **shape}


QUICK = Settings("tiny", 1, "64,128", 4, 32, 2, 256, 4 * MIB, 1 * MIB)
INT_OPTIONS = "threads hidden intermediate heads kv_heads decode_batch kv_len repeats".split()


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_matmul_flops_s(n: int, repeats: int) -> float:
    """FLOP/s of an n x n x n fp32 matmul: 2 n^3 / median time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _median_s(lambda: a @ b, repeats)


def measure_copy_bytes_s(nbytes: int, repeats: int) -> float:
    """Memory bandwidth of copying an nbytes fp32 tensor, counting bytes read + written."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_s(lambda: dst.copy_(src), repeats)


def _ping_pong(rank: int, buf: torch.Tensor) -> None:
    """One round trip: rank 0 sends buf, rank 1 sends it back."""
    import torch.distributed as dist

    peer = 1 - rank
    for op in (dist.send, dist.recv) if rank == 0 else (dist.recv, dist.send):
        op(buf, peer)


def _link_worker(rank: int, port: int, threads: int, runs: list[tuple[int, int]], out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", f"tcp://127.0.0.1:{port}", timedelta(seconds=60), world_size=2, rank=rank
    )
    one_way_s = [_median_s(partial(_ping_pong, rank, torch.zeros(n)), r) / 2 for n, r in runs]
    dist.destroy_process_group()
    if rank == 0:
        out.put(one_way_s)


def measure_link(nbytes: int, threads: int, repeats: int) -> tuple[float, float]:
    """(bytes_s, latency_s) of one-way gloo send/recv between two spawned processes on
    127.0.0.1: bandwidth from an nbytes tensor, latency from a one-element tensor; each
    is half the median round-trip time of a ping-pong. Latency takes 50 round trips (they
    are cheap, and the scheduler's noise is large against them)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    runs = [(nbytes // 4, max(repeats, 5)), (1, 50)]  # (fp32 elements, round trips)
    mp.spawn(_link_worker, args=(port, threads, runs, queue), nprocs=2)
    big_s, tiny_s = queue.get()
    return nbytes / big_s, tiny_s


def _allreduce_worker(rank: int, port: int, world: int, threads: int, n: int, repeats: int,
                      out) -> None:  # fmt: skip
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", f"tcp://127.0.0.1:{port}", timedelta(seconds=60), world_size=world, rank=rank
    )
    x = torch.zeros(n)
    seconds = _median_s(lambda: dist.all_reduce(x), repeats)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        out.put(seconds)


def measure_allreduce(nbytes: int, world: int, threads: int, repeats: int) -> float:
    """Bytes per second of a gloo all-reduce of an nbytes tensor over `world` processes
    at once (a node's device slots reducing gradients together): nbytes / median time."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_allreduce_worker, args=(port, world, threads, nbytes // 4, max(repeats, 5), queue),
             nprocs=world)  # fmt: skip
    return nbytes / queue.get()


def _tp_worker(rank: int, port: int, threads: int, shape: dict[str, int], seqs: int,
               tokens: int, repeats: int, out) -> None:  # fmt: skip
    """tp=1 (rank 0 alone) and tp=2 forward+backward of a 2-layer model of `shape`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.models.tensor_parallel import parallelize

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", f"tcp://127.0.0.1:{port}", timedelta(seconds=60), world_size=2, rank=rank
    )
    config = LlamaConfig(**{HF_NAMES[k]: v for k, v in shape.items()}, num_hidden_layers=2,
                         vocab_size=32, tie_word_embeddings=False)  # fmt: skip
    ids = torch.randint(0, 32, (seqs, tokens), generator=torch.Generator().manual_seed(0))

    def step(model: torch.nn.Module) -> Callable[[], None]:
        return lambda: model(input_ids=ids, labels=ids).loss.backward()

    with torch.random.fork_rng():
        whole = _median_s(step(LlamaForCausalLM(config)), repeats) if rank == 0 else 0.0
    dist.barrier()
    model = LlamaForCausalLM(config)
    parallelize(model, DeviceMesh("cpu", [0, 1]))
    sharded = _median_s(step(model), repeats)
    dist.barrier()  # both ranks done with every collective before either leaves
    dist.destroy_process_group()
    if rank == 0:
        out.put((whole, sharded))


def measure_tp_collective(shape: dict[str, int], threads: int, repeats: int) -> dict[str, float]:
    """The cost of one tensor-parallel collective as the runtime's sharded models pay it
    (orchestrator.models.tensor_parallel: DTensor over gloo, dispatch included): a 2-layer model's
    forward+backward at tp=2 in two processes against tp=1 in one; the time tp=2 takes
    beyond half of tp=1, over its collectives (2 per layer and pass, 1 each for the
    embedding and the head: 4 x 2 + 4 = 12); at least 1 us."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    seqs, tokens = 16, 32
    mp.spawn(_tp_worker, args=(port, threads, shape, seqs, tokens, max(repeats, 5), queue),
             nprocs=2)  # fmt: skip
    whole, sharded = queue.get()
    return {"tp1_s": whole, "tp2_s": sharded, "tokens": seqs * tokens,
            "tp_collective_s": max(sharded - whole / 2, 1e-6 * 12) / 12}  # fmt: skip


def measure_decode_overhead(shape: dict[str, int], repeats: int, steps: int = 32) -> float:
    """Seconds per generated token of transformers' generate on a 2-layer model of
    `shape` with a 32-token vocabulary at batch 1, where the layers' own work is small:
    the sampler loop's fixed cost per decode step (the planner adds it to every step)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{HF_NAMES[k]: v for k, v in shape.items()}, num_hidden_layers=2,
                         vocab_size=32, tie_word_embeddings=False)  # fmt: skip
    with torch.random.fork_rng():
        model = LlamaForCausalLM(config).eval()
    prompt = torch.zeros((1, 4), dtype=torch.long)

    def generate() -> None:
        with torch.no_grad():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                           max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           pad_token_id=0, eos_token_id=1)  # fmt: skip

    return _median_s(generate, max(repeats, 3)) / steps


class _FixedKV:
    """Stands in for a KV cache holding kv_len positions: `update` ignores the new token's
    keys and values and returns the stored ones, so attention reads exactly kv_len cached
    positions per sequence without the copy a growing cache would add."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        return self.k, self.v


def measure_layer(
    shape: dict[str, int], tokens: int, decode_batch: int, kv_len: int, repeats: int
) -> dict[str, Any]:
    """Times of one transformers LlamaDecoderLayer (SDPA attention, RoPE, SwiGLU) for
    `tokens` tokens as tokens // seq_len sequences of seq_len = min(128, tokens):
    forward_s (no grad), forward_backward_s (backward of the outputs' sum, the input
    needing grad as inside a stack), and decode_step_s: a decode step of decode_batch
    sequences, emulated as one new token each against kv_len cached positions (_FixedKV)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    h, kv_dim = shape["hidden"], shape["kv_heads"] * shape["hidden"] // shape["heads"]
    hf: dict[str, Any] = {HF_NAMES[k]: v for k, v in shape.items()}
    hf.update(max_position_embeddings=max(SEQ_LEN, kv_len + 1), attn_implementation="sdpa")
    cfg = LlamaConfig(**hf)
    layer, rope = LlamaDecoderLayer(cfg, layer_idx=0), LlamaRotaryEmbedding(cfg)
    seq_len = min(SEQ_LEN, tokens)
    x = torch.randn(tokens // seq_len, seq_len, h)
    pos = rope(x, torch.arange(seq_len)[None])
    kv_shape = (decode_batch, shape["kv_heads"], kv_len, kv_dim // shape["kv_heads"])
    cache = _FixedKV(torch.randn(kv_shape), torch.randn(kv_shape))
    x1 = torch.randn(decode_batch, 1, h)
    pos1 = rope(x1, torch.full((1, 1), kv_len))

    @torch.no_grad()
    def forward() -> None:
        layer(x, position_embeddings=pos)

    def forward_backward() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x.detach().requires_grad_(True), position_embeddings=pos).sum().backward()

    @torch.no_grad()
    def decode_step() -> None:
        layer(x1, position_embeddings=pos1, past_key_values=cache)

    fwd_s, fwd_bwd_s = _median_s(forward, repeats), _median_s(forward_backward, repeats)
    return dict(
        shape,
        tokens=tokens,
        seq_len=seq_len,
        forward_s=fwd_s,
        forward_backward_s=fwd_bwd_s,
        decode_batch=decode_batch,
        kv_len=kv_len,
        decode_step_s=_median_s(decode_step, repeats),
    )


def derived_rates(row: dict[str, Any]) -> tuple[float, float]:
    """(flops_s, bytes_s) of one layer row, as the module docstring defines them. Matmul
    params: q, o (h x h), k, v (h x kv_dim), gate, up, down (h x intermediate)."""
    h, kv_dim = row["hidden"], row["kv_heads"] * row["hidden"] // row["heads"]
    params = 2 * h * h + 2 * h * kv_dim + 3 * h * row["intermediate"]
    fwd_flops = 2 * params * row["tokens"] + 4 * row["tokens"] * row["seq_len"] * h
    weight_bytes = 4 * (params + 2 * h)  # fp32, with the two RMSNorm weights
    kv_bytes = 4 * 2 * row["decode_batch"] * row["kv_len"] * kv_dim  # K and V, fp32
    flops_s = 3 * fwd_flops / row["forward_backward_s"]
    return flops_s, (weight_bytes + kv_bytes) / row["decode_step_s"]


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options (argparse exits with 2 on a malformed one) and every rule they break."""
    p = argparse.ArgumentParser(
        "relay profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--out", default="profiles/cpu.json", help="where to write the profile")
    for name in INT_OPTIONS:
        p.add_argument("--" + name.replace("_", "-"), type=int, help="default %(default)s")
    p.add_argument("--tokens", help="comma list of token counts, default %(default)s")
    p.add_argument(
        "--quick", action="store_true", help="the tiny preset, small sizes, 2 repeats (tests)"
    )
    p.set_defaults(**(QUICK if "--quick" in argv else Settings()).defaults())
    args = p.parse_args(argv)
    problems = []
    for name in INT_OPTIONS:
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            problems.append(
                f"{flag} = {getattr(args, name)}: must be >= 1. Fix: pass {flag} 1 or more"
            )
    if not problems and (args.hidden % args.heads or args.hidden // args.heads % 2):
        problems.append(
            f"--hidden = {args.hidden} with --heads = {args.heads}: head_dim = hidden / heads "
            "must be a whole, even number (RoPE). Fix: e.g. --hidden 256 --heads 4"
        )
    if not problems and args.heads % args.kv_heads:
        problems.append(
            f"--kv-heads = {args.kv_heads}: must divide --heads = {args.heads}. "
            "Fix: pick a divisor of --heads"
        )
    try:
        args.tokens = [int(t) for t in args.tokens.split(",")]
        bad = [t for t in args.tokens if t < 1 or (t > SEQ_LEN and t % SEQ_LEN)]
    except ValueError:
        bad = [args.tokens]
    if bad:
        problems.append(
            f"--tokens = {bad}: each token count must be >= 1 and, above {SEQ_LEN}, a multiple "
            f"of {SEQ_LEN} (batches of {SEQ_LEN}-token sequences). Fix: e.g. --tokens 256,1024"
        )
    if Path(args.out).is_dir():
        problems.append(
            f"--out = {args.out!r}: is a folder. Fix: name a file, e.g. profiles/cpu.json"
        )
    return args, problems


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temp file beside `path`, then rename: never a partial profile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_say = partial(print, flush=True)  # progress lines show up at once, even through a pipe


def profile(argv: list[str]) -> int:
    """`relay profile [options]`: measure, print one line per measurement and a summary,
    write the JSON. Returns 0, or 2 for bad arguments (then nothing is written)."""
    try:
        args, problems = _parse(argv)
    except SystemExit as e:  # argparse printed its message (or --help)
        return int(e.code or 0)
    if problems:
        _say("relay profile: invalid arguments:\n" + "\n".join(f"  - {p}" for p in problems))
        return 2
    start, saved_threads, repeats = time.perf_counter(), torch.get_num_threads(), args.repeats
    torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(0)
        prof: dict[str, Any] = {
            "device_kind": "cpu",
            "threads_per_device": args.threads,
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "torch": torch.__version__,
            "matmul_flops_s": measure_matmul_flops_s(args.matmul_n, repeats),
        }
        _say(f"matmul {args.matmul_n}^3 fp32: {prof['matmul_flops_s'] / 1e9:.2f} GFLOP/s")
        prof["copy_bytes_s"] = measure_copy_bytes_s(args.copy_bytes, repeats)
        _say(f"copy {args.copy_bytes // MIB} MiB: {prof['copy_bytes_s'] / 1e9:.2f} GB/s")
        link = measure_link(args.link_bytes, args.threads, repeats)
        prof["link_bytes_s"], prof["link_latency_s"] = link
        _say(f"gloo send/recv {args.link_bytes // MIB} MiB: {link[0] / 1e9:.2f} GB/s one-way")
        _say(f"gloo send/recv 1 float: {link[1] * 1e6:.1f} us one-way")
        prof["allreduce_bytes_s"] = measure_allreduce(args.link_bytes, 4, args.threads, repeats)
        _say(f"gloo all-reduce {args.link_bytes // MIB} MiB over 4 processes: "
             f"{prof['allreduce_bytes_s'] / 1e9:.2f} GB/s")  # fmt: skip
        shape = {k: getattr(args, k) for k in HF_NAMES}
        tp = measure_tp_collective(shape, args.threads, repeats)
        prof["tp_collective_s"], prof["tensor_parallel"] = tp["tp_collective_s"], tp
        _say(f"tensor parallel (2 layers, {tp['tokens']} tokens): tp1 {tp['tp1_s'] * 1e3:.1f} ms, "
             f"tp2 {tp['tp2_s'] * 1e3:.1f} ms: {tp['tp_collective_s'] * 1e3:.2f} ms per "
             "collective")  # fmt: skip
        prof["decode_step_overhead_s"] = measure_decode_overhead(shape, repeats)
        _say(f"generate loop (2 layers, batch 1): {prof['decode_step_overhead_s'] * 1e3:.2f} ms "
             "per token")  # fmt: skip
        layers = []
        for tokens in args.tokens:
            row = measure_layer(shape, tokens, args.decode_batch, args.kv_len, repeats)
            layers.append(row)
            _say(
                f"layer {shape} tokens={tokens}: forward {row['forward_s'] * 1e3:.2f} ms, "
                f"forward+backward {row['forward_backward_s'] * 1e3:.2f} ms, decode step "
                f"(batch {args.decode_batch}, kv_len {args.kv_len}) {row['decode_step_s'] * 1e3:.2f} ms"
            )
    finally:
        torch.set_num_threads(saved_threads)
    prof["flops_s"], prof["bytes_s"] = derived_rates(max(layers, key=lambda r: r["tokens"]))
    prof["layers"] = layers
    prof["command"] = shlex.join(["relay", "profile", *argv])
    bad = [k for k, v in prof.items() if isinstance(v, float) and not (math.isfinite(v) and v > 0)]
    if bad:
        raise RuntimeError(f"relay profile: measured non-positive or non-finite {bad}; not written")
    _write_atomic(Path(args.out), prof)
    _say(
        f"wrote {args.out} in {time.perf_counter() - start:.1f} s: "
        f"flops_s {prof['flops_s'] / 1e9:.2f} GFLOP/s (matmul {prof['matmul_flops_s'] / 1e9:.2f}), "
        f"bytes_s {prof['bytes_s'] / 1e9:.2f} GB/s (copy {prof['copy_bytes_s'] / 1e9:.2f}), "
        f"link {prof['link_bytes_s'] / 1e9:.2f} GB/s, latency {prof['link_latency_s'] * 1e6:.1f} us"
    )
    return 0
