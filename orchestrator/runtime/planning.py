"""The planner applied to a Relay config: the workload and cluster a config describes, the
plan each `plan.mode` makes for it, and whether this runtime can execute that plan.

`relay plan` and `relay train` both call `make_plan`, so a run plans with the same code
and inputs as `relay plan`. per_role, symmetric and heuristic plans are deterministic;
the search stops on wall-clock time, so two searches with one seed can differ: the plan
a run used is in its run folder (plan.json), and `plan=file plan.path=<a plan file>`
runs exactly the plan a file holds.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from algos.graph import CallKind, DataflowGraph
from algos.ppo import ALGORITHM_GRAPHS, reward_model_graph, sft_graph
from orchestrator.config.schema import ConfigError, Problem, RelayConfig, generation_backend
from planner.catalogue import (
    MODEL_SHAPES,
    Cluster,
    ModelShape,
    device_kind,
    shape_from_hf_config,
)
from planner.measured import CallProfile, read_call_profile
from planner.plan import (
    Assignment,
    Context,
    Estimate,
    evaluate,
    load_plan_file,
    replicas,
    validate,
)
from planner.search import SearchResult, heuristic, mcmc, per_role, symmetric
from planner.workload import Workload, rl_shapes, without_roles, workload_from_graph


def planned_graph(cfg: RelayConfig) -> DataflowGraph:
    if cfg.plan.graph == "sft":
        return sft_graph()
    if cfg.plan.graph == "reward_model":
        return reward_model_graph()
    return ALGORITHM_GRAPHS[cfg.algo.name]()


def model_shape(cfg: RelayConfig) -> ModelShape:
    """The run's own model: its Hugging Face folder's config, or the size preset with the
    task's character vocabulary (4 special tokens + the task's alphabet)."""
    if cfg.model.path is not None:
        hf = json.loads((Path(cfg.model.path) / "config.json").read_text())
        return shape_from_hf_config(Path(cfg.model.path).name, hf)
    from orchestrator.data.tasks import make_task
    from orchestrator.models.hf import MODEL_PRESETS

    task = make_task(cfg.task.name, cfg.task.num_digits)
    vocab = 4 + len(set(task.alphabet()))
    return shape_from_hf_config(cfg.model.preset, {**MODEL_PRESETS[cfg.model.preset],
                                                   "vocab_size": vocab})  # fmt: skip


def longest_prompt(cfg: RelayConfig) -> int:
    """Tokens of the longest prompt of data.train_files (as encoded: template or bos
    included): batches are padded to their longest prompt."""
    d = cfg.data
    return _longest(tuple(d.train_files or ()), str(cfg.model.path), d.prompt_key, d.label_key,
                    d.chat, d.chat_template)  # fmt: skip


@functools.lru_cache(maxsize=4)
def _longest(files: tuple[str, ...], model: str, prompt_key: str, label_key: str, chat: str,
             template: str | None) -> int:  # fmt: skip
    from transformers import AutoTokenizer

    from orchestrator.data.prompts import Encoder, read_prompts

    tok = AutoTokenizer.from_pretrained(model)
    report = read_prompts(list(files), tok, prompt_key, label_key, chat, template, "filter",
                          1 << 30)  # every row, however long  # fmt: skip
    enc = Encoder(tok, chat, template)
    return max((enc.prompt_tokens(r.text, r.templated) for r in report.rows), default=1)


def workload(cfg: RelayConfig) -> Workload:
    graph = planned_graph(cfg)
    own = model_shape(cfg)
    actor = MODEL_SHAPES[cfg.plan.actor_shape] if cfg.plan.actor_shape else own
    critic = MODEL_SHAPES[cfg.plan.critic_shape] if cfg.plan.critic_shape else own
    if cfg.plan.prompt_tokens is not None:
        prompt = cfg.plan.prompt_tokens
    elif cfg.data.train_files and cfg.model.path is not None:
        prompt = longest_prompt(cfg)
    else:
        from orchestrator.data.tasks import make_task

        prompt = make_task(cfg.task.name, cfg.task.num_digits).max_prompt_chars + 1  # + bos
    gen = cfg.generate.max_new_tokens
    t = cfg.train
    common = dict(prompt_tokens=prompt, gen_tokens=gen, zero_stage=t.zero_stage)
    if cfg.plan.graph == "sft":
        return workload_from_graph(graph, {"actor": actor}, prompts=cfg.sft.batch_samples,
                                   samples_per_prompt=1, mini_batches=1, **common)  # fmt: skip
    if cfg.plan.graph == "reward_model":
        return workload_from_graph(graph, {"reward": critic.as_critic()},
                                   prompts=cfg.reward.batch_pairs, samples_per_prompt=2,
                                   mini_batches=1, **common)  # fmt: skip
    samples = t.rollout_batch_prompts * t.samples_per_prompt
    wl = workload_from_graph(
        graph,
        rl_shapes(graph, actor, critic),
        prompts=t.rollout_batch_prompts,
        samples_per_prompt=t.samples_per_prompt,
        mini_batches=max(samples // t.mini_batch_samples, 1),
        ppo_epochs=cfg.algo.ppo_epochs,
        **common,
    )
    if cfg.reward.source in ("verifier", "function"):  # Python code: no model to place
        wl = without_roles(wl, {"reward"})
    return wl


def cluster(cfg: RelayConfig) -> Cluster:
    """The config's cluster. A CPU device slot gets its share of this host's memory and,
    when the node's slots run more threads than the host has cores, its share of the
    cores: the profile measures one thread alone, and slots that compute at once share
    the cores (4 one-thread slots on 2 cores: each computes at half the rate)."""
    c = cfg.cluster
    name = c.device_kind or ("cpu" if c.device == "cpu" else "h100-sxm")
    kind = device_kind(name, c.profile)
    if name == "cpu":
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        share = min(1.0, (os.cpu_count() or 1) / (c.devices_per_node * c.threads_per_device))
        kind = replace(kind, memory_bytes=host / c.devices_per_node,
                       flops_s=kind.flops_s * share, mem_bytes_s=kind.mem_bytes_s * share,
                       decode_step_overhead_s=kind.decode_step_overhead_s / share)  # fmt: skip
    return Cluster(c.num_nodes, c.devices_per_node, kind)


def context(cfg: RelayConfig) -> Context:
    wl, c = workload(cfg), cfg.cluster
    measured = call_profile(cfg, wl)
    return Context(wl, cluster(cfg), iterations=cfg.plan.iterations,
                   max_pp=cfg.plan.max_pp, offload=cfg.plan.offload,
                   fuse=cfg.plan.fuse_calls, measured=measured,
                   threads_per_device=c.threads_per_device,
                   auto_threads=c.call_threads == "auto")  # fmt: skip


def job_identity(cfg: RelayConfig, wl: Workload) -> dict[str, object]:
    """What a `relay profile --calls` file's times are of: the graph, the roles' models,
    every call's batch and lengths, the generation backend and the cluster's slots."""
    c = cfg.cluster
    return {
        "graph": wl.graph,
        "roles": {r: [x.shape.layers, x.shape.hidden, x.shape.vocab] for r, x in wl.roles.items()},
        "calls": {
            w.name: [w.batch_seqs, w.prompt_tokens, w.gen_tokens, w.optimizer_steps]
            for w in wl.calls
        },  # fmt: skip
        "zero_stage": wl.zero_stage,
        "generate_backend": generation_backend(cfg),
        "devices_per_node": c.devices_per_node,
        "threads_per_device": c.threads_per_device,
        "call_threads": c.call_threads,
        "fuse_calls": cfg.plan.fuse_calls,
    }


def call_profile(cfg: RelayConfig, wl: Workload) -> CallProfile | None:
    """cluster.calls_profile, checked against the job (ConfigError if it is another's)."""
    path = cfg.cluster.calls_profile
    if path is None:
        return None
    prof = read_call_profile(path)
    mine = json.loads(json.dumps(job_identity(cfg, wl)))  # as the file holds it
    differ = sorted(k for k in set(mine) | set(prof.job) if mine.get(k) != prof.job.get(k))
    if differ:
        raise ConfigError([Problem(
            "cluster.calls_profile", path,
            f"it measured another job (differs in {', '.join(differ)})",
            "measure this job: `relay profile --calls <the same overrides>`, or drop it")])  # fmt: skip
    return prof


@dataclass
class PlanResult:
    mode: str
    ctx: Context
    plan: dict[str, Assignment]
    estimate: Estimate
    search: SearchResult | None = None
    reason: str = ""  # why plan.mode=auto chose this mode, or what the search weighed


def make_plan(
    cfg: RelayConfig,
    mode: str | None = None,
    ctx: Context | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> PlanResult:
    """The plan of `mode` (default cfg.plan.mode), validated; raises ConfigError naming
    plan.* fields when the mode finds no plan or the plan cannot run."""
    mode = mode or cfg.plan.mode
    ctx = ctx or context(cfg)
    if mode == "auto":
        return _auto(cfg, ctx)
    search = None
    if mode == "file":
        from planner.plan import PlanError

        try:
            plan: dict[str, Assignment] | None = load_plan_file(str(cfg.plan.path))
        except PlanError as e:
            raise ConfigError([Problem(f"plan.path ({p.field})", p.value, p.rule, p.fix)
                               for p in e.problems]) from None  # fmt: skip
    elif mode == "symmetric":
        plan = symmetric(ctx)
    elif mode == "heuristic":
        plan = heuristic(ctx)
    elif mode == "per_role":
        plan = per_role(ctx)
    else:
        try:
            search = mcmc(ctx, seed=cfg.plan.seed, time_budget_s=cfg.plan.search_time_s,
                          progress=progress)  # fmt: skip
            plan = search.plan
        except ValueError as e:  # a call that fits on no mesh at all
            raise ConfigError([Problem("plan.mode", mode, f"{e} ({ctx.cluster.describe()})",
                                       _no_plan_fix(ctx, mode))]) from None  # fmt: skip
    if plan is None:
        raise ConfigError([Problem("plan.mode", mode, _no_plan_rule(ctx, mode),
                                   _no_plan_fix(ctx, mode))])  # fmt: skip
    problems = validate(ctx, plan)
    if problems:
        field = "plan.path" if mode == "file" else "plan.mode"
        raise ConfigError([Problem(f"{field} -> {p.field}", p.value, p.rule, p.fix)
                           for p in problems])  # fmt: skip
    estimate = evaluate(ctx, plan)
    why = ""
    if search is not None:
        plan, estimate, why = _keep_or_fall_back(cfg, ctx, plan, estimate, search)
    return PlanResult(mode, ctx, plan, estimate, search, why)


def _keep_or_fall_back(
    cfg: RelayConfig,
    ctx: Context,
    plan: dict[str, Assignment],
    estimate: Estimate,
    search: SearchResult,
) -> tuple[dict[str, Assignment], Estimate, str]:
    """The searched plan if it is estimated at least plan.min_gain faster than the
    best-estimated hand-made plan, else that plan (a gain smaller than the cost model's
    error is not a gain a run can count on); with why: the hand-made plans' estimates,
    what the costs come from, how much was searched and which plan was kept."""
    hand = {m: (p, evaluate(ctx, p)) for m, p in hand_made_plans(ctx).items()}
    shown = [f"{m} {e.time_per_iteration_s:.3g} s" for m, (_, e) in hand.items()]
    source = (f"call times measured by `relay profile --calls` ({cfg.cluster.calls_profile})"
              if ctx.measured is not None
              else "roofline costs (cluster.calls_profile unset: `relay profile --calls` "
                   "measures this job's calls)")  # fmt: skip
    others = f"the hand-made plans estimate {', '.join(shown)}; " if shown else ""
    why = f"{others}{source}; {search.evaluated} plans costed in {search.elapsed_s:.0f} s"
    if not hand:
        return plan, estimate, why
    best = min(hand, key=lambda m: hand[m][1].time_per_iteration_s)
    mine, theirs = estimate.time_per_iteration_s, hand[best][1].time_per_iteration_s
    gain = 1 - mine / theirs if theirs > 0 else 0.0
    need = cfg.plan.min_gain
    if plan == hand[best][0]:
        return plan, estimate, f"{why}; the search found nothing faster than {best}'s plan"
    if gain >= need:
        kept = f"{why}; the searched plan is estimated {gain:.0%} faster than {best}"
        return plan, estimate, kept
    fell = (f"{why}; the best searched plan ({mine:.3g} s) is estimated {gain:.0%} faster than "
            f"{best}, under plan.min_gain={need:g}: running {best}'s plan")  # fmt: skip
    return hand[best][0], hand[best][1], fell


def _auto(cfg: RelayConfig, ctx: Context) -> PlanResult:
    """plan.mode=auto: the per-role placement where every role has a device of its own
    and fits there, else the symmetric plan (every call over all devices; on one device,
    every role on it)."""
    n, roles = ctx.cluster.num_devices, len(ctx.workload.roles)
    if per_role(ctx) is not None:
        result = make_plan(cfg, "per_role", ctx)
        return replace(result, reason=f"auto: each of the {roles} roles on a device of its own")
    result = make_plan(cfg, "symmetric", ctx)
    why = f"{roles} roles share {n} device{'s' * (n != 1)}"
    return replace(result, reason=f"auto: {why}")


def hand_made_plans(ctx: Context) -> dict[str, dict[str, Assignment]]:
    """The deterministic plan modes' valid plans for `ctx`, by mode."""
    out = {}
    for mode, make in (("symmetric", symmetric), ("heuristic", heuristic), ("per_role", per_role)):
        plan = make(ctx)
        if plan is not None and not validate(ctx, plan):
            out[mode] = plan
    return out


def fitting_modes(ctx: Context) -> list[str]:
    """The deterministic plan modes that find a valid plan for `ctx` (the search is left
    out: it costs seconds, and finds a plan wherever symmetric or heuristic does)."""
    return list(hand_made_plans(ctx))


def _no_plan_fix(ctx: Context, mode: str) -> str:
    if mode == "file":
        return "check plan.path"
    fits = [m for m in fitting_modes(ctx) if m != mode]
    if mode == "per_role":
        fix = ("raise cluster.devices_per_node to one device per role, use a larger device "
               "kind, or smaller batches (train.rollout_batch_prompts)")  # fmt: skip
    else:
        fix = "use more devices, a higher train.zero_stage or smaller batches"
    if fits:
        others = " or ".join(f"plan={m}" for m in fits + ["search"])
        return f"{others} fit this cluster (roles share devices there); or {fix}"
    return fix


def _no_plan_rule(ctx: Context, mode: str) -> str:
    roles, n = len(ctx.workload.roles), ctx.cluster.num_devices
    where = f"{ctx.cluster.describe()}"
    if mode == "per_role" and roles > n:
        return f"per_role puts each of the {roles} roles on a device of its own; {where} has {n}"
    if mode == "per_role":
        return f"some role of {ctx.workload.graph} does not fit on one device of {where}"
    return f"no {mode} plan of {ctx.workload.graph} fits the memory of {where}"


def _pp_problems(result: PlanResult) -> list[Problem]:
    out = []
    for c in result.ctx.topo:
        a = result.plan[c.name]
        if a.layout.pp > 1:
            out.append(Problem(f"plan ({result.mode}): {c.name}", f"{a.mesh} {a.layout}",
                               "pipeline-parallel layouts (pp > 1) are simulation-only: the "
                               "planner costs them, Relay's runtime does not execute them",
                               "use a plan without pp > 1 (edit the plan file, plan=symmetric, "
                               "or plan=per_role); `relay plan` still shows its estimate"))  # fmt: skip
    return out


def runtime_problems(result: PlanResult, cfg: RelayConfig) -> list[Problem]:
    """Why this runtime cannot execute the plan for the config's run (empty: it can).
    (`validate` has checked that each call's dp ranks split its batch.)"""
    out = _pp_problems(result)
    from orchestrator.config.schema import generation_backend

    if generation_backend(cfg) == "vllm":
        gen = [c for c in result.ctx.topo if c.kind is CallKind.GENERATE]
        tps = sorted({result.plan[c.name].layout.tp for c in gen})
        if len(tps) > 1:
            out.append(Problem(f"plan ({result.mode})", {c.name: str(result.plan[c.name].layout)
                                                         for c in gen},
                               f"the generate calls use tensor parallel degrees {tps}; a plan's "
                               "vLLM engines share one (their process groups span every device)",
                               "give every generate call the same tp (edit the plan file), or "
                               "pass generate.backend=hf"))  # fmt: skip
    return out


def plan_for_run(cfg: RelayConfig) -> PlanResult:
    """The RL graph's plan under plan.mode (what `relay plan` prints for the same
    overrides), refused with a ConfigError if this runtime cannot execute it. A resumed
    plan=search run keeps the plan it searched (a search may differ run to run)."""
    rl = replace(cfg, plan=replace(cfg.plan, graph=None))
    searched = Path(cfg.run.output_dir) / cfg.run.name / "plan.json"
    if cfg.plan.mode == "search" and cfg.run.resume != "never" and searched.is_file():
        print(f"relay: plan=search: this run continues under the plan it searched ({searched})")
        rl = replace(rl, plan=replace(rl.plan, mode="file", path=str(searched)))
    result = make_plan(rl)
    problems = runtime_problems(result, cfg)
    if problems:
        raise ConfigError(problems)
    why = f" ({result.reason})" if result.reason else ""
    print(f"relay: plan={result.mode}{why}, estimated "
          f"{result.estimate.time_per_iteration_s:.3g} s per RL step (`relay plan` shows it)")  # fmt: skip
    if result.search is not None:  # a search may differ from `relay plan`'s: show this one
        for role, reps in replicas(result.ctx, result.plan).items():
            print(f"relay:   {role}: {'; '.join(reps)}")
    return result
