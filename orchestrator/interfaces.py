"""What each MFC interface does on the worker that hosts its role.

An interface is a function (ctx, batch, options) -> (outputs, metrics). The graph's MFC
names the interface; the worker looks it up here. Losses and advantages come from
algos/ (the math lives only there).

Shape legend: B = sequences, P = prompt tokens, T = response tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from algos.losses import (
    aggregate_loss,
    bradley_terry_loss,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    masked_mean,
    policy_loss_tokens,
    reinforce_loss_tokens,
)
from algos.losses import value_loss as ppo_value_loss
from algos.ppo import ppo_rollout_advantages
from algos.rewards import kl_estimate
from algos.reweight import (
    in_warmup,
    per_sample_token_mean,
    sample_weights,
    weighted_token_loss,
)
from orchestrator.batch import (
    Batch,
    full_sequence,
    minibatches,
    response_logits,
    response_logprobs,
    response_values,
)
from orchestrator.engines import (
    GenerationEngine,
    SamplingParams,
    TrainEngine,
    is_stop,
    micro_per_rank,
)
from orchestrator.user_data import call_reward_function, check_finite

Metrics = dict[str, float]


@dataclass
class WorkerContext:
    """What a worker holds for its role: the module, engines, tokenizer and task."""

    role: str
    module: torch.nn.Module | None
    tokenizer: Any
    task: Any
    train: TrainEngine | Any = None  # TrainEngine, or TensorParallelTrainEngine (tp > 1)
    generator: GenerationEngine | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    reward_function: str | None = None  # 'file.py:name': the user's reward, called per sample
    reward_fn: Callable[[str, str], float] | None = None


Interface = Callable[[WorkerContext, Batch, Mapping[str, Any]], tuple[Batch, Metrics]]
INTERFACES: dict[str, Interface] = {}


def interface(name: str) -> Callable[[Interface], Interface]:
    def register(fn: Interface) -> Interface:
        if name in INTERFACES:
            raise ValueError(f"interface '{name}' is registered twice")
        INTERFACES[name] = fn
        return fn

    return register


def get_interface(name: str) -> Interface:
    if name not in INTERFACES:
        raise KeyError(f"unknown interface '{name}'; registered: {sorted(INTERFACES)}")
    return INTERFACES[name]


def canonical(batch: Batch, options: Mapping[str, Any], names: tuple[str, ...]) -> Batch:
    """The call's inputs under canonical names, by position: a call may read, say,
    (unique_prompt_ids, unique_prompt_mask, greedy_response_ids, greedy_response_mask)
    where the interface reads (prompt_ids, prompt_mask, response_ids, response_mask)."""
    inputs = tuple(options.get("inputs", names))
    return {name: batch[key] for name, key in zip(names, inputs)}


def outputs_as(options: Mapping[str, Any], values: list[torch.Tensor]) -> Batch:
    """Name an interface's outputs after the call's declared output keys, in order."""
    return dict(zip(options["outputs"], values))


def _module(ctx: WorkerContext) -> torch.nn.Module:
    if ctx.module is None:
        raise RuntimeError(f"role '{ctx.role}' holds no model")
    return ctx.module


@interface("generate")
def generate(ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]) -> tuple[Batch, Metrics]:
    """Sample (or, with option greedy, decode greedily) responses. A call that declares a
    third output also gets the log-probs from the same forward pass the trainer uses."""
    if ctx.generator is None:
        raise RuntimeError(f"role '{ctx.role}' has no generation engine")
    params: SamplingParams = options["sampling"]
    if options.get("greedy"):
        params = replace(params, greedy=True)
    prompts = canonical(batch, options, ("prompt_ids", "prompt_mask"))
    gen = ctx.generator.generate(prompts["prompt_ids"], prompts["prompt_mask"], params)
    response_ids, response_mask = gen.response_ids, gen.response_mask
    out = [response_ids, response_mask]
    prefix = options.get("metric_prefix", "rollout/")
    metrics: Metrics = {}
    if len(options["outputs"]) > 2:
        full = {**prompts, "response_ids": response_ids, "response_mask": response_mask}
        module = _module(ctx)
        module.eval()
        with torch.no_grad():
            trainer = response_logprobs(module, full, params.temperature)
        out.append(trainer)
        if gen.logprobs is not None:  # the sampler is another engine: how far apart?
            diff = (gen.logprobs - trainer).abs() * response_mask
            tokens = response_mask.sum().clamp(min=1)
            metrics[f"{prefix}logprob_diff"] = float(diff.sum() / tokens)
            metrics[f"{prefix}logprob_diff_max"] = float(diff.max())
    lengths = response_mask.sum(-1).float()
    # a response stopped if its last token is eos or a stop token (else it was cut)
    last = response_ids.gather(1, (response_mask.sum(-1, keepdim=True) - 1).clamp(min=0))
    stopped = is_stop(last.squeeze(1), (ctx.tokenizer.eos_token_id, *params.stop_token_ids))
    metrics[f"{prefix}response_length_mean"] = float(lengths.mean())
    metrics[f"{prefix}truncated_frac"] = float(1 - stopped.float().mean())
    return outputs_as(options, out), metrics


@interface("logprobs")
def logprobs(ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]) -> tuple[Batch, Metrics]:
    module = _module(ctx)
    module.eval()
    with torch.no_grad():
        lp = response_logprobs(module, batch, options.get("temperature", 1.0))
    return outputs_as(options, [lp]), {}


@interface("values")
def values(ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]) -> tuple[Batch, Metrics]:
    module = _module(ctx)
    module.eval()
    with torch.no_grad():
        v = response_values(module, batch)
    return {"values": v}, {}


def decode_pairs(tokenizer: Any, batch: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    from orchestrator.modeling import decode_responses

    prompts = tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    responses = decode_responses(tokenizer, batch["response_ids"])
    return [p.replace(" ", "") for p in prompts], responses


def sequence_scores(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Reward-model scores [B]: the scalar head's output at the last valid token of
    prompt + response (the last prompt token if the response is empty)."""
    ids, attn, pos = full_sequence(batch)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos)
    last = batch["prompt_ids"].shape[1] - 1 + batch["response_mask"].sum(-1)
    return out.logits[:, :, 0].float().gather(1, last.long()[:, None]).squeeze(1)


