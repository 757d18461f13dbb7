"""The planner: simulator against hand-worked schedules, cost and memory against
hand-worked numbers, the reallocation comm plan executed on arrays, search against
exhaustive enumeration, and validation of every plan any mode emits."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from algos.graph import MFC, CallKind, DataflowGraph
from algos.ppo import group_baseline_graph, ppo_graph, remax_graph, reward_model_graph, sft_graph
from planner.catalogue import DEVICE_KINDS, MODEL_SHAPES, Cluster, DeviceKind, ModelShape
from planner.cost import Placement, forward_s, stage_params, train_state_bytes
from planner.layout import Layout, Mesh, is_valid_mesh, meshes
from planner.plan import (
    MEMORY_HEADROOM,
    Assignment,
    Context,
    _memory,
    evaluate,
    from_dict,
    memory_per_device,
    offloaded_roles,
    realloc_hooks,
    replicas,
    to_dict,
    validate,
)
from planner.realloc import comm_plan, model_tensors, stage_of, traffic
from planner.search import cost, exhaustive, heuristic, mcmc, search_space, symmetric
from planner.simulate import Task, list_schedule, makespan
from planner.workload import rl_shapes, workload_from_graph

H100 = DEVICE_KINDS["h100-sxm"]
SMALL = ModelShape("small", hidden=256, layers=4, heads=4, kv_heads=4, intermediate=768, vocab=64)


def ppo_ctx(nodes: int, per_node: int, actor: str = "llama2-7b", critic: str = "llama2-7b",
            graph=ppo_graph, kind: DeviceKind = H100, prompts: int = 64) -> Context:  # fmt: skip
    g = graph()
    wl = workload_from_graph(
        g, rl_shapes(g, MODEL_SHAPES[actor], MODEL_SHAPES[critic]), prompts=prompts,
        samples_per_prompt=1, prompt_tokens=128, gen_tokens=128, mini_batches=2, zero_stage=1,
    )  # fmt: skip
    return Context(wl, Cluster(nodes, per_node, kind))


# ------------------------------------------------------------------ simulator


def test_list_schedule_hand_worked() -> None:
    # A on d0-1 (2 s); C on d2-3 (3 s), no deps: both start at 0.
    # B on d0 after A: 2..3. D on d0-3 after B and C: starts when C ends at 3, ends at 4.
    # E on d1 (0.5 s), no deps, listed last: d1 is free from 2 (A ended), so 2..2.5,
    # and D must then wait for nothing more (D starts at 3 anyway).
    tasks = [
        Task("A", (range(0, 2),), 2.0),
        Task("B", (range(0, 1),), 1.0, (0,)),
        Task("C", (range(2, 4),), 3.0),
        Task("D", (range(0, 4),), 1.0, (1, 2)),
        Task("E", (range(1, 2),), 0.5),
    ]
    slots = list_schedule(tasks, 4)
    got = {s.task.name: (s.start_s, s.end_s) for s in slots}
    # E could start at 0 on d1 too, but A holds d1 from 0 to 2; list scheduling places the
    # earliest-starting ready task first: A (0), C (0), then E vs B: B at 2, E at 2 -> tie
    # goes to the earlier-listed B (2..3 on d0), E 2..2.5 on d1; D at max(3, 3) = 3..4.
    assert got == {"A": (0.0, 2.0), "C": (0.0, 3.0), "B": (2.0, 3.0), "E": (2.0, 2.5),
                   "D": (3.0, 4.0)}  # fmt: skip
    assert makespan(slots) == 4.0


def test_list_schedule_refuses_forward_dependencies() -> None:
    with pytest.raises(ValueError, match="later task"):
        list_schedule([Task("A", (range(0, 1),), 1.0, (1,)), Task("B", (range(0, 1),), 1.0)], 1)


def test_plan_simulation_hand_worked() -> None:
    """GRPO (actor_gen -> {ref_inf, reward_inf} -> actor_train) with hand-set call times.

    Plan: actor (gen and train) on d0, ref on d1, reward on d1; 2 unrolled iterations.
    gen 3 s; ref 1 s; reward 2 s; train 4 s. ref and reward share d1 and serialise
    (ref first: listed first); ref is frozen and shares d1 with reward, so both are
    offloaded: each call pays 2 x weights / host bandwidth, set to 0 here by an
    infinite host link.
    Iteration 0: gen 0-3 (d0); ref 3-4 (d1); reward 4-6 (d1); train 6-10 (d0).
    Iteration 1: gen waits for train: 10-13; ref 13-14; reward 14-16; train 16-20.
    Makespan 20 over 2 iterations: 10 s per iteration.
    """
    kind = replace(H100, host_bytes_s=math.inf)
    ctx = ppo_ctx(1, 2, graph=lambda: group_baseline_graph("grpo"), kind=kind)
    ctx.iterations = 2
    one = Layout(1, 1, 1, 1)
    plan = {
        "actor_gen": Assignment(Mesh(0, 1), one),
        "ref_inf": Assignment(Mesh(1, 1), one),
        "reward_inf": Assignment(Mesh(1, 1), one),
        "actor_train": Assignment(Mesh(0, 1), one),
    }
    for name, t in {
        "actor_gen": 3.0,
        "ref_inf": 1.0,
        "reward_inf": 2.0,
        "actor_train": 4.0,
    }.items():
        ctx._call_s[(name, 1, one)] = t
    est = evaluate(ctx, plan)
    got = [(s.task.name, s.task.iteration, s.start_s, s.end_s) for s in est.slots]
    assert got == [
        ("actor_gen", 0, 0.0, 3.0), ("ref_inf", 0, 3.0, 4.0), ("reward_inf", 0, 4.0, 6.0),
        ("actor_train", 0, 6.0, 10.0), ("actor_gen", 1, 10.0, 13.0), ("ref_inf", 1, 13.0, 14.0),
        ("reward_inf", 1, 14.0, 16.0), ("actor_train", 1, 16.0, 20.0),
    ]  # fmt: skip
    assert est.time_per_iteration_s == 10.0
    assert sorted(offloaded_roles(ctx, plan)) == ["ref", "reward"]  # d0 does not fit else


def test_offload_modes_follow_memory() -> None:
    """auto offloads the fewest frozen roles that share devices that make the plan fit
    (none if it fits with all resident); always offloads them all, never keeps them (and a
    plan that then does not fit costs infinity). Offloading adds 2 x weights / host
    bandwidth to each offloaded call."""
    one = Layout(1, 1, 1, 1)
    plan = {
        "actor_gen": Assignment(Mesh(0, 1), one),
        "ref_inf": Assignment(Mesh(1, 1), one),
        "reward_inf": Assignment(Mesh(1, 1), one),
        "actor_train": Assignment(Mesh(0, 1), Layout(1, 1, 1, 4)),
    }
    g = group_baseline_graph("grpo")
    big = MODEL_SHAPES["llama2-7b"]  # frozen roles larger than the (small) actor
    wl = workload_from_graph(g, {"actor": SMALL, "ref": big, "reward": big.as_critic()},
                             prompts=8, samples_per_prompt=1, prompt_tokens=64,
                             gen_tokens=64, mini_batches=1)  # fmt: skip

    def ctx_of(kind: DeviceKind, mode: str) -> Context:
        return Context(wl, Cluster(1, 2, kind), offload=mode)

    peaks = {m: memory_per_device(ctx_of(H100, m), plan) for m in ("never", "always")}
    assert peaks["always"][1] < peaks["never"][1]  # d1 holds ref and reward
    cap = (peaks["always"][1] + peaks["never"][1]) / 2
    assert max(peaks["never"][0], peaks["always"][0]) < cap  # d0 (the actor) fits either way
    tight = replace(H100, memory_bytes=cap / MEMORY_HEADROOM)
    for mode, off in (("auto", ["ref", "reward"]), ("always", ["ref", "reward"]), ("never", [])):
        assert sorted(offloaded_roles(ctx_of(tight, mode), plan)) == off, mode
    assert cost(ctx_of(tight, "never"), plan) == math.inf
    assert offloaded_roles(ctx_of(H100, "auto"), plan) == []  # fits resident
    # room for one of the two: auto offloads the smaller (the reward model's head is one
    # value, the reference's is the vocabulary)
    one = _memory(ctx_of(H100, "auto"), plan, {"reward"})[1]
    assert peaks["always"][1] < one < peaks["never"][1]
    roomier = replace(H100, memory_bytes=(one + peaks["never"][1]) / 2 / MEMORY_HEADROOM)
    assert offloaded_roles(ctx_of(roomier, "auto"), plan) == ["reward"]
    with pytest.raises(ValueError, match="offload"):
        offloaded_roles(ctx_of(tight, "sometimes"), plan)
    extra = cost(ctx_of(tight, "auto"), plan) - cost(ctx_of(H100, "auto"), plan)
    moved = 2 * big.params * H100.param_bytes  # reload + offload of ref and of reward
    assert extra == pytest.approx(2 * moved / H100.host_bytes_s, rel=0.01)


def test_reallocation_task_precedes_the_call_on_both_meshes() -> None:
    """actor_gen on d0-1 (tp2) while actor trains on d0 (tp1): a reallocation task runs
    on d0-1 before every gen; iteration 1's reallocation waits for iteration 0's train."""
    ctx = ppo_ctx(1, 2, actor="llama2-7b", graph=lambda: group_baseline_graph("grpo"))
    ctx.iterations = 2
    plan = {
        "actor_gen": Assignment(Mesh(0, 2), Layout(1, 2, 1, 1)),
        "ref_inf": Assignment(Mesh(1, 1), Layout(1, 1, 1, 1)),
        "reward_inf": Assignment(Mesh(1, 1), Layout(1, 1, 1, 1)),
        "actor_train": Assignment(Mesh(0, 1), Layout(1, 1, 1, 4)),
    }
    hooks = realloc_hooks(ctx, plan)
    assert [(h.role, h.before) for h in hooks] == [("actor", "actor_gen")]
    est = evaluate(ctx, plan)
    names = [(s.task.name, s.task.iteration) for s in est.slots]
    assert names[0] == ("realloc actor -> actor_gen", 0)
    assert est.slots[0].task.devices == (range(0, 1), range(0, 2))  # source and destination
    r1 = next(s for s in est.slots if s.task.kind == "realloc" and s.task.iteration == 1)
    t0 = next(s for s in est.slots if s.task.name == "actor_train" and s.task.iteration == 0)
    assert r1.start_s >= t0.end_s
    assert est.realloc_s["actor_gen"] > 0


def test_reallocations_go_first_once_per_replica_and_let_generations_overlap() -> None:
    """ReMax with the actor trained on d0-3 (dp4), sampling on d0-1 and decoding greedily
    on d2-3 (dp2 each): calls go in waves (both generations first); each iteration's two
    reallocations run before either generation, so the generations overlap. With both
    generations on d0-1 they share one replica: one reallocation per iteration, and that
    replica stays allocated (its weights count on d0-1 beside the actor's states)."""
    ctx = ppo_ctx(1, 4, graph=remax_graph)
    ctx.iterations = 2
    four = Assignment(Mesh(0, 4), Layout(4, 1, 1, 1))
    plan = {c.name: four for c in ctx.workload.calls}
    plan["actor_gen"] = Assignment(Mesh(0, 2), Layout(2, 1, 1, 1))
    plan["actor_greedy_gen"] = Assignment(Mesh(2, 2), Layout(2, 1, 1, 1))
    assert [c.name for c in ctx.topo][:2] == ["actor_gen", "actor_greedy_gen"]
    est = evaluate(ctx, plan)
    first = [s for s in est.slots if s.task.iteration == 0]
    got = {s.task.name: s for s in first}
    moves = [s for s in first if s.task.kind == "realloc"]
    assert [s.task.name for s in moves] == ["realloc actor -> actor_gen",
                                            "realloc actor -> actor_greedy_gen"]  # fmt: skip
    gen, greedy = got["actor_gen"], got["actor_greedy_gen"]
    assert max(m.end_s for m in moves) <= min(gen.start_s, greedy.start_s)
    assert gen.start_s < greedy.end_s and greedy.start_s < gen.end_s  # at once
    assert gen.start_s == greedy.start_s == moves[1].end_s

    plan["actor_greedy_gen"] = plan["actor_gen"]
    assert [(h.role, h.before) for h in realloc_hooks(ctx, plan)] == [("actor", "actor_gen")]
    est = evaluate(ctx, plan)
    assert [s.task.iteration for s in est.slots if s.task.kind == "realloc"] == [0, 1]
    # the dp2 replica holds all of llama2-7b's weights (2 bytes each) on each of d0-1
    without = _memory(ctx, {**plan, "actor_gen": four, "actor_greedy_gen": four}, set())
    extra = _memory(ctx, plan, set()) - without
    assert extra[0] >= 2 * MODEL_SHAPES["llama2-7b"].params and extra[2] < extra[0]


# ------------------------------------------------------------------ cost and memory


def test_forward_time_hand_worked() -> None:
    """One device of 1e12 FLOP/s (fully used), 1e12 B/s: SMALL over 8 sequences of 16
    tokens. Layer matmul params = 2*256*256 + 2*256*256 + 3*256*768 = 851,968.
    Per layer: 2 * 128 tokens * 851,968 + 4 * 128 * 8 (mean context) * 256 = 219,152,384
    FLOPs; 4 layers: 876,609,536; LM head 2 * 128 * 256 * 64 = 4,194,304; total
    880,803,840 FLOPs -> 8.8080384e-4 s. Weights 4*852,480 + 2*64*256 + 256 = 3,442,944
    params x 2 B = 6.9e-6 s to stream: compute-bound."""
    kind = DeviceKind("unit", 1e12, 80 * 2**30, 1e12, 1e11, 1e10, 1e10, mfu=1.0, mbu=1.0)
    p = Placement(Mesh(0, 1), Layout(1, 1, 1, 1), Cluster(1, 1, kind))
    assert forward_s(SMALL, p, 8, 16) == pytest.approx(8.8080384e-4, rel=1e-12)
    assert stage_params(SMALL, 1) == 3_442_944


def test_train_state_bytes_follow_the_zero_stage() -> None:
    """P = 3,442,944 params, bf16 (2 B): weights 2P, grads 2P, Adam 12P; dp = 4.
    ZeRO-0: 16P = 55,087,104. ZeRO-1: 2P + 2P + 3P = 7P = 24,100,608.
    ZeRO-2: 2P + 0.5P + 3P = 5.5P = 18,936,192. ZeRO-3: 0.5P + 0.5P + 3P = 4P = 13,771,776."""
    lay = Layout(4, 1, 1, 1)
    got = [train_state_bytes(SMALL, lay, 2, z) for z in range(4)]
    assert got == pytest.approx([55_087_104, 24_100_608, 18_936_192, 13_771_776], rel=1e-12)


def test_more_devices_never_slow_a_compute_bound_call_more_than_comm() -> None:
    ctx = ppo_ctx(1, 8, prompts=256)
    one = ctx.call_s("critic_inf", Assignment(Mesh(0, 1), Layout(1, 1, 1, 1)))
    eight = ctx.call_s("critic_inf", Assignment(Mesh(0, 8), Layout(8, 1, 1, 1)))
    assert one / 8 <= eight < one / 6  # data parallel inference: close to linear


def test_plan_over_memory_is_rejected() -> None:
    ctx = ppo_ctx(1, 1, actor="llama2-70b", critic="llama2-70b")  # 70B on one H100
    one = Assignment(Mesh(0, 1), Layout(1, 1, 1, 1))
    plan = {c.name: one for c in ctx.workload.calls}
    problems = validate(ctx, plan)
    assert [p.field for p in problems] == ["memory"]
    assert "GiB" in problems[0].value and "tp/pp/dp" in problems[0].fix
    assert cost(ctx, plan) == math.inf


# ------------------------------------------------------------------ meshes, validation


def test_meshes_are_aligned_blocks() -> None:
    cl = Cluster(2, 8, H100)
    got = meshes(cl)
    assert Mesh(0, 16) in got and Mesh(8, 8) in got and Mesh(6, 2) in got
    assert Mesh(4, 8) not in got and Mesh(1, 2) not in got
    # per node 8 + 4 + 2 + 1 = 15 meshes, twice, plus the whole cluster
    assert len(got) == 31
    assert is_valid_mesh(Mesh(7, 2), cl) is not None


def test_validation_names_each_broken_rule() -> None:
    ctx = ppo_ctx(1, 8)
    good = Assignment(Mesh(0, 8), Layout(4, 2, 1, 1))
    plan = {c.name: good for c in ctx.workload.calls}
    plan["actor_gen"] = Assignment(Mesh(0, 8), Layout(2, 2, 1, 1))  # 4 != 8
    plan["ref_inf"] = Assignment(Mesh(0, 4), Layout(1, 3, 1, 1))  # 1 x 3 x 1 != 4
    plan["critic_inf"] = Assignment(Mesh(3, 2), Layout(2, 1, 1, 1))  # misaligned mesh
    plan["reward_inf"] = Assignment(Mesh(0, 2), Layout(1, 1, 2, 1))  # valid: pp2 of 32 layers
    plan["critic_train"] = Assignment(Mesh(0, 8), Layout(8, 1, 1, 3))  # 32 seqs / 8 / 3
    fields = [p.field for p in validate(ctx, plan)]
    assert "calls.actor_gen.layout" in fields
    assert "calls.ref_inf.layout" in fields
    assert "calls.critic_inf.mesh" in fields
    assert "calls.critic_train.layout" in fields
    assert not any(f.startswith("calls.reward_inf") for f in fields)
    wide = dict(plan, ref_inf=Assignment(Mesh(0, 8), Layout(1, 8, 1, 1)))
    shape = ctx.workload.roles["ref"].shape
    ctx.workload.roles["ref"] = replace(ctx.workload.roles["ref"], shape=replace(shape, heads=36))
    problems = [p for p in validate(ctx, wide) if p.field == "calls.ref_inf.tp"]
    assert problems and "must divide the 36 heads" in problems[0].rule
    del plan["actor_train"]
    assert [p.field for p in validate(ctx, plan)] == ["calls.actor_train"]


@pytest.mark.parametrize("graph", [ppo_graph, remax_graph, lambda: group_baseline_graph("grpo")])
@pytest.mark.parametrize("nodes,per_node", [(1, 8), (2, 8)])
def test_every_mode_emits_valid_plans(graph, nodes: int, per_node: int) -> None:
    ctx = ppo_ctx(nodes, per_node, actor="llama2-13b", graph=graph)
    plans = [symmetric(ctx), heuristic(ctx), mcmc(ctx, seed=1, time_budget_s=1.0).plan]
    for plan in plans:
        assert plan is not None
        assert validate(ctx, plan) == []
        assert math.isfinite(cost(ctx, plan))


def test_sft_and_reward_model_graphs_plan() -> None:
    for g, shapes in ((sft_graph(), {"actor": MODEL_SHAPES["llama2-7b"]}),
                      (reward_model_graph(), {"reward": MODEL_SHAPES["llama2-7b"].as_critic()})):  # fmt: skip
        wl = workload_from_graph(g, shapes, prompts=64, samples_per_prompt=1, prompt_tokens=128,
                                 gen_tokens=128, mini_batches=1)  # fmt: skip
        ctx = Context(wl, Cluster(1, 8, H100))
        for plan in (symmetric(ctx), heuristic(ctx), mcmc(ctx, seed=0, time_budget_s=0.5).plan):
            assert plan is not None and validate(ctx, plan) == []
        assert all(c.kind is CallKind.TRAIN for c in wl.calls)


def test_plan_file_round_trip() -> None:
    ctx = ppo_ctx(1, 8)
    plan = heuristic(ctx)
    assert plan is not None
    data = to_dict(ctx, plan, "heuristic", evaluate(ctx, plan))
    assert from_dict(data) == plan
    assert set(data["calls"]) == {c.name for c in ctx.workload.calls}


def test_replicas_follow_the_plan() -> None:
    """Actor trains on d0-3 (dp4) and generates on d0-7 (dp4 tp2): two replicas, the train
    layout first; the critic's calls share one."""
    ctx = ppo_ctx(1, 8)
    eight, four = Mesh(0, 8), Mesh(0, 4)
    plan = {c.name: Assignment(eight, Layout(8, 1, 1, 1)) for c in ctx.workload.calls}
    plan["actor_train"] = Assignment(four, Layout(4, 1, 1, 2))
    plan["actor_gen"] = Assignment(eight, Layout(4, 2, 1, 1))
    reps = replicas(ctx, plan)
    assert reps["actor"] == ["d0-3 dp4 tp1 pp1: actor_train", "d0-7 dp4 tp2 pp1: actor_gen"]
    assert reps["critic"] == ["d0-7 dp8 tp1 pp1: critic_inf, critic_train"]
    assert [(h.role, h.before) for h in realloc_hooks(ctx, plan)] == [("actor", "actor_gen")]


# ------------------------------------------------------------------ search


def reinforce_graph() -> DataflowGraph:
    """Three calls: sample, score, train (REINFORCE without a reference)."""
    prompt, response = ("prompt_ids", "prompt_mask"), ("response_ids", "response_mask")
    return DataflowGraph(
        "reinforce",
        [
            MFC("actor_gen", "actor", CallKind.GENERATE, "generate", prompt,
                (*response, "logprobs")),
            MFC("reward_inf", "reward", CallKind.INFERENCE, "reward", (*prompt, *response),
                ("scores",)),
            MFC("actor_train", "actor", CallKind.TRAIN, "t", (*prompt, *response, "scores")),
        ],
        dataset_keys=prompt,
    )  # fmt: skip


@pytest.mark.parametrize(
    "per_node,keep,graph",
    [(2, 3, lambda: group_baseline_graph("grpo")), (4, 2, reinforce_graph)],
    ids=["grpo-2-devices", "reinforce-4-devices"],
)
def test_search_finds_the_exhaustive_optimum(per_node: int, keep: int, graph) -> None:
    """A 7B actor on 2 and 4 H100s: MCMC reaches the cost that enumerating every
    combination of the same candidates finds."""
    ctx = ppo_ctx(1, per_node, graph=graph, prompts=32)
    cands, _ = search_space(ctx, keep)
    assert math.prod(len(c) for c in cands.values()) > 4000  # 8,112 and 4,620 plans
    best_plan, best = exhaustive(ctx, keep=keep)
    assert math.isfinite(best)
    found = mcmc(ctx, seed=0, time_budget_s=60.0, max_steps=20000, keep=keep)
    assert found.cost_s == pytest.approx(best, rel=1e-12)
    assert validate(ctx, found.plan) == []


def test_search_is_seeded() -> None:
    ctx = ppo_ctx(1, 8, prompts=64)
    a = mcmc(ctx, seed=3, time_budget_s=60.0, max_steps=300)
    b = mcmc(ctx, seed=3, time_budget_s=60.0, max_steps=300)
    assert a.plan == b.plan and a.cost_s == b.cost_s


def test_search_keeps_the_cheapest_hand_made_plan_unless_it_beats_it(tmp_path: Path) -> None:
    """GRPO on the default job, costed by a `relay profile --calls` file measured here
    (tests/unit/data): one device per role is the cheapest plan the estimate knows, and
    the search returns it, not a variant the estimate cannot tell from it (the reward
    model in 16 micro-batches on the actor's device measured 14% slower): the search
    starts from the cheapest of the symmetric, heuristic and per-role plans and leaves it
    only for a plan estimated at least TIE cheaper."""
    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import context
    from planner.search import per_role

    profile = Path(__file__).parent / "data" / "calls_profile_grpo.json"
    cfg = load_config(["algo=grpo", "generate.backend=hf", f"cluster.calls_profile={profile}",
                       f"run.output_dir={tmp_path}"], for_run=False)  # fmt: skip
    ctx = context(cfg)
    hand = [p for p in (symmetric(ctx), heuristic(ctx), per_role(ctx)) if p is not None]
    start = min(hand, key=lambda p: cost(ctx, p))
    assert start == per_role(ctx)
    found = mcmc(ctx, seed=0, time_budget_s=60.0, max_steps=3000)
    assert found.plan == start, {n: f"{a.mesh} {a.layout}" for n, a in found.plan.items()}


def test_searched_calls_take_the_fewest_micro_batches_that_cost_the_same(tmp_path: Path) -> None:
    """PPO on the default job with a calls profile measured here: the estimate prices
    micro-batches by FLOPs and bytes only, so plans that differ in them cost the same and
    the walk ends on any of them (it had returned the reward model in 16 micro-batches);
    the searched plan has each call in the fewest that keep its estimate."""
    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import context
    from planner.search import fewest_micro_batches

    profile = Path(__file__).parent / "data" / "calls_profile_ppo.json"
    cfg = load_config(["algo=ppo", "generate.backend=hf", f"cluster.calls_profile={profile}",
                       f"run.output_dir={tmp_path}"], for_run=False)  # fmt: skip
    ctx = context(cfg)
    found = mcmc(ctx, seed=0, time_budget_s=60.0, max_steps=3000)
    assert found.cost_s == cost(ctx, found.plan)
    assert fewest_micro_batches(ctx, found.plan, found.cost_s) == (found.plan, found.cost_s)
    for name, a in found.plan.items():
        if a.layout.micro_batches > 1:  # only where fewer would cost more
            fewer = replace(a, layout=replace(a.layout, micro_batches=a.layout.micro_batches // 2))
            assert cost(ctx, {**found.plan, name: fewer}) > found.cost_s, name


def test_search_beats_the_symmetric_plan_where_layouts_should_differ() -> None:
    """Long context (prompt 1024, response 2048) on 16 H100s: the symmetric layout needs
    micro-batches for the training activations and generates under them; the search
    gives generation a layout of its own and must find a plan at least 20% faster."""
    g = ppo_graph()
    wl = workload_from_graph(
        g, rl_shapes(g, MODEL_SHAPES["llama2-7b"], MODEL_SHAPES["llama2-7b"]), prompts=128,
        samples_per_prompt=1, prompt_tokens=1024, gen_tokens=2048, mini_batches=4,
        zero_stage=1,
    )  # fmt: skip
    ctx = Context(wl, Cluster(2, 8, H100))
    base = symmetric(ctx)
    assert base is not None
    found = mcmc(ctx, seed=0, time_budget_s=3.0)
    assert found.cost_s < 0.8 * cost(ctx, base)
    assert validate(ctx, found.plan) == []
    gen, train = found.plan["actor_gen"], found.plan["actor_train"]
    assert gen.replica != train.replica  # generation does not run under the train layout


# ------------------------------------------------------------------ reallocation


def _shards(shape: ModelShape, mesh: Mesh, lay: Layout, full: dict[str, np.ndarray]):
    """What each device holds under a layout: {device: {tensor: array}}."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for t in model_tensors(shape):
        for dev, _, pp_i, tp_i in lay.ranks(mesh):
            if pp_i != stage_of(t, shape.layers, lay.pp):
                continue
            a = full[t.name]
            if t.split_dim is not None:
                n = a.shape[t.split_dim]
                a = np.take(a, range(tp_i * n // lay.tp, (tp_i + 1) * n // lay.tp), t.split_dim)
            out.setdefault(dev, {})[t.name] = a
    return out


LAYOUTS_4 = [Layout(4, 1, 1), Layout(2, 2, 1), Layout(1, 4, 1), Layout(2, 1, 2),
             Layout(1, 2, 2), Layout(1, 1, 4)]  # fmt: skip


@pytest.mark.parametrize("src", LAYOUTS_4, ids=str)
@pytest.mark.parametrize("dst", LAYOUTS_4, ids=str)
def test_comm_plan_rebuilds_every_shard_exactly(src: Layout, dst: Layout) -> None:
    """Execute the comm plan on arrays: every destination shard equals the slice of the
    full model it should hold, every byte arrives once, and the aggregated traffic
    equals the plan's."""
    cl = Cluster(1, 8, H100)
    shape = SMALL
    rng = np.random.default_rng(0)
    full = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in model_tensors(shape)}
    smesh, dmesh = Mesh(0, 4), Mesh(4, 4) if src == dst else Mesh(0, 4)
    have = _shards(shape, smesh, src, full)
    want = _shards(shape, dmesh, dst, full)
    ops = comm_plan(shape, (smesh, src), (dmesh, dst), cl)
    got: dict[int, dict[str, np.ndarray]] = {d: {} for d in want}
    for op in ops:
        piece = have[op.src][op.tensor]
        spec = next(t for t in model_tensors(shape) if t.name == op.tensor)
        if op.dim is not None:
            n = full[op.tensor].shape[op.dim]
            # the source's own offset along the split dim
            s_i = next(i for d, _, p, i in src.ranks(smesh) if d == op.src)
            offset = s_i * n // src.tp
            piece = np.take(piece, range(op.lo - offset, op.hi - offset), op.dim)
            buf = got[op.dst].setdefault(op.tensor, np.full_like(want[op.dst][op.tensor], np.nan))
            d_i = next(i for d, _, p, i in dst.ranks(dmesh) if d == op.dst)
            d_off = d_i * n // dst.tp
            idx = [slice(None)] * piece.ndim
            idx[op.dim] = slice(op.lo - d_off, op.hi - d_off)
            assert np.isnan(buf[tuple(idx)]).all(), "a slice arrived twice"
            buf[tuple(idx)] = piece
        else:
            assert op.tensor not in got[op.dst], "a replicated tensor arrived twice"
            got[op.dst][op.tensor] = piece.copy()
        assert op.nbytes == piece.size * cl.kind.param_bytes
        del spec
    for dev, tensors in want.items():
        assert set(got[dev]) == set(tensors)
        for name, a in tensors.items():
            np.testing.assert_array_equal(got[dev][name], a)
    tr = traffic(shape, (smesh, src), (dmesh, dst), cl)
    moved = sum(op.nbytes for op in ops if op.src != op.dst)
    assert tr.moved_bytes == moved
    assert tr.local_bytes == sum(op.nbytes for op in ops if op.src == op.dst)


def test_reallocation_bytes_hand_worked() -> None:
    """SMALL (3,442,944 params, 2 B each) from dp1 tp2 on d0-1 to dp2 tp1 on d0-1: each
    device keeps its own half of every split tensor and receives the other half; the
    replicated tensors (norms: 4 layers x 2 x 256 + 256 = 2,304 params) are local.
    Split params 3,440,640 -> each device receives half: 1,720,320 params = 3,440,640 B."""
    cl = Cluster(1, 2, H100)
    tr = traffic(SMALL, (Mesh(0, 2), Layout(1, 2, 1)), (Mesh(0, 2), Layout(2, 1, 1)), cl)
    assert tr.recv_intra == {0: 3_440_640, 1: 3_440_640}
    assert tr.moved_bytes == 2 * 3_440_640
    assert not tr.send_inter


def test_reallocation_across_nodes_uses_the_network() -> None:
    """tp4 on node 0 -> tp4 on node 1: each device sends its quarter of the split tensors
    (3,440,640 params in all) to its peer, and each destination also needs the replicated
    norms (2,304 params) once: 3,440,640 x 2 B + 4 x 2,304 x 2 B = 6,899,712 B, all over
    the network, one peer each."""
    cl = Cluster(2, 4, H100)
    tr = traffic(SMALL, (Mesh(0, 4), Layout(1, 4, 1)), (Mesh(4, 4), Layout(1, 4, 1)), cl)
    assert tr.moved_bytes == 6_899_712 and not tr.send_intra
    assert tr.recv_inter == {d: 6_899_712 // 4 for d in range(4, 8)}
    assert set(tr.peers.values()) == {1}


def test_the_simulator_costs_fused_remax_calls_as_one_task() -> None:
    """ReMax's sampled and greedy generations under one placement are one task costed
    over both batches (as the runtime runs them), shared by sequences; unfused, two."""
    from planner.catalogue import device_kind
    from planner.plan import Assignment, Context, evaluate, tasks

    g = remax_graph()
    seven = MODEL_SHAPES["llama2-7b"]
    wl = workload_from_graph(g, rl_shapes(g, seven, seven), prompts=64,
                             samples_per_prompt=1, prompt_tokens=128, gen_tokens=256,
                             mini_batches=4)  # fmt: skip
    ctx = Context(wl, Cluster(1, 8, device_kind("h100-sxm")), iterations=1)
    whole = {c.name: Assignment(Mesh(0, 8), Layout(8, 1, 1)) for c in g.calls}
    names = [t.name for t in tasks(ctx, whole)]
    assert "actor_gen+actor_greedy_gen" in names and "reward_inf+reward_greedy_inf" in names
    est = evaluate(ctx, whole)
    both = ctx.group_s(("actor_gen", "actor_greedy_gen"), whole["actor_gen"])
    assert est.call_s["actor_gen"] + est.call_s["actor_greedy_gen"] == pytest.approx(both)
    alone = ctx.call_s("actor_gen", whole["actor_gen"]) * 2
    assert both < alone  # one decode over 128 sequences beats two over 64
    apart = replace(ctx, fuse=False, _call_s={}, _act={}, _realloc={})
    assert "actor_gen+actor_greedy_gen" not in [t.name for t in tasks(apart, whole)]
