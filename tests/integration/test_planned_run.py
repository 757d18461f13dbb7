"""`relay train` under execution plans: every call on its own mesh and layout, on one
DeviceWorker per device, with the trained weights reallocated to the other layouts.

Invariance: with deterministic rollouts (generate.top_k=1, so samples do not depend on
how a batch is split), the first three steps' losses are the same under dp=1, dp=2, tp=2
and a searched plan, and after a resume from a checkpoint written under tp=2. Measured
differences are below 1e-6 relative (fp32 reductions in another order); the test allows
1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.tiny import RL_ONLY, tiny_overrides

STEPS = 3
SAME_ROLLOUTS = ("generate.backend=hf", "generate.top_k=1", "train.zero_stage=1",
                 "train.eval_every_steps=100")  # fmt: skip


def run(tmp_path: Path, name: str, *extra: str, rollouts: tuple = SAME_ROLLOUTS) -> Path:
    from orchestrator.config.load import load_config
    from orchestrator.run.controller import Controller
    from orchestrator.runtime.planning import plan_for_run

    cfg = load_config(tiny_overrides(tmp_path, name, STEPS, *RL_ONLY, *rollouts, *extra))
    Controller(cfg, plan_for_run(cfg)).run()
    return tmp_path / name


def plan_file(
    tmp_path: Path,
    name: str,
    mesh: str,
    dp: int,
    tp: int,
    *overrides: str,
    **calls: tuple[str, int, int],
) -> Path:
    """Every call of the default job's graph (PPO, or what `overrides` choose) on `mesh`
    under (dp, tp), but the calls named in `calls` (call=(mesh, dp, tp))."""
    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import make_plan
    from planner.plan import to_dict

    cfg = load_config(tiny_overrides(tmp_path, "x", STEPS, *RL_ONLY, *overrides), for_run=False)
    result = make_plan(cfg, "symmetric")
    data = to_dict(result.ctx, result.plan, "file", None)
    for call_name, call in data["calls"].items():
        m, d, t = calls.get(call_name, (mesh, dp, tp))
        call.update(mesh=m, dp=d, tp=t, pp=1, micro_batches=1)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def rl_rows(folder: Path) -> dict[int, dict[str, float]]:
    from orchestrator.run.tracking import read_metrics

    rows: dict[int, dict[str, float]] = {}
    for r in read_metrics(folder / "metrics.jsonl"):
        if r.get("stage") == "rl" and "loss/policy" in r:
            rows[int(r["step"])] = r
    return rows


@pytest.fixture(scope="module")
def dp1(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference run of the invariance tests, run once for the module: the default
    job's graph with every call on d0 (dp=1, ZeRO-1), deterministic rollouts."""
    tmp = tmp_path_factory.mktemp("dp1")
    return run(tmp, "dp1", "plan=file", f"plan.path={plan_file(tmp, 'dp1', 'd0', 1, 1)}")