@interface("reward")
def reward(ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]) -> tuple[Batch, Metrics]:
    """Scores from the role's reward model, or from the task's verifier if the role holds
    no model; the verifier's exact-match flags (task accuracy) are returned either way."""
    b = canonical(batch, options, ("prompt_ids", "prompt_mask", "response_ids", "response_mask"))
    prompts, responses = decode_pairs(ctx.tokenizer, b)
    device = b["response_ids"].device
    pairs = list(zip(prompts, responses))
    verifier = torch.tensor([ctx.task.reward(p, r) for p, r in pairs], device=device).float()
    correct = torch.tensor([float(ctx.task.correct(p, r)) for p, r in pairs], device=device)
    if ctx.reward_fn is not None:
        spec = str(ctx.reward_function)
        values = call_reward_function(ctx.reward_fn, spec, pairs)
        scores = torch.tensor(values, device=device, dtype=torch.float32)
        source = f"reward.function {spec}"
    elif ctx.module is None:
        scores, source = verifier, "the task's verifier"
    else:
        ctx.module.eval()
        with torch.no_grad():
            scores = sequence_scores(ctx.module, b)
        source = "the reward model"
    check_finite(scores.tolist(), pairs, source)
    prefix = options.get("metric_prefix", "rollout/")
    metrics = {
        f"{prefix}reward_mean": float(scores.mean()),
        f"{prefix}reward_min": float(scores.min()),
        f"{prefix}reward_max": float(scores.max()),
        f"{prefix}task_accuracy": float(correct.mean()),
        f"{prefix}verifier_reward_mean": float(verifier.mean()),
    }
    return outputs_as(options, [scores, correct.float()]), metrics


