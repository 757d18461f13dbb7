"""Model workers: one Ray actor per role (per device), holding the role's model and its
engines, running the MFC interfaces the controller dispatches to it."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from algos.graph import MFC, CallKind, check_outputs
from orchestrator.engines.generate import HFGenerateEngine, SamplingParams
from orchestrator.engines.train import OptimSpec, TrainEngine
from orchestrator.engines.vllm_engine import VLLMSpec
from orchestrator.interfaces.lookup import get_interface
from orchestrator.interfaces.registry import Metrics, WorkerContext
from orchestrator.models.batch import Batch, gather_inputs


def reset_peak_rss() -> bool:
    """Restart the process's peak resident set (Linux: VmHWM, reset through
    /proc/self/clear_refs); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> float:
    """Bytes: the largest resident set since `reset_peak_rss` (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


@dataclass(frozen=True)
class RoleSpec:
    """Everything a worker needs to build its role."""

    name: str
    model_kind: str  # causal | value (critic or reward model) | verifier
    init_path: str | None  # Hugging Face folder the weights start from
    tokenizer_path: str
    task_name: str
    task_digits: int
    optim: OptimSpec | None = None  # set for trainable roles
    generation_backend: str | None = None  # hf | vllm, set for roles that generate
    vllm: VLLMSpec | None = None  # set with generation_backend vllm
    threads: int = 1
    seed: int = 0
    device: str = "cpu"  # cpu | cuda
    policy_experts: int | None = None  # a PMOE policy head with this many experts
    expert_rank: int = 8
    reward_function: str | None = None  # a verifier role: the user's 'file.py:name' instead


class ModelWorker:
    """Hosts one role. Created by the controller as a Ray actor (ray.remote(ModelWorker))."""

    def __init__(self, spec: RoleSpec) -> None:
        # the process before any model: the runtime's own memory, to tell model memory apart
        self.baseline_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
        torch.set_num_threads(spec.threads)
        os.environ["OMP_NUM_THREADS"] = str(spec.threads)
        # DeepSpeed picks its accelerator once per process, from this variable if set.
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec.device == "cuda" else "cpu")
        torch.manual_seed(spec.seed)
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from orchestrator.data.tasks import make_task
        from orchestrator.models.hf import load_causal_lm, load_value_model

        hf_logging.set_verbosity_error()
        self.spec = spec
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_path)
        task = make_task(spec.task_name, spec.task_digits)
        module: torch.nn.Module | None = None
        if spec.model_kind == "causal" and spec.policy_experts is not None:
            from orchestrator.models.pmoe import load_pmoe

            module = load_pmoe(
                spec.init_path, spec.policy_experts, rank=spec.expert_rank, seed=spec.seed
            )
        elif spec.model_kind == "causal":
            module = load_causal_lm(spec.init_path)
        elif spec.model_kind == "value":
            module = load_value_model(spec.init_path)
        elif spec.model_kind != "verifier":
            raise ValueError(f"role '{spec.name}': unknown model_kind '{spec.model_kind}'")
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if spec.device == "cuda"
            else torch.device("cpu")
        )
        if module is not None:
            module.to(self.device)
        train = None
        if spec.optim is not None:
            assert module is not None, "a trainable role needs a model"
            train = TrainEngine(module, spec.optim)
            module = train.module
            self.device = next(module.parameters()).device  # where DeepSpeed put it
        elif module is not None:
            module.requires_grad_(False)
        generator = None
        if spec.generation_backend == "hf":
            generator = HFGenerateEngine(module, tokenizer.eos_token_id, tokenizer.pad_token_id)
        elif spec.generation_backend == "vllm":
            generator = self._vllm_engine(spec, tokenizer)
        elif spec.generation_backend is not None:
            raise ValueError(f"unknown generation backend '{spec.generation_backend}'")
        self.ctx = WorkerContext(spec.name, module, tokenizer, task, train, generator)
        if spec.reward_function is not None:
            from orchestrator.data.user_data import load_reward_function

            self.ctx.reward_function = spec.reward_function
            self.ctx.reward_fn = load_reward_function(spec.reward_function)
        # the trainer's optimizer-step count the generation engine's weights are from
        self.synced_version = 0
        # from here on the peak counts what running calls holds, not the load's transients
        # (a state dict read beside the built model, the engine's start-up)
        self.calls_peak_reset = reset_peak_rss()

    @staticmethod
    def _vllm_engine(spec: RoleSpec, tokenizer: Any) -> Any:
        from orchestrator.engines.vllm_engine import VLLMEngine

        if spec.policy_experts is not None or spec.vllm is None or spec.init_path is None:
            raise ValueError(
                f"role '{spec.name}': the vLLM backend needs a plain causal LM folder and "
                f"engine settings (PMOE experts {spec.policy_experts}, vllm {spec.vllm}, "
                f"model {spec.init_path}); use generation_backend 'hf'"
            )
        return VLLMEngine(
            spec.init_path, tokenizer.eos_token_id, tokenizer.pad_token_id, spec.vllm, spec.threads
        )

    def _sync_generator(self) -> float | None:
        """Push the trainer's weights into a separate generation engine if they changed
        since the last push; returns the seconds it took (None: nothing to push)."""
        sync = getattr(self.ctx.generator, "sync_weights", None)
        train = self.ctx.train
        if sync is None or train is None or train.version == self.synced_version:
            return None
        seconds = sync(train.weights())
        self.synced_version = train.version
        return seconds

    def ping(self) -> str:
        return self.spec.name

    def run(self, call: MFC, options: Mapping[str, Any], *inputs: Batch) -> tuple[Batch, Metrics]:
        """Run one call on the merged input batches; returns (outputs, metrics)."""
        merged = gather_inputs(inputs)
        missing = [k for k in call.inputs if k not in merged]
        if missing:
            raise KeyError(f"call '{call.name}' is missing inputs {missing}")
        batch = {k: merged[k].to(self.device) for k in call.inputs}
        # weights changed since the last push (a train call without push_weights, a
        # checkpoint loaded) reach the engine first
        synced = self._sync_generator() if call.kind is CallKind.GENERATE else None
        wall, start, cpu = time.time(), time.perf_counter(), time.process_time()
        options = {**options, "inputs": call.inputs, "outputs": call.outputs}
        outputs, metrics = get_interface(call.interface)(self.ctx, batch, options)
        elapsed = time.perf_counter() - start
        metrics[f"perf/cpu_{call.name}_s"] = time.process_time() - cpu
        if options.get("push_weights"):  # the next call samples: push now, timed on its own
            synced = self._sync_generator()
        if synced is not None:
            metrics["time/weight_sync"] = synced
        outputs = {k: v.cpu() for k, v in outputs.items()}  # the object store holds CPU tensors
        check_outputs(call, outputs)
        metrics[f"time/{call.name}_s"] = elapsed
        metrics[f"span/{call.name}/start"] = wall
        metrics[f"span/{call.name}/end"] = wall + elapsed
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        metrics[f"perf/peak_rss_bytes_{self.spec.name}"] = float(peak_kib * 1024)
        metrics[f"perf/model_rss_bytes_{self.spec.name}"] = (
            peak_kib * 1024 - self.baseline_rss_bytes
        )
        if self.calls_peak_reset:
            calls_peak = peak_rss_since_reset()
            metrics[f"perf/calls_peak_rss_bytes_{self.spec.name}"] = calls_peak
            metrics[f"perf/calls_model_rss_bytes_{self.spec.name}"] = (
                calls_peak - self.baseline_rss_bytes
            )
        return outputs, metrics

    def engine_logprobs(self, batch: Batch) -> torch.Tensor:
        """The generation engine's log-probs (temperature 1) of the batch's fixed responses
        [B, T], after any pending weight push: compare with the trainer's to check that the
        engine samples from the trainer's weights."""
        fn = getattr(self.ctx.generator, "sequence_logprobs", None)
        if fn is None:
            raise RuntimeError(f"role '{self.spec.name}' has no separate generation engine")
        self._sync_generator()
        keys = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
        return fn(*(batch[k] for k in keys)).cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.ctx.train is not None:
            return self.ctx.train.full_state_dict()
        assert self.ctx.module is not None
        return {k: v.detach().clone() for k, v in self.ctx.module.state_dict().items()}

    def save(self, folder: str) -> list[str]:
        """Write HF-format weights + tokenizer and the DeepSpeed state under folder/<role>."""
        if self.ctx.train is None or self.ctx.module is None:
            return []
        out = Path(folder) / self.spec.name
        out.mkdir(parents=True, exist_ok=True)
        self.ctx.module.save_pretrained(out, state_dict=self.ctx.train.full_state_dict())
        self.ctx.tokenizer.save_pretrained(out)
        self.ctx.train.save(out / "deepspeed")
        return [str(p) for p in out.rglob("*") if p.is_file()]

    def load(self, folder: str) -> None:
        """Restore weights, optimizer and scheduler from folder/<role>/deepspeed."""
        if self.ctx.train is None:
            raise RuntimeError(f"role '{self.spec.name}' is not trainable; nothing to restore")
        self.ctx.train.load(Path(folder) / self.spec.name / "deepspeed")
        # (the load bumps the trainer's version: the next generate call pushes these weights)

    def evaluate(self, prompts: list[str], params: SamplingParams) -> dict[str, float]:
        """Task accuracy and mean reward of responses to `prompts` under `params`."""
        from orchestrator.models.hf import decode_responses, encode_prompts

        if self.ctx.generator is None:
            raise RuntimeError(f"role '{self.spec.name}' cannot generate")
        self._sync_generator()
        ids, mask = encode_prompts(self.ctx.tokenizer, prompts)
        gen = self.ctx.generator.generate(ids.to(self.device), mask.to(self.device), params)
        rids = gen.response_ids.cpu()
        responses = decode_responses(self.ctx.tokenizer, rids)  # prompts: already strings
        task = self.ctx.task
        correct = [float(task.correct(p, r)) for p, r in zip(prompts, responses)]
        rewards = [task.reward(p, r) for p, r in zip(prompts, responses)]
        return {
            "accuracy": sum(correct) / len(correct),
            "reward": sum(rewards) / len(rewards),
        }