def test_losses_agree_across_plans_and_a_resume(dp1: Path, tmp_path: Path) -> None:
    runs: dict[str, Path] = {"dp1": dp1}
    # dp=2 generates on d1 alone: the actor's trained weights are reallocated there before
    # every generate call (d1 runs its part inside the call's task, d0 in a task of its
    # own). It also offloads the frozen reference between its calls (it shares d0-1 with
    # the actor and critic): the round trip through host memory must be exact.
    dp2 = plan_file(tmp_path, "dp2", "d0-1", 2, 1, actor_gen=("d1", 1, 1))
    runs["dp2"] = run(tmp_path, "dp2", "plan=file", f"plan.path={dp2}", "plan.offload=always")
    # tp=2, stopped after step 2 and resumed from its checkpoint for step 3 (the reference
    # reads the generated part on its own device: same sharding). The critic infers on d0
    # alone: its replica there is refreshed ahead of the step's calls (begin_step), since
    # its first call waits for another call
    tp2 = plan_file(tmp_path, "tp2", "d0-1", 1, 2, critic_inf=("d0", 1, 1))
    run(tmp_path, "tp2", "plan=file", f"plan.path={tp2}", "train.steps=2")
    ckpt = tmp_path / "tp2" / "checkpoints" / "step_2"
    assert sorted(p.name for p in (ckpt / "actor" / "optim").iterdir()) == ["rank0.pt", "rank1.pt"]
    runs["tp2 resumed"] = run(tmp_path, "tp2", "plan=file", f"plan.path={tp2}")
    runs["search"] = run(tmp_path, "search", "plan=search", "plan.search_time_s=2")

    searched = json.loads((runs["search"] / "plan.json").read_text())
    layouts = {(c["mesh"], c["dp"], c["tp"]) for c in searched["calls"].values()}
    assert len(layouts) > 1 or next(iter(layouts))[0] != "d0"  # not everything on d0

    rows = {name: rl_rows(folder) for name, folder in runs.items()}
    assert all(sorted(r) == [1, 2, 3] for r in rows.values()), {
        n: sorted(r) for n, r in rows.items()
    }
    for step in (1, 2, 3):
        for key in ("loss/policy", "loss/value", "rollout/reward_mean", "train/grad_norm_actor"):
            ref = rows["dp1"][step][key]
            for name in runs:
                assert rows[name][step][key] == pytest.approx(ref, rel=1e-4, abs=1e-6), (
                    f"step {step} {key}: {name} {rows[name][step][key]} vs dp1 {ref}"
                )

    offloaded = json.loads((runs["dp2"] / "plan.json").read_text())["offloaded_roles"]
    assert offloaded == ["ref"]  # the reward is a verifier here: no model
    assert rows["dp2"][3]["offload/ref_inf_bytes"] > 0
    assert rows["dp2"][3]["time/offload_ref_inf_s"] >= 0
    assert not any(k.startswith("offload/") for k in rows["dp1"][3])  # auto: memory fits
    moved = json.loads((runs["dp2"] / "plan.json").read_text())["reallocations"]
    assert [(r["role"], r["before"]) for r in moved] == [("actor", "actor_gen")]
    assert "time/realloc_actor_gen_s" not in rows["dp2"][1]  # all replicas start alike
    for step in (2, 3):  # after each train call
        assert rows["dp2"][step]["realloc/actor_gen_bytes"] > 0
        assert rows["dp2"][step]["time/realloc_actor_gen_s"] > 0
    for step in (2, 3):  # after a train call; after the resume, from the loaded replica
        assert rows["tp2 resumed"][step]["realloc/critic_inf_bytes"] > 0

    # the planner's estimates beside the measured times
    last = rows["search"][3]
    for call in searched["calls"]:
        assert last[f"time/{call}_s"] > 0 and f"plan/est_{call}_s" in last
    assert last["plan/est_step_s"] > 0 and 0 <= last["perf/overhead_share"] < 1
    from tests.unit.test_docs import undocumented

    keys = {k for r in rows["search"].values() for k in r} - {"stage", "step"}
    assert undocumented(keys) == [], "metrics missing from docs/metrics.md"
    if searched["reallocations"]:  # a call whose replica lags the trained one
        before = {r["before"] for r in searched["reallocations"]}
        assert any(f"time/realloc_{c}_s" in last for c in before)


def test_remax_refreshes_both_generation_replicas_ahead_of_the_step(
    ray_cluster, tmp_path: Path
) -> None:
    """ReMax trained on d0-1 (dp2), sampling on d0 and decoding greedily on d1 (the
    planner's ReMax plans at scale): at step 2 both replicas lag the trained weights and
    are refreshed, by the tasks `begin_step` issues ahead of the step's calls (two
    reallocations: neither is folded into its call). The run's numbers are those of the
    whole graph on d0: sampling runs on d0 alone in both plans (top-k off: with top_k=1 the sampled
    response is the greedy one and ReMax's advantage is 0). The gradient is compared,
    not `loss/policy`: with responses of unequal lengths the logged loss under dp2 is
    the mean of the ranks' token means, not the token mean over the batch."""
    runs = {}
    for name, mesh, dp, calls in (
        ("one", "d0", 1, {}),
        ("split", "d0-1", 2, {"actor_gen": ("d0", 1, 1), "actor_greedy_gen": ("d1", 1, 1)}),
    ):
        path = plan_file(tmp_path, name, mesh, dp, 1, "algo=remax", **calls)
        runs[name] = run(tmp_path, name, "algo=remax", "plan=file", f"plan.path={path}",
                         rollouts=SAME_ROLLOUTS[:1] + SAME_ROLLOUTS[2:])  # fmt: skip
    rows = {name: rl_rows(folder) for name, folder in runs.items()}
    for step in (1, 2, 3):
        for key in ("rollout/reward_mean", "rollout/advantage_mean_raw", "train/grad_norm_actor"):
            ref = rows["one"][step][key]
            assert rows["split"][step][key] == pytest.approx(ref, rel=1e-4, abs=1e-6), key
    moved = json.loads((runs["split"] / "plan.json").read_text())["reallocations"]
    assert [r["before"] for r in moved] == ["actor_gen", "actor_greedy_gen"]
    assert rows["one"][2]["loss/policy"] != 0  # samples differ from the greedy responses
    for call in ("actor_gen", "actor_greedy_gen"):
        assert rows["split"][2][f"realloc/{call}_bytes"] > 0


