"""The Ray controller: prepares a run folder, places roles on workers, and runs an
algorithm's dataflow graph step after step (SFT, then RL), with checkpoints and resume.

A step reads top to bottom: take the step's batch, dispatch every call whose inputs are
ready (calls on different workers run concurrently; data moves between workers as Ray
object references), collect metrics, update the KL controller, log, checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from algos.graph import MFC, CallKind, DataflowGraph
from algos.ppo import ALGORITHM_GRAPHS, PAIR, PROMPT, reward_model_graph, sft_graph
from algos.rewards import make_kl_controller
from orchestrator.config.schema import (
    ConfigError,
    Problem,
    RelayConfig,
    generation_backend,
    to_dict,
    to_yaml,
)
from orchestrator.data.user_data import RewardError
from orchestrator.engines.generate import SamplingParams
from orchestrator.engines.train import OptimSpec
from orchestrator.engines.vllm_engine import VLLMSpec, kv_cache_bytes_for
from orchestrator.run.checkpoint import CheckpointManager, write_atomic
from orchestrator.run.tracking import Tracker, plot_learning_curves
from orchestrator.runtime.planning import PlanResult, is_per_role
from orchestrator.runtime.roles import Dispatched, PlannedRoles, RoleWorkers, without_spans
from orchestrator.worker import ModelWorker, RoleSpec
from planner.plan import to_dict as plan_to_dict

RUN_MARKER = "relay_run.json"
STOP = threading.Event()
"""Set by SIGTERM: the controller finishes the step in flight, checkpoints, and returns."""


def install_stop_handler() -> None:
    """Route SIGTERM to STOP (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: STOP.set())


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def stop_token_ids(tokenizer: Any, stop_tokens: list[str]) -> tuple[int, ...]:
    """The ids of `generate.stop_tokens`; each must be exactly one token of the tokenizer."""
    ids, bad = [], []
    for text in stop_tokens:
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(enc) != 1 or enc[0] == tokenizer.unk_token_id:
            bad.append(text)
        else:
            ids.append(enc[0])
    if bad:
        raise ConfigError(
            [
                Problem(
                    "generate.stop_tokens",
                    list(stop_tokens),
                    f"{bad} are not single tokens of the model's tokenizer",
                    "use tokens of the task's alphabet (one character each for the built-in "
                    "tasks), or drop them",
                )
            ]
        )
    return tuple(ids)


def call_seed(seed: int, step: int, name: str) -> int:
    """A seed per (run seed, step, call): sampling and shuffling replay exactly on resume."""
    return (seed * 1_000_003 + step * 7_919 + zlib.crc32(name.encode())) % (2**31 - 1)


@dataclass
class RunPaths:
    root: Path

    @property
    def assets(self) -> Path:
        return self.root / "assets"

    @property
    def tokenizer(self) -> Path:
        return self.assets / "tokenizer"

    @property
    def base_model(self) -> Path:
        return self.assets / "base_model"

    @property
    def sft_model(self) -> Path:
        return self.root / "models" / "sft"

    @property
    def reward_model(self) -> Path:
        return self.root / "models" / "reward"


# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = (
    "run.resume",
    "run.allow_config_change",
    "train.steps",
    "logger.",
    "reward.on_error",
)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every leaf that differs, except those a resume may change."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    return [
        (k, a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)
    ]


# ---------------------------------------------------------------------------- data