def _rollout_targets(
    batch: Batch, options: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    a = options["algo"]
    values = batch.get("values")  # critic-free graphs have none
    n = int(options.get("samples_per_prompt", 1))
    b = batch["response_ids"].shape[0]
    group_ids = torch.arange(b // n, device=batch["response_ids"].device).repeat_interleave(n)
    baseline = batch.get("baseline_scores")  # ReMax: one greedy reward per distinct prompt
    return ppo_rollout_advantages(
        batch["logprobs"],
        batch["ref_logprobs"],
        values if values is not None else torch.zeros_like(batch["logprobs"]),
        batch["scores"],
        batch["response_mask"],
        kl_coef=0.0 if a.kl_in_loss else options["kl_coef"],  # KL as a loss term instead
        kl_estimator=a.kl_estimator,
        reward_clip=a.reward_clip,
        estimator=a.advantage_estimator,
        gamma=a.gamma,
        lam=a.lam,
        whiten=a.whiten_advantages,
        group_ids=group_ids,
        baseline_scores=baseline.repeat_interleave(n) if baseline is not None else None,
    )


def _mean_metrics(rows: list[Metrics]) -> Metrics:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


@dataclass(frozen=True)
class Reweighting:
    """Loss-based sample reweighting of one train call (Sow et al. 2025): per mini-batch,
    weights from each sample's detached difficulty (`difficulty(module, mini)` -> [N])."""

    strategy: str
    temperature: float
    warmup_steps: int
    difficulty: Callable[[torch.nn.Module, Batch], torch.Tensor]

    def weights(self, module: torch.nn.Module, mini: Batch, step: int) -> torch.Tensor | None:
        """Weights [N] summing to 1, or None where the plain loss applies (uniform)."""
        if self.strategy == "uniform" or in_warmup(step, self.warmup_steps):
            return None
        with torch.no_grad():
            losses = self.difficulty(module, mini).float()
        return sample_weights(losses, self.strategy, self.temperature)


def _reweighting(
    options: Mapping[str, Any], difficulty: Callable[[torch.nn.Module, Batch], torch.Tensor]
) -> Reweighting | None:
    rw = options.get("reweight")
    if rw is None:
        return None
    return Reweighting(rw.strategy, rw.temperature, rw.warmup_steps, difficulty)


@dataclass(frozen=True)
class SliceWeights:
    """A micro-batch's slice of its mini-batch's sample weights, with the mini-batch's
    totals, so that the micro-batches' weighted losses add up to the mini-batch's."""

    weights: torch.Tensor  # [n] this slice's weights (the mini-batch's sum to 1)
    total_tokens: float  # valid tokens (or samples, for a per-sample loss) of the mini-batch
    num_samples: int  # N, samples in the mini-batch

    def loss(self, per_sample: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """N sum_i w_i (n_i / total) l_i over this slice (per_sample l_i, counts n_i: [n])."""
        return weighted_token_loss(
            per_sample, counts, self.weights, self.total_tokens, self.num_samples
        )


LossFn = Callable[[torch.nn.Module, Batch, "SliceWeights | None"], tuple[torch.Tensor, Metrics]]


def _train_loop(
    ctx: WorkerContext,
    batch: Batch,
    options: Mapping[str, Any],
    epochs: int,
    loss_fn: LossFn,
    token_mean: bool,
    reweighting: Reweighting | None = None,
) -> list[Metrics]:
    """Epochs over shuffled mini-batches, each accumulated over micro-batches.

    DeepSpeed averages the micro-batch losses of a mini-batch (and the gradients of its
    data-parallel ranks). A token-mean loss is rescaled by (micro tokens / mini tokens) x
    micro-batches x dp ranks, so the mini-batch's gradient is that of sum(l m) / sum(m)
    over the whole mini-batch, not a mean of micro means. With reweighting, loss_fn gets
    each micro-batch's slice of the mini-batch's weights and returns its share of the
    mini-batch's weighted loss (scaled by micro-batches x dp ranks).
    """
    engine = ctx.train
    if engine is None:
        raise RuntimeError(f"role '{ctx.role}' is not trainable")
    engine.module.train()
    gen = torch.Generator().manual_seed(int(options["seed"]))
    step = int(options.get("step", 0))
    # a planned call's data-parallel rank: every rank sees the whole batch (so advantages,
    # mini-batches and sample weights are those of the whole batch) and trains on its
    # share of each mini-batch; DeepSpeed averages the ranks' gradients
    dp_rank, dp = int(options.get("dp_rank", 0)), int(options.get("dp_size", 1))
    micro_size = micro_per_rank(engine.spec, dp)
    rows: list[Metrics] = []
    for _ in range(epochs):
        for mini in minibatches(batch, engine.spec.mini_batch_samples, gen):
            weights = reweighting.weights(engine.module, mini, step) if reweighting else None
            n = next(iter(mini.values())).shape[0]
            share = torch.arange(n).chunk(dp)[dp_rank]
            mini_tokens = float(mini["response_mask"].sum().clamp(min=1)) if token_mean else n
            for micro_index in share.split(micro_size):
                micro = {k: v[micro_index.to(v.device)] for k, v in mini.items()}
                w = None
                if weights is not None:
                    w = SliceWeights(weights[micro_index.to(weights.device)], mini_tokens, n)
                loss, m = loss_fn(engine.module, micro, w)
                if w is not None:
                    loss = loss * (engine.gas * dp)
                elif token_mean and (engine.gas > 1 or dp > 1):
                    micro_tokens = float(micro["response_mask"].sum())
                    loss = loss * (micro_tokens / mini_tokens * engine.gas * dp)
                if weights is not None:
                    m["train/sample_weight_max"] = float(weights.max()) * n
                engine.backward(loss)
                m.update({f"train/{k}_{ctx.role}": v for k, v in engine.step().items()})
                rows.append(m)
    return rows


def _policy_difficulty(batch: Batch, advantages: torch.Tensor, proxy: str) -> torch.Tensor:
    """A per-sample difficulty [B], fixed once per rollout: the response's mean negative
    log-likelihood under the behaviour policy (nll) or its mean |advantage|."""
    mask = batch["response_mask"].float()
    if proxy == "nll":
        return per_sample_token_mean(-batch["logprobs"], mask)[0]
    return per_sample_token_mean(advantages.abs(), mask)[0]


@dataclass
class PolicyForward:
    """The actor's view of a micro-batch: log-probs of the taken tokens and the
    distribution they come from, plus any auxiliary loss of the policy head."""

    logprobs: torch.Tensor  # [B, T]
    logits: torch.Tensor  # [B, T, V] (normalised log-probs for a mixture)
    aux_loss: torch.Tensor | float = 0.0
    metrics: Metrics = field(default_factory=dict)


def policy_forward(
    module: torch.nn.Module, mb: Batch, options: Mapping[str, Any], q_targets: torch.Tensor
) -> PolicyForward:
    """A plain policy's forward, or a PMOE policy's: mixture log-probs (router detached;
    with best_expert_only the gradient reaches only each token's best expert, picked by
    the expected Q under each expert), plus the router's regression on the best expert
    and the Q head's regression on `q_targets` [B, T] (the returns)."""
    pol = options.get("policy")
    if pol is None or pol.kind == "plain" or pol.num_experts == 1:
        logits = response_logits(module, mb, options.get("temperature", 1.0))
        return PolicyForward(logprobs_from_logits(logits, mb["response_ids"]), logits)
    from algos.pmoe import (
        best_expert_from_q,
        best_only_mixture_log_probs,
        mixture_log_probs,
        q_loss,
        router_loss,
    )

    ids, attn, pos = full_sequence(mb)
    p, t = mb["prompt_ids"].shape[1], mb["response_ids"].shape[1]
    out = module.pmoe_outputs(ids, attn, pos)
    cut = slice(p - 1, p + t - 1)
    elp, log_router = out.expert_log_probs[:, cut], out.log_router[:, cut]
    router_probs, q = out.router_probs[:, cut], out.q_values[:, cut]
    mask = mb["response_mask"].float()
    best = best_expert_from_q(elp.detach(), q.detach())
    if pol.best_expert_only:
        mix = best_only_mixture_log_probs(elp, log_router, best)
    else:
        mix = mixture_log_probs(elp, log_router.detach())
    r_loss = router_loss(router_probs, best, mask)
    qv_loss = q_loss(q, mb["response_ids"], q_targets, mask)
    usage = torch.bincount(best[mask.bool()].flatten(), minlength=module.num_experts).float()
    return PolicyForward(
        logprobs_from_logits(mix, mb["response_ids"]),
        mix,
        pol.router_coef * r_loss + pol.q_coef * qv_loss,
        {
            "train/router_loss": float(r_loss.detach()),
            "train/q_loss": float(qv_loss.detach()),
            "train/best_expert_share_max": float(usage.max() / usage.sum().clamp(min=1)),
        },
    )


@interface("ppo_actor_train")
def ppo_actor_train(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    """The actor's update: clipped PPO ratio loss (PPO, GRPO, RLOO) or REINFORCE (ReMax),
    with optional KL loss, entropy bonus, PMOE head and difficulty-based reweighting."""
    a = options["algo"]
    advantages, returns, rollout_metrics = _rollout_targets(batch, options)
    batch = {**batch, "advantages": advantages, "returns": returns}
    reweighting = None
    proxy = options["reweight"].policy_proxy if options.get("reweight") else "none"
    if proxy != "none":
        batch["difficulty"] = _policy_difficulty(batch, advantages, proxy)
        reweighting = _reweighting(options, lambda module, mini: mini["difficulty"])

    def loss_fn(
        module: torch.nn.Module, mb: Batch, w: SliceWeights | None
    ) -> tuple[torch.Tensor, Metrics]:
        mask = mb["response_mask"].float()
        fwd = policy_forward(module, mb, options, mb["returns"])
        lp = fwd.logprobs
        if a.policy_loss == "reinforce":
            loss_mat = reinforce_loss_tokens(lp, mb["advantages"])
            m = {
                "approx_kl": float(masked_mean((mb["logprobs"] - lp).detach(), mask)),
                "return_mean": float(masked_mean(mb["advantages"], mask)),
            }
        else:
            loss_mat, m = policy_loss_tokens(
                lp,
                mb["logprobs"],
                mb["advantages"],
                mask,
                clip_eps_low=a.clip_eps_low,
                clip_eps_high=a.clip_eps_high,
                dual_clip_c=a.dual_clip_c,
            )
        if w is None:
            loss = aggregate_loss(loss_mat, mask, a.loss_agg)
        else:
            loss = w.loss(*per_sample_token_mean(loss_mat, mask))
        ent = aggregate_loss(entropy_from_logits(fwd.logits), mask, a.loss_agg)
        total = loss - a.entropy_coef * ent + fwd.aux_loss
        if a.kl_in_loss:  # coef * mean of k3(pi || ref) over the valid tokens
            kl_loss = aggregate_loss(kl_estimate(lp, mb["ref_logprobs"], "k3"), mask, a.loss_agg)
            total = total + options["kl_coef"] * kl_loss
            m["kl_loss"] = float(kl_loss.detach())
        return total, {
            "loss/policy": float(loss.detach()),
            "train/entropy": float(ent.detach()),
            **{f"train/{k}": float(v) for k, v in m.items()},
            **fwd.metrics,
        }

    token_mean = a.loss_agg == "token-mean"
    rows = _train_loop(ctx, batch, options, a.ppo_epochs, loss_fn, token_mean, reweighting)
    metrics = _mean_metrics(rows)
    metrics.update(rollout_metrics)
    metrics["rollout/kl_coef"] = float(options["kl_coef"])
    return {}, metrics


@interface("ppo_critic_train")
def ppo_critic_train(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    a = options["algo"]
    _, returns, _ = _rollout_targets(batch, options)
    batch = {**batch, "returns": returns, "old_values": batch["values"]}
    ev = explained_variance(batch["values"], returns, batch["response_mask"].float())

    def loss_fn(
        module: torch.nn.Module, mb: Batch, w: SliceWeights | None
    ) -> tuple[torch.Tensor, Metrics]:
        mask = mb["response_mask"].float()
        v = response_values(module, mb)
        loss, m = ppo_value_loss(
            v,
            mb["old_values"],
            mb["returns"],
            mask,
            clip_eps=a.value_clip_eps,
            loss_agg=a.loss_agg,
        )
        return loss, {
            "loss/value": float(loss.detach()),
            **{f"train/{k}": float(x) for k, x in m.items()},
        }

    token_mean = a.loss_agg == "token-mean"
    metrics = _mean_metrics(_train_loop(ctx, batch, options, a.ppo_epochs, loss_fn, token_mean))
    metrics["train/explained_variance"] = float(ev)
    return {}, metrics


def _sft_token_losses(module: torch.nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL [B, T] of the demonstration's response, and the logits [B, T, V]."""
    logits = response_logits(module, mb)
    return -logprobs_from_logits(logits, mb["response_ids"]), logits


@interface("sft_train")
def sft_train(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    """Negative log-likelihood of the demonstration's response tokens (token mean), or its
    loss-based reweighting over the mini-batch's samples."""

    def difficulty(module: torch.nn.Module, mb: Batch) -> torch.Tensor:
        return per_sample_token_mean(_sft_token_losses(module, mb)[0], mb["response_mask"])[0]

    def loss_fn(
        module: torch.nn.Module, mb: Batch, w: SliceWeights | None
    ) -> tuple[torch.Tensor, Metrics]:
        mask = mb["response_mask"].float()
        nll, logits = _sft_token_losses(module, mb)
        plain = masked_mean(nll, mask)
        loss = plain if w is None else w.loss(*per_sample_token_mean(nll, mask))
        acc = masked_mean((logits.argmax(-1) == mb["response_ids"]).float(), mask)
        return loss, {"loss/sft": float(plain.detach()), "train/sft_token_accuracy": float(acc)}

    rows = _train_loop(ctx, batch, options, 1, loss_fn, True, _reweighting(options, difficulty))
    return {}, _mean_metrics(rows)


def _pair_losses(module: torch.nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry loss per pair -log sigmoid(r_chosen - r_rejected) [B], and the margin."""
    prompt = {"prompt_ids": mb["prompt_ids"], "prompt_mask": mb["prompt_mask"]}
    chosen = sequence_scores(
        module, {**prompt, "response_ids": mb["chosen_ids"], "response_mask": mb["chosen_mask"]}
    )
    rejected = sequence_scores(
        module,
        {**prompt, "response_ids": mb["rejected_ids"], "response_mask": mb["rejected_mask"]},
    )
    return bradley_terry_loss(chosen, rejected)


@interface("reward_model_train")
def reward_model_train(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    """Bradley-Terry training of a scalar reward head on the last valid token (mean over
    pairs, or its loss-based reweighting)."""

    def loss_fn(
        module: torch.nn.Module, mb: Batch, w: SliceWeights | None
    ) -> tuple[torch.Tensor, Metrics]:
        losses, margin = _pair_losses(module, mb)
        plain = losses.mean()
        loss = plain if w is None else w.loss(losses, torch.ones_like(losses))
        return loss, {
            "loss/reward_model": float(plain.detach()),
            "train/reward_accuracy": float((margin > 0).float().mean()),
            "train/reward_margin": float(margin.detach().mean()),
        }

    reweighting = _reweighting(options, lambda module, mb: _pair_losses(module, mb)[0])
    rows = _train_loop(ctx, batch, options, 1, loss_fn, False, reweighting)
    return {}, _mean_metrics(rows)


@interface("pair_accuracy")
def pair_accuracy(
    ctx: WorkerContext, batch: Batch, options: Mapping[str, Any]
) -> tuple[Batch, Metrics]:
    """Held-out preference accuracy of the reward model (share with r_chosen > r_rejected)."""
    module = _module(ctx)
    module.eval()
    with torch.no_grad():
        losses, margin = _pair_losses(module, batch)
    return {}, {
        "eval/reward_model_accuracy": float((margin > 0).float().mean()),
        "eval/reward_model_loss": float(losses.mean()),
    }