def test_pmoe_policy_and_zero3_under_sharded_plans(dp1: Path, tmp_path: Path) -> None:
    """A PMOE actor (three experts) trained tensor parallel over d0-1 gives the one-device
    run's numbers (the experts, router and Q head travel with the LM's slices, whole on
    each rank); and ZeRO-3 data parallel over d0-1 (each rank a partition of the weights,
    reallocation reading them gathered) gives the ZeRO-1 run's on one device (the
    module's `dp1` run: the same config, its first two steps)."""
    pmoe = ("policy=pmoe", "policy.num_experts=3")
    sampled = ("generate.backend=hf", "train.eval_every_steps=100")  # PMOE: top_k off
    greedyish = ("generate.backend=hf", "generate.top_k=1", "train.eval_every_steps=100")
    rows = {"zero1_dp1": rl_rows(dp1)}
    for name, mesh, dp, tp, extra, rollouts in (
        ("pmoe_dp1", "d0", 1, 1, pmoe, sampled),
        ("pmoe_tp2", "d0-1", 1, 2, pmoe, sampled),
        ("zero3_dp2", "d0-1", 2, 1, ("train.zero_stage=3",), greedyish),
    ):
        path = plan_file(tmp_path, name, mesh, dp, tp, *extra)
        run(tmp_path, name, "plan=file", f"plan.path={path}", "train.steps=2", *extra,
            rollouts=rollouts)  # fmt: skip
        rows[name] = rl_rows(tmp_path / name)
    pairs = (("pmoe_tp2", "pmoe_dp1", ("loss/policy", "train/router_loss", "train/q_loss",
                                       "loss/value")),
             ("zero3_dp2", "zero1_dp1", ("loss/policy", "loss/value", "train/grad_norm_actor")))  # fmt: skip
    for name, ref, keys in pairs:
        for step in (1, 2):
            for key in keys:
                want = rows[ref][step][key]
                got = rows[name][step][key]
                assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (name, step, key)


def test_overlapped_rollout_samples_one_update_behind(ray_cluster, tmp_path: Path) -> None:
    """train.overlap_generation: GRPO trained on d0, sampling (and the reference) on d1;
    each step's rollout is launched before the previous step's train call, so it samples
    from the weights one update older, except after a checkpoint (run.save_every_steps=2:
    steps 1 and 3 are on-policy, step 2 is not), where a resumed run would start afresh.
    One optimizer step per batch: on-policy, the trainer's log-probs before the update
    are the sampler's (importance ratio 1); one update behind, they are not. Step 1 is
    the run without overlap's."""
    grpo = ("algo=grpo", "train.rollout_batch_prompts=4", "train.samples_per_prompt=4",
            "train.mini_batch_samples=16", "train.micro_batch_samples_per_device=8",
            "train.actor_lr=1e-3")  # fmt: skip
    path = plan_file(tmp_path, "split", "d1", 1, 1, *grpo, actor_train=("d0", 1, 1))
    rows = {}
    for name, extra in (("overlap", ("train.overlap_generation=true",)), ("serial", ())):
        run(tmp_path, name, "plan=file", f"plan.path={path}", *grpo, *extra,
            rollouts=("generate.backend=hf", "train.eval_every_steps=100"))  # fmt: skip
        rows[name] = rl_rows(tmp_path / name)
    o, s = rows["overlap"], rows["serial"]
    assert [o[k]["rollout/off_policy_steps"] for k in (1, 2, 3)] == [0.0, 1.0, 0.0]
    assert [s[k]["rollout/off_policy_steps"] for k in (1, 2, 3)] == [0.0, 0.0, 0.0]
    for step in (1, 3):
        assert abs(o[step]["train/approx_kl"]) < 1e-5, (step, o[step]["train/approx_kl"])
        assert o[step]["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert abs(o[2]["train/approx_kl"]) > 1e-4, o[2]["train/approx_kl"]
    assert o[2]["train/ratio_mean"] != pytest.approx(1.0, abs=1e-4)
    assert abs(s[2]["train/approx_kl"]) < 1e-5
    for key in ("loss/policy", "rollout/reward_mean", "train/grad_norm_actor"):
        assert o[1][key] == pytest.approx(s[1][key], rel=1e-5, abs=1e-7), key