def encode_responses(
    tokenizer: Any, responses: list[str], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded response ids [B, width] ending in eos, and their mask."""
    ids = torch.full((len(responses), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, r in enumerate(responses):
        toks = tokenizer.encode(r, add_special_tokens=False)[: width - 1] + [tokenizer.eos_token_id]
        ids[i, : len(toks)] = torch.tensor(toks)
        mask[i, : len(toks)] = 1
    return ids, mask


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def take(items: list[Any], batch_size: int, step: int, seed: int) -> list[Any]:
    """The step's batch: consecutive slices of a fresh permutation per epoch."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, len(items))
        order = epoch_order(len(items), seed, epoch)
        n = min(batch_size - len(out), len(items) - offset)
        out.extend(items[i] for i in order[offset : offset + n])
        pos += n
    return out


# ---------------------------------------------------------------------------- workers


def start_workers(specs: list[RoleSpec], device: str) -> dict[str, Any]:
    import ray

    actor_cls = ray.remote(ModelWorker)
    workers = {}
    for spec in specs:
        if spec.model_kind == "verifier":  # a Python function: no device (none planned)
            resources: dict[str, Any] = {"num_cpus": 0}
        elif device != "cuda":
            resources = {"num_cpus": 0, "resources": {"relay_device": 1}}
        else:
            resources = {"num_gpus": 1}
        workers[spec.name] = actor_cls.options(
            max_concurrency=1,
            runtime_env={
                "env_vars": {
                    "OMP_NUM_THREADS": str(spec.threads),
                    "TOKENIZERS_PARALLELISM": "false",
                }
            },
            **resources,
        ).remote(spec)
    ray.get([w.ping.remote() for w in workers.values()])
    return workers


def stop_workers(workers: dict[str, Any]) -> None:
    import ray

    for w in workers.values():
        ray.kill(w)


RUNNING_CALLS_WAIT_S = 60.0


def run_graph(
    graph: DataflowGraph,
    workers: dict[str, Any] | RoleWorkers | PlannedRoles,
    dataset: dict[str, torch.Tensor],
    options: dict[str, dict[str, Any]],
) -> dict[str, dict[str, float]]:
    """Run every call of the graph once; calls whose inputs are ready run at once.

    `workers`: one worker per role ({role: ModelWorker}, or RoleWorkers), or a plan's
    device workers (PlannedRoles). Returns each call's metrics. Outputs stay in Ray's
    object store and are handed to the consumers as references.
    """
    import ray

    runtime = RoleWorkers(workers) if isinstance(workers, dict) else workers
    data_ref = ray.put(dataset)
    outputs: dict[str, list[Any]] = {}
    running: dict[str, Dispatched] = {}
    waiting: dict[Any, str] = {}  # reference -> the call it belongs to
    left: dict[str, int] = {}  # call -> references not ready yet
    done: set[str] = set()
    metrics: dict[str, dict[str, float]] = {}
    # A plan's device workers take the whole step at once, producers first: each call
    # starts on its workers as soon as its inputs exist, without a round trip through
    # this loop. One worker per role: each call is dispatched when its inputs are ready.
    eager = isinstance(runtime, PlannedRoles)
    if eager:
        runtime.begin_step()  # the step's reallocations go first, in the planner's order
    while len(done) < len(graph.calls):
        ready = graph.ready(done, set(running))
        while ready:
            for call in ready:
                inputs = [data_ref] + [r for p in graph.parents(call) for r in outputs[p]]
                d = runtime.dispatch(call, options.get(call.name, {}), inputs)
                outputs[call.name], running[call.name] = d.outputs, d
                waiting.update({ref: call.name for ref in d.waits})
                left[call.name] = len(d.waits)
            ready = graph.ready(done | set(running), set(running)) if eager else []
        finished, _ = ray.wait(list(waiting), num_returns=1)
        for ref in finished:
            name = waiting.pop(ref)
            try:
                ray.get(ref)  # raises the call's error at once
            except Exception:
                # let the calls still in flight end first, so the next step starts clean
                # (bounded: ranks of a failed call may wait on it in a collective forever)
                ray.wait(list(waiting), num_returns=len(waiting), timeout=RUNNING_CALLS_WAIT_S)
                raise
            left[name] -= 1
            if left[name]:
                continue
            d = running.pop(name)
            metrics[name] = d.finish(ray.get(d.waits))
            done.add(name)
    return metrics


# ---------------------------------------------------------------------------- the run


class Controller:
    def __init__(self, cfg: RelayConfig, plan: PlanResult | None = None) -> None:
        self.cfg = cfg
        self.plan = plan  # the RL graph's execution plan (orchestrator.runtime.planning.make_plan)
        self.paths = RunPaths(Path(cfg.run.output_dir) / cfg.run.name)
        self.ckpt = CheckpointManager(self.paths.root, cfg.run.keep_checkpoints)
        self.restarts = 0  # model workers replaced so far (run.max_restarts bounds them)
        self.saved_step: int | None = None  # the RL checkpoint this process wrote or loaded

    # -- run folder ---------------------------------------------------------------

    def prepare(self) -> dict[str, Any]:
        """Create or reopen the run folder; returns the run's marker (with its wandb id)."""
        cfg, root = self.cfg, self.paths.root
        marker_path = root / RUN_MARKER
        if root.exists() and any(root.iterdir()):
            if not marker_path.is_file():
                raise RunError(
                    f"run.output_dir/run.name = {root} exists and is not a Relay run folder "
                    f"(no {RUN_MARKER}). Fix: choose another run.name or output_dir."
                )
            marker = json.loads(marker_path.read_text())
            if cfg.run.resume == "never":
                raise RunError(
                    f"run.resume = 'never', but the run folder {root} already holds a run. "
                    "Fix: pass resume=auto to continue it, or choose a new run.name; nothing "
                    "was changed."
                )
            changed = config_changes(marker.get("config", {}), to_dict(cfg))
            digest = self.prompt_file_digest()
            before = marker.get("prompt_file_sha256", digest)
            if before != digest and before is not None and digest is not None:
                changed.append(("task.prompt_file (contents)", f"sha256 {before[:12]}",
                                f"sha256 {digest[:12]}"))  # fmt: skip
            if changed and not cfg.run.allow_config_change:
                lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
                raise RunError(
                    f"run.name = {cfg.run.name!r}: the run folder {root} was made by a different "
                    f"config ({lines}). Fix: choose a new run.name, or pass "
                    "run.allow_config_change=true to continue with the new values; nothing was "
                    "changed."
                )
            return marker
        if cfg.run.resume not in ("never", "auto"):
            raise RunError(
                f"run.resume = {cfg.run.resume!r} needs the run folder {root}, which is empty"
            )
        root.mkdir(parents=True, exist_ok=True)
        marker = {
            "relay": 1,
            "wandb_id": uuid.uuid4().hex[:12],
            "created": time.time(),
            "config": to_dict(cfg),
            "prompt_file_sha256": self.prompt_file_digest(),
        }
        write_atomic(marker_path, json.dumps(marker))
        write_atomic(root / "config.yaml", to_yaml(cfg))
        return marker

    def prompt_file_digest(self) -> str | None:
        from orchestrator.data.user_data import file_sha256

        path = self.cfg.task.prompt_file
        return file_sha256(path) if path is not None else None

    def build_assets(self) -> None:
        """Tokenizer, base model and task data, built locally and deterministically."""
        from orchestrator.data.tasks import build_task_data, make_task
        from orchestrator.models.hf import (
            build_model_folder,
            count_parameters,
            load_causal_lm,
            train_tokenizer,
        )

        cfg, paths = self.cfg, self.paths
        self.task = make_task(cfg.task.name, cfg.task.num_digits)
        self.data = build_task_data(
            self.task,
            num_demos=cfg.task.num_demos,
            num_rl_prompts=cfg.task.num_rl_prompts,
            num_eval_prompts=cfg.task.num_eval_prompts,
            demo_noise=cfg.task.demo_noise,
            seed=cfg.run.seed,
            num_pairs=cfg.reward.num_pairs if self.trains_reward_model else 0,
            num_eval_pairs=cfg.reward.num_eval_pairs if self.trains_reward_model else 0,
            label_noise=cfg.reward.label_noise,
        )
        if cfg.task.prompt_file is not None:
            self.data.rl_prompts = self.file_prompts()
        if cfg.model.path is not None:
            self.base = Path(cfg.model.path)
            self.tokenizer_path = self.base
        else:
            self.tokenizer_path = paths.tokenizer
            self.base = paths.base_model
            if not (paths.base_model / "DONE").is_file():
                tmp = paths.assets / ".building"
                shutil.rmtree(tmp, ignore_errors=True)
                corpus = [p + r for p, r in self.data.sft_pairs] + self.data.rl_prompts
                tok = train_tokenizer(self.task.alphabet(), tmp / "tokenizer", corpus)
                build_model_folder(
                    cfg.model.preset,
                    tok,
                    tmp / "base_model",
                    seed=cfg.run.seed,
                    max_position_embeddings=cfg.model.max_position_embeddings,
                    zero_head=cfg.model.zero_head,
                )
                for name in ("tokenizer", "base_model"):
                    shutil.rmtree(paths.assets / name, ignore_errors=True)
                    (tmp / name).rename(paths.assets / name)
                shutil.rmtree(tmp, ignore_errors=True)
                (paths.base_model / "DONE").write_text("ok\n")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        self.stop_token_ids = stop_token_ids(self.tokenizer, cfg.generate.stop_tokens)
        self.num_params = count_parameters(load_causal_lm(self.base))

    def file_prompts(self) -> list[str]:
        """task.prompt_file's prompts (checked line by line when the config loaded)."""
        from orchestrator.data.user_data import read_prompt_file

        cfg = self.cfg
        report = read_prompt_file(
            str(cfg.task.prompt_file), self.task.answer, lambda text: 0, 1 << 30, 0
        )
        if not report.ok:  # the file changed since the config was checked
            raise RunError(
                f"task.prompt_file = {cfg.task.prompt_file!r} no longer reads cleanly; run "
                "`relay config <the same overrides>` to see its problems"
            )
        held_out = set(self.data.eval_prompts)
        shared = sum(p in held_out for p in report.prompts)
        if shared:
            print(f"relay: note: {shared} of {len(report.prompts)} prompts of "
                  f"{cfg.task.prompt_file} are also evaluation prompts")  # fmt: skip
        return report.prompts

    def role(
        self,
        name: str,
        kind: str,
        init: Path | None,
        optim: OptimSpec | None = None,
        generates: bool = False,
        policy_experts: int | None = None,
    ) -> RoleSpec:
        c = self.cfg
        generation = generation_backend(c) if generates else None
        return RoleSpec(
            name=name,
            model_kind=kind,
            init_path=str(init) if init else None,
            tokenizer_path=str(self.tokenizer_path),
            task_name=c.task.name,
            task_digits=c.task.num_digits,
            optim=optim,
            generation_backend=generation,
            vllm=self.vllm_spec(init) if generation == "vllm" else None,
            threads=c.cluster.threads_per_device,
            device=c.cluster.device,
            seed=c.run.seed,
            policy_experts=policy_experts,
            expert_rank=c.policy.expert_rank,
        )

    def vllm_spec(self, init: Path | None) -> VLLMSpec:
        """The engine of a generating role: context from its model folder, a KV cache for
        the run's largest generate call (rollout or evaluation)."""
        from transformers import AutoConfig

        c, t = self.cfg, self.cfg.train
        config = AutoConfig.from_pretrained(str(init))
        sequences = max(t.rollout_batch_prompts * t.samples_per_prompt, c.task.num_eval_prompts)
        context = config.max_position_embeddings
        g = c.generate
        return VLLMSpec(
            max_model_len=context,
            kv_cache_bytes=kv_cache_bytes_for(config, sequences, context),
            gpu_memory_utilization=g.vllm_gpu_memory_utilization,
            tensor_parallel_size=g.vllm_tensor_parallel_size,
            sleep_between_calls=g.vllm_sleep,
            dtype=g.vllm_dtype,
            max_num_seqs=max(sequences, 1),
        )

    def optim(
        self, lr: float, warmup_steps: int, batch: int, micro: int, weight_decay: float = 0.0
    ) -> OptimSpec:
        """A trainable role's optimizer: gradient clipping and ZeRO stage from train.*."""
        t = self.cfg.train
        return OptimSpec(lr, warmup_steps, weight_decay, t.grad_clip, t.zero_stage, batch, micro)

    def sampling(self, seed: int, greedy: bool = False) -> SamplingParams:
        g = self.cfg.generate
        return SamplingParams(
            g.max_new_tokens, g.temperature, g.top_p, g.top_k, greedy, seed, self.stop_token_ids
        )

    def evaluate(self, runtime: RoleWorkers | PlannedRoles, step: int) -> dict[str, float]:
        import ray

        prompts = self.data.eval_prompts
        greedy = runtime.evaluate(prompts, self.sampling(0, greedy=True))
        sampled = runtime.evaluate(
            prompts, self.sampling(call_seed(self.cfg.run.seed, step, "eval"))
        )
        g, s = ray.get([greedy, sampled])
        return {
            "eval/greedy_accuracy": g["accuracy"],
            "eval/greedy_reward": g["reward"],
            "eval/sampled_accuracy": s["accuracy"],
            "eval/sampled_reward": s["reward"],
        }

    # -- stages -------------------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return STOP.is_set()

    def run(self) -> dict[str, Any]:
        install_stop_handler()
        self.stopped_early = False
        marker = self.prepare()
        self.wandb_id = marker["wandb_id"]
        if self.plan is not None:
            p = self.plan
            write_atomic(self.paths.root / "plan.json",
                         json.dumps(plan_to_dict(p.ctx, p.plan, p.mode, p.estimate), indent=1))  # fmt: skip
        self.build_assets()
        summary: dict[str, Any] = {"run_dir": str(self.paths.root), "parameters": self.num_params}
        if self.cfg.sft.enabled:
            summary["sft"] = self.run_sft()
        if self.trains_reward_model and not self.stopped_early:
            summary["reward_model"] = self.run_reward_model()
        if not self.stopped_early:
            summary["rl"] = self.run_rl()
        summary["stopped"] = self.stopped_early
        plot_learning_curves(self.paths.root)
        write_atomic(self.paths.root / "summary.json", json.dumps(summary, indent=1))
        return summary

    @property
    def uses_reward_model(self) -> bool:
        return self.cfg.reward.source == "model"

    @property
    def trains_reward_model(self) -> bool:
        return self.uses_reward_model and self.cfg.reward.path is None

    @property
    def policy_init(self) -> Path:
        return self.paths.sft_model if self.cfg.sft.enabled else self.base

    def run_sft(self) -> dict[str, float]:
        """SFT as a one-call graph; its result is a Hugging Face folder, models/sft."""
        cfg, s = self.cfg, self.cfg.sft
        optim = self.optim(s.lr, s.warmup_steps, s.batch_samples, s.micro_batch_samples_per_device)
        spec = self.role("actor", "causal", self.base, optim, generates=True)
        width = self.task.answer_tokens
        from orchestrator.models.hf import encode_prompts

        def batch(step: int) -> dict[str, torch.Tensor]:
            pairs = take(self.data.sft_pairs, s.batch_samples, step - 1, cfg.run.seed)
            pids, pmask = encode_prompts(self.tokenizer, [p for p, _ in pairs])
            rids, rmask = encode_responses(self.tokenizer, [r for _, r in pairs], width)
            return {"prompt_ids": pids, "prompt_mask": pmask, "response_ids": rids,
                    "response_mask": rmask}  # fmt: skip

        def evaluate(workers: dict[str, Any], step: int) -> dict[str, float]:
            return self.evaluate(RoleWorkers(workers), step)

        return self.run_stage("sft", sft_graph(), spec, s.steps, batch, evaluate,
                              self.paths.sft_model)  # fmt: skip

    def run_reward_model(self) -> dict[str, float]:
        """Bradley-Terry reward model on the task's preference pairs, as a one-call graph,
        initialised from the SFT model (a scalar head on its last valid token); its result
        is a Hugging Face folder, models/reward. Held-out pair accuracy is logged."""
        cfg, r = self.cfg, self.cfg.reward
        optim = self.optim(r.lr, r.warmup_steps, r.batch_pairs, r.micro_batch_pairs_per_device)
        spec = self.role("reward", "value", self.policy_init, optim)

        def batch(step: int) -> dict[str, torch.Tensor]:
            pairs = take(self.data.pref_pairs, r.batch_pairs, step - 1, cfg.run.seed)
            return self.encode_pairs(pairs)

        eval_graph = DataflowGraph(
            "reward_model_eval",
            [MFC("reward_eval", "reward", CallKind.INFERENCE, "pair_accuracy", (*PROMPT, *PAIR))],
            dataset_keys=(*PROMPT, *PAIR),
        )

        def evaluate(workers: dict[str, Any], step: int) -> dict[str, float]:
            data = self.encode_pairs(self.data.eval_pref_pairs)
            return without_spans(run_graph(eval_graph, workers, data, {})["reward_eval"])

        return self.run_stage("reward_model", reward_model_graph(), spec, r.steps, batch,
                              evaluate, self.paths.reward_model)  # fmt: skip

    def encode_pairs(self, pairs: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
        from orchestrator.models.hf import encode_prompts

        width = self.task.answer_tokens
        pids, pmask = encode_prompts(self.tokenizer, [p for p, _, _ in pairs])
        cids, cmask = encode_responses(self.tokenizer, [c for _, c, _ in pairs], width)
        rids, rmask = encode_responses(self.tokenizer, [r for _, _, r in pairs], width)
        return {"prompt_ids": pids, "prompt_mask": pmask, "chosen_ids": cids,
                "chosen_mask": cmask, "rejected_ids": rids, "rejected_mask": rmask}  # fmt: skip

    def run_stage(self, stage: str, *args: Any) -> dict[str, float]:
        """`_run_stage(stage, *args)`, with new workers if one dies (the stage starts over)."""
        return self.with_restarts(stage, lambda _: self._run_stage(stage, *args))

    def _run_stage(
        self,
        stage: str,
        graph: DataflowGraph,
        spec: RoleSpec,
        steps: int,
        batch: Callable[[int], dict[str, torch.Tensor]],
        evaluate: Callable[[dict[str, Any], int], dict[str, float]],
        out: Path,
    ) -> dict[str, float]:
        """A one-call training stage (SFT, reward model): `steps` calls of the graph on
        `batch(step)`, `evaluate(workers, step)` at the end, the trained role saved as a
        Hugging Face folder `out` with a DONE marker holding the evaluation. A finished
        stage is skipped; a stopped one restarts on resume (these stages are short)."""
        done_marker = out / "DONE"
        if done_marker.is_file():
            return json.loads(done_marker.read_text())
        cfg = self.cfg
        (call,) = graph.calls
        workers = start_workers([spec], cfg.cluster.device)
        tracker = self.tracker(stage, steps, 0)
        try:
            for step in range(1, steps + 1):
                t0 = time.perf_counter()
                options = {
                    "seed": call_seed(cfg.run.seed, step, call.name),
                    "step": step - 1,
                    "reweight": cfg.reweight,
                }
                m = without_spans(
                    run_graph(graph, workers, batch(step), {call.name: options})[call.name]
                )
                m["time/step_s"] = time.perf_counter() - t0
                if step == steps:
                    m.update(evaluate(workers, step))
                tracker.log(step, m)
                if self.stop_requested and step < steps:
                    print(f"relay: stopped during {stage} (step {step}); it restarts on resume")
                    self.stopped_early = True
                    return {}
            result = {k: v for k, v in m.items() if k.startswith("eval/")}
            import ray

            tmp = out.with_name(f".{out.name}_tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            ray.get(workers[spec.name].save.remote(str(tmp)))
            shutil.rmtree(out, ignore_errors=True)
            (tmp / spec.name).rename(out)
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(out / "deepspeed", ignore_errors=True)
            write_atomic(done_marker, json.dumps(result))
        finally:
            tracker.close()
            stop_workers(workers)
        return result

    def tracker(self, stage: str, total: int, start: int) -> Tracker:
        lg = self.cfg.logger
        return Tracker(
            self.paths.root,
            stage,
            total,
            start,
            lg.wandb_mode,
            lg.wandb_project,
            self.wandb_id,
            self.cfg.run.name,
            to_dict(self.cfg),
            lg.progress,
        )

    def rl_roles(self) -> list[RoleSpec]:
        cfg, t = self.cfg, self.cfg.train
        init = self.policy_init

        # optimizer steps of the whole run: epochs x mini-batches per rollout x steps
        updates = (
            t.steps
            * cfg.algo.ppo_epochs
            * (t.rollout_batch_prompts * t.samples_per_prompt // t.mini_batch_samples)
        )
        decay = max(updates - t.warmup_steps, 1) if t.lr_schedule == "cosine" else 0

        def optim(lr: float) -> OptimSpec:
            spec = self.optim(lr, t.warmup_steps, t.mini_batch_samples,
                              t.micro_batch_samples_per_device, t.weight_decay)  # fmt: skip
            return replace(spec, decay_steps=decay, min_lr_ratio=t.min_lr_ratio)

        actor_optim, critic_optim = optim(t.actor_lr), optim(t.critic_lr)
        experts = cfg.policy.num_experts if cfg.policy.kind == "pmoe" else None
        if self.uses_reward_model:
            trained = self.cfg.reward.path or self.paths.reward_model
            reward = self.role("reward", "value", Path(trained))
        else:
            reward = replace(
                self.role("reward", "verifier", None), reward_function=self.reward_function()
            )
        return [
            self.role("actor", "causal", init, actor_optim, generates=True, policy_experts=experts),
            self.role("ref", "causal", init),
            self.role("critic", "value", init, critic_optim),
            reward,
        ]

    def reward_function(self) -> str | None:
        """reward.function with its file made absolute (workers may run elsewhere)."""
        spec = self.cfg.reward.function
        if self.cfg.reward.source != "function" or spec is None:
            return None
        where, name = spec.split(":")
        return f"{Path(where).resolve()}:{name}" if where.endswith(".py") else spec

    def run_rl(self) -> dict[str, float]:
        """The RL stage; a model worker that dies is replaced: new workers restore the
        newest complete checkpoint and the stage continues."""
        return self.with_restarts("rl", lambda after_fault: self._run_rl(after_fault))

    def with_restarts(
        self, stage: str, body: Callable[[bool], dict[str, float]]
    ) -> dict[str, float]:
        """body(after_fault) again with new workers whenever a model worker dies, at most
        run.max_restarts times in the whole run. The RL stage continues from its newest
        complete checkpoint; SFT and reward-model stages (no checkpoints) start over."""
        import ray

        here = 0  # restarts within this stage
        while True:
            try:
                return body(here > 0)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                self.restarts += 1
                here += 1
                newest = self.ckpt.newest_valid() if stage == "rl" else None
                cause = str(e).strip().splitlines()[0][:200]
                if stage != "rl":
                    where = f"the start of the {stage} stage (it keeps no checkpoints)"
                else:
                    where = f"checkpoint {newest}" if newest else "the start of the RL stage"
                if self.restarts > self.cfg.run.max_restarts:
                    last = self.ckpt.newest_valid()
                    resume = (f"The newest complete checkpoint is {last}; resume=auto continues "
                              "from it" if last else f"There is no checkpoint yet; the {stage} "
                              "stage starts over")  # fmt: skip
                    raise RunError(
                        f"a model worker died ({cause}) and run.max_restarts = "
                        f"{self.cfg.run.max_restarts} restarts are used up. {resume}. Fix: find "
                        "why workers die (memory, a killed process), then run the same command"
                    ) from None
                print(
                    f"relay: a model worker died ({cause}); restart {self.restarts} of "
                    f"{self.cfg.run.max_restarts}: new workers continue from {where}",
                    flush=True,
                )

    def _run_rl(self, after_fault: bool = False) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.train
        graph = ALGORITHM_GRAPHS[cfg.algo.name]()
        kl_ctl = make_kl_controller(
            cfg.algo.kl_controller,
            cfg.algo.kl_coef,
            cfg.algo.kl_target_per_token,
            cfg.algo.kl_horizon_samples,
        )
        start_step = skipped = 0  # skipped: steps without an update (reward.on_error=skip)
        self.ckpt.recover()
        # after a dead worker the newest checkpoint of this very run, whatever run.resume says
        resume_from = self.ckpt.newest_valid() if after_fault else self.resume_point()
        specs = [s for s in self.rl_roles() if s.name in graph.roles]
        if resume_from is not None:
            self.check_plan(resume_from)
        runtime = self.rl_runtime(graph, specs)
        trainable = [r for r in graph.trainable_roles]
        if resume_from is not None:
            state = json.loads((resume_from / "controller.json").read_text())
            runtime.load(resume_from, trainable)
            kl_ctl.load_state_dict(state["kl_controller"])
            rng = torch.load(resume_from / "rng.pt", weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            start_step = state["step"]
            skipped = state.get("skipped_steps", 0)
            self.saved_step = start_step
        if start_step >= t.steps:
            runtime.stop()
            print(
                f"relay: run {self.paths.root} already finished at step {start_step} of "
                f"{t.steps}; nothing to do (raise train.steps to continue it)."
            )
            return self.final_metrics()
        tracker = self.tracker("rl", t.steps, start_step)
        last: dict[str, float] = {}
        n_samples = t.rollout_batch_prompts * t.samples_per_prompt
        generating_roles = {c.role for c in graph.calls if c.kind is CallKind.GENERATE}
        from orchestrator.models.hf import encode_prompts

        try:
            if start_step == 0:
                tracker.record(0, self.evaluate(runtime, 0))
            for step in range(start_step + 1, t.steps + 1):
                t0 = time.perf_counter()
                unique = take(self.data.rl_prompts, t.rollout_batch_prompts, step - 1, cfg.run.seed)
                prompts = [p for p in unique for _ in range(t.samples_per_prompt)]
                ids, mask = encode_prompts(self.tokenizer, prompts)
                dataset = {"prompt_ids": ids, "prompt_mask": mask}
                if "unique_prompt_ids" in graph.dataset_keys:  # decoded once per prompt
                    uids, umask = encode_prompts(self.tokenizer, unique)
                    dataset.update(unique_prompt_ids=uids, unique_prompt_mask=umask)
                options: dict[str, dict[str, Any]] = {}
                for call in graph.calls:
                    seed = call_seed(cfg.run.seed, step, call.name)
                    options[call.name] = {
                        "seed": seed,
                        "step": step - 1,
                        "sampling": self.sampling(seed),
                        "algo": cfg.algo,
                        "policy": cfg.policy,
                        "reweight": cfg.reweight,
                        "kl_coef": kl_ctl.value,
                        "temperature": cfg.generate.temperature,
                        "samples_per_prompt": t.samples_per_prompt,
                        # the next step samples from these weights: push them at once
                        "push_weights": call.kind is CallKind.TRAIN
                        and call.role in generating_roles,
                        **call.options,
                    }
                m: dict[str, float] = {}
                try:
                    per_call = run_graph(graph, runtime, dataset, options)
                except RewardError as e:
                    reason = str(getattr(e, "cause", None) or e).strip()
                    if cfg.reward.on_error == "stop":
                        self.stop_on_reward_error(step, reason, runtime, trainable, kl_ctl,
                                                  skipped)  # fmt: skip
                    skipped += 1
                    print(f"relay: step {step} skipped, no update (reward.on_error=skip): "
                          f"{reason}", flush=True)  # fmt: skip
                    per_call = {}
                for call_metrics in per_call.values():
                    m.update(call_metrics)
                m["rollout/skipped_steps"] = skipped
                if per_call:
                    kl_ctl.update(m.get("rollout/kl_to_ref_token_mean", 0.0), n_samples)
                m["time/step_s"] = time.perf_counter() - t0
                m["perf/samples_per_s"] = n_samples / m["time/step_s"]
                if per_call:
                    m.update(self.plan_metrics(graph, m))
                m = without_spans(m)
                tokens = m.get("rollout/response_length_mean", 0.0) * n_samples
                m["perf/response_tokens_per_s"] = tokens / m["time/step_s"]
                if step % t.eval_every_steps == 0 or step == t.steps:
                    m.update(self.evaluate(runtime, step))
                tracker.log(step, m)
                last = m
                stop = self.stop_requested  # read once: a signal may land at any point
                if step % cfg.run.save_every_steps == 0 or step == t.steps or stop:
                    self.save_checkpoint(step, runtime, trainable, kl_ctl, skipped)
                if stop and step < t.steps:
                    self.stopped_early = True
                    print(
                        f"relay: stopped at step {step} with a checkpoint; the same command resumes"
                    )
                    break
                if step % cfg.logger.plot_every_steps == 0:
                    plot_learning_curves(self.paths.root)
        finally:
            tracker.close()
            runtime.stop()
        return {k: v for k, v in last.items() if k.startswith(("eval/", "rollout/"))}

    @property
    def planned(self) -> bool:
        """Whether the RL stage runs on one worker per device under the plan (any plan
        but the per-role placement, which runs one worker per role)."""
        return self.plan is not None and not is_per_role(self.plan)

    def rl_runtime(self, graph: DataflowGraph, specs: list[RoleSpec]) -> Any:
        """The RL graph's workers: per device under the plan, or one per role."""
        c = self.cfg.cluster
        if not self.planned:
            return RoleWorkers(start_workers(specs, c.device))
        assert self.plan is not None
        specs = [replace(s, generation_backend="hf" if s.generation_backend else None, vllm=None)
                 for s in specs]  # fmt: skip
        from planner.plan import offloaded_roles

        return PlannedRoles(graph, self.plan.plan, specs, c.num_nodes, c.devices_per_node,
                            c.threads_per_device, lambda side: start_workers(side, c.device),
                            offloaded_roles(self.plan.ctx, self.plan.plan))  # fmt: skip

    def plan_metrics(self, graph: DataflowGraph, m: dict[str, float]) -> dict[str, float]:
        """The planner's estimates beside the measured times (plan/ next to time/), and
        the step's orchestration overhead: its wall time minus the time during which some
        call or reallocation computed (the union of their spans)."""
        from orchestrator.runtime.roles import busy_seconds

        busy, computing = busy_seconds(m), busy_seconds(m, reallocations=False)
        step = m["time/step_s"]
        realloc = sum(v for k, v in m.items() if k.startswith("time/realloc_"))
        out: dict[str, float] = {
            "time/busy_s": busy,
            "time/reallocation_s": realloc,
            "time/overhead_s": step - busy,
            "perf/overhead_share": max(step - busy, 0.0) / step,  # orchestration alone
            "perf/realloc_share": realloc / step,
            "perf/non_compute_share": max(step - computing, 0.0) / step,  # both
        }
        if self.plan is None:
            return out
        est = self.plan.estimate
        out["plan/est_step_s"] = est.time_per_iteration_s
        for name, sec in est.call_s.items():
            out[f"plan/est_{name}_s"] = sec
        for name, sec in est.realloc_s.items():
            if sec > 0:
                out[f"plan/est_realloc_{name}_s"] = sec
        return out

    def check_plan(self, checkpoint: Path) -> None:
        """A checkpoint resumes only under the plan it was written with (its optimizer
        state is split as that plan's layouts split it)."""
        if self.plan is None:
            return
        state = json.loads((checkpoint / "controller.json").read_text())
        p = self.plan
        now = plan_to_dict(p.ctx, p.plan, p.mode, None)["calls"]
        if "plan" in state and state["plan"] != now:
            changed = sorted(k for k in now if now[k] != state["plan"].get(k))
            raise RunError(
                f"the checkpoint {checkpoint} was written under another plan (calls "
                f"{changed} differ from plan={p.mode}). Fix: resume with the plan it used, "
                f"plan=file plan.path={self.paths.root / 'plan.json'}, or start a new run.name"
            )

    def final_metrics(self) -> dict[str, float]:
        from orchestrator.run.tracking import read_metrics

        last: dict[str, float] = {}
        for row in read_metrics(self.paths.root / "metrics.jsonl"):
            if row.get("stage") == "rl":
                last.update({k: v for k, v in row.items() if k.startswith(("eval/", "rollout/"))})
        return last

    def resume_point(self) -> Path | None:
        r = self.cfg.run.resume
        if r == "never":
            return None
        if r == "auto":
            return self.ckpt.newest_valid()
        problems = self.ckpt.verify(Path(r))
        if problems:
            raise RunError(
                f"run.resume = {r!r} is not a complete checkpoint: {'; '.join(problems)}"
            )
        return Path(r)

    def stop_on_reward_error(
        self,
        step: int,
        reason: str,
        runtime: RoleWorkers | PlannedRoles,
        trainable: list[str],
        kl_ctl: Any,
        skipped: int,
    ) -> None:
        """reward.on_error=stop: checkpoint the state before this step (nothing of the step
        was applied), then raise RunError naming the cause and the fixes."""
        newest = self.ckpt.newest_valid()
        if self.saved_step != step - 1 or newest is None:
            newest = self.save_checkpoint(step - 1, runtime, trainable, kl_ctl, skipped)
        raise RunError(
            f"step {step}: {reason}. reward.on_error = 'stop': the run stopped with its "
            f"checkpoint {newest} (step {step - 1}). Fix: correct the reward, then run the same "
            "command (resume=auto continues from that checkpoint), or pass reward.on_error=skip "
            "to skip such steps"
        )

    def save_checkpoint(
        self,
        step: int,
        runtime: RoleWorkers | PlannedRoles,
        trainable: list[str],
        kl_ctl: Any,
        skipped: int = 0,
    ) -> Path:
        tmp = self.ckpt.begin(step)
        runtime.save(tmp, trainable)
        state = {
            "step": step,
            "skipped_steps": skipped,
            "data_position_prompts": step * self.cfg.train.rollout_batch_prompts,
            "kl_controller": kl_ctl.state_dict(),
            "wandb_id": self.wandb_id,
            "config": to_dict(self.cfg),
        }
        if self.plan is not None:
            p = self.plan
            state["plan"] = plan_to_dict(p.ctx, p.plan, p.mode, None)["calls"]
        write_atomic(tmp / "controller.json", json.dumps(state, indent=1))
        torch.save(
            {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
            tmp / "rng.pt",
        )
        committed = self.ckpt.commit(tmp, step)
        self.saved_step = step
        return committed
