"""`relay plan` as a user runs it, plan files fed back, and `relay train plan=...` using
the same plan (refused before anything is written when this runtime cannot run it)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from launch.cli import main

PAPER = [
    "cluster.device=cuda",
    "cluster.device_kind=h100-sxm",
    "cluster.num_nodes=2",
    "cluster.devices_per_node=8",
    "plan.actor_shape=llama2-13b",
    "plan.critic_shape=llama2-7b",
    "train.rollout_batch_prompts=512",
    "train.mini_batch_samples=128",
    "plan.prompt_tokens=128",
    "generate.max_new_tokens=128",
    "plan.max_pp=8",  # cost pipeline layouts too (the runtime runs pp = 1 only)
]


def test_relay_plan_default_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["plan", "plan.search_time_s=1", f"run.output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "estimated time per iteration" in out and "symmetric" in out and "search" in out
    assert "this runtime can execute it: yes" in out  # the default per_role plan
    data = json.loads((tmp_path / "ppo-sort.plan.json").read_text())
    assert set(data["calls"]) == {
        "actor_gen", "ref_inf", "reward_inf", "critic_inf", "actor_train", "critic_train"
    }  # fmt: skip
    assert data["mode"] == "per_role" and data["estimate"]["time_per_iteration_s"] > 0
    assert set(data["modes"]) == {"per_role", "symmetric", "heuristic", "search"}
    assert (tmp_path / "ppo-sort.plan.png").stat().st_size > 10_000
    assert not (tmp_path / "ppo-sort").exists()  # planning makes no run folder


def test_paper_scale_plan_and_file_round_trip(tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "p.json"
    rc = main(["plan", "plan=search", "plan.search_time_s=2", f"plan.out={out_file}", *PAPER])
    assert rc == 0
    first = json.loads(out_file.read_text())
    assert first["cluster"] == {"num_nodes": 2, "devices_per_node": 8, "device_kind": "h100-sxm"}
    searched = first["estimate"]["time_per_iteration_s"]
    assert searched <= first["modes"]["symmetric"] + 1e-12
    capsys.readouterr()
    again = tmp_path / "again.json"
    rc = main(["plan", "plan=file", f"plan.path={out_file}", f"plan.out={again}",
               "plan.search_time_s=0.5", *PAPER])  # fmt: skip
    assert rc == 0
    second = json.loads(again.read_text())
    assert second["calls"] == first["calls"]
    assert second["estimate"]["time_per_iteration_s"] == pytest.approx(searched, rel=1e-9)


def test_edited_plan_file_is_validated(tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "p.json"
    assert (
        main(["plan", "plan=heuristic", "plan.search_time_s=0.5", f"plan.out={out_file}", *PAPER])
        == 0
    )
    data = json.loads(out_file.read_text())
    data["calls"]["actor_train"].update(mesh="d0-7", dp=2, tp=3, pp=1)  # 2 x 3 x 1 != 8
    data["calls"]["ref_inf"]["mesh"] = "d3-4"  # not an aligned block
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    capsys.readouterr()
    rc = main(["plan", "plan=file", f"plan.path={bad}", f"plan.out={tmp_path / 'x.json'}",
               "plan.search_time_s=0.5", *PAPER])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "calls.actor_train.layout" in err and "mesh's 8 devices" in err
    assert "calls.ref_inf.mesh" in err and "fix:" in err.lower()
    assert not (tmp_path / "x.json").exists()


def test_every_plan_runs_vllm_pmoe_and_zero3(tmp_path: Path) -> None:
    """One runtime: a sharded plan takes vLLM generation, PMOE policies and ZeRO-3 as the
    per-role placement does; only generate calls with two tp degrees are refused (a plan's
    vLLM engines share one)."""
    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import make_plan, runtime_problems

    for extra in (["generate.backend=vllm", "train.zero_stage=3"], ["policy=pmoe"]):
        cfg = load_config([f"run.output_dir={tmp_path}", *extra], for_run=False)
        for mode in ("per_role", "symmetric", "heuristic"):
            assert runtime_problems(make_plan(cfg, mode), cfg) == [], (mode, extra)
    cfg = load_config(["algo=remax", "generate.backend=vllm", "cluster.devices_per_node=4"],
                      for_run=False)  # fmt: skip
    result = make_plan(cfg, "symmetric")
    gen = result.plan["actor_greedy_gen"]
    lay = replace(gen.layout, tp=2, dp=gen.layout.dp // 2)
    result.plan["actor_greedy_gen"] = replace(gen, layout=lay)
    (problem,) = runtime_problems(result, cfg)
    assert "share one" in str(problem) and "generate.backend=hf" in str(problem)


def test_per_role_with_too_few_devices_names_the_plans_that_fit(tmp_path: Path, capsys) -> None:
    rc = main(["train", "plan=per_role", "cluster.devices_per_node=2",
               f"run.output_dir={tmp_path}"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "per_role puts each of the 4 roles on a device of its own" in err
    assert "plan=symmetric" in err and "plan=heuristic" in err and "plan=search" in err
    assert not (tmp_path / "ppo-sort").exists()


def test_auto_plan_colocates_roles_on_one_device() -> None:
    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import make_plan

    one = make_plan(load_config(["cluster.devices_per_node=1"], for_run=False))
    assert one.mode == "symmetric" and "4 roles share 1 device" in one.reason
    assert {str(a.mesh) for a in one.plan.values()} == {"d0"}
    four = make_plan(load_config([], for_run=False))
    assert four.mode == "per_role"


def test_plan_and_train_share_the_plan(tmp_path: Path) -> None:
    """`relay train plan=heuristic` runs the plan `relay plan plan=heuristic` makes, for the
    RL graph even when plan.graph asks `relay plan` for another graph."""
    from dataclasses import replace

    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import make_plan, plan_for_run

    cfg = load_config([f"run.output_dir={tmp_path}", "plan=heuristic", "plan.graph=sft"])
    used = plan_for_run(cfg)
    assert set(used.plan) == {"actor_gen", "ref_inf", "reward_inf", "critic_inf",
                              "actor_train", "critic_train"}  # fmt: skip
    assert used.plan == make_plan(replace(cfg, plan=replace(cfg.plan, graph=None))).plan
    assert set(make_plan(cfg).plan) == {"actor_sft"}  # what `relay plan` plans here


def test_a_searched_run_prints_its_plan_and_why(tmp_path: Path, capsys) -> None:
    """plan=search: the run prints the hand-made plans' estimates beside its own, what the
    costs come from, and each role's replicas (a search may differ from `relay plan`'s)."""
    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import make_plan, plan_for_run

    cfg = load_config([f"run.output_dir={tmp_path}", "plan=search", "plan.search_time_s=0.5"])
    used = plan_for_run(cfg)
    out = capsys.readouterr().out
    heuristic = make_plan(cfg, "heuristic").estimate.time_per_iteration_s
    assert f"heuristic {heuristic:.3g} s" in out and "per_role " in out, out
    assert "roofline costs (cluster.calls_profile unset" in out and "plans costed in" in out
    assert used.estimate.time_per_iteration_s <= heuristic + 1e-12  # the search starts there
    for role in ("actor", "critic", "ref", "reward"):
        assert f"relay:   {role}: d" in out, out


def test_verifier_reward_takes_no_device(tmp_path: Path) -> None:
    """With reward=verifier there is no reward model: the planner places none, so PPO's
    three models fit a 3-GPU cluster."""
    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import make_plan

    cfg = load_config(["reward=verifier", "cluster.device=cuda", "cluster.devices_per_node=3",
                       f"run.output_dir={tmp_path}"], for_run=False)  # fmt: skip
    result = make_plan(cfg)
    assert "reward_inf" not in result.plan and len(result.plan) == 5
    assert {a.mesh.start for a in result.plan.values()} == {0, 1, 2}


def test_unreadable_plan_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    rc = main(["plan", "plan=file", f"plan.path={bad}", f"plan.out={tmp_path / 'o.json'}",
               "plan.search_time_s=0.5"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "cannot read the plan file" in err and "plan.path" in err
    rc = main(["plan", f"plan.path={tmp_path / 'missing.json'}", "plan.search_time_s=0.5"])
    assert rc == 2 and "the plan file does not exist" in capsys.readouterr().err


def test_relay_help_lists_plan_and_profile(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "plan " in out and "profile " in out
    assert main(["plan", "--help"]) == 0
    assert "relay plan" in capsys.readouterr().out


def test_train_refuses_pipeline_parallel_calls_as_simulation_only(tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "p.json"
    assert main(["plan", f"plan.out={out_file}", "plan.search_time_s=0.5"]) == 0  # per_role
    data = json.loads(out_file.read_text())
    data["calls"]["actor_gen"].update(mesh="d0-1", dp=1, tp=1, pp=2)
    edited = tmp_path / "pp.json"
    edited.write_text(json.dumps(data))
    capsys.readouterr()
    rc = main(["train", "plan=file", f"plan.path={edited}", f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "plan (file): actor_gen" in err and "simulation-only" in err
    assert not (tmp_path / "ppo-sort").exists()


def test_plans_keep_pp_1_unless_max_pp_allows_more(tmp_path: Path) -> None:
    """plan.max_pp = 1 (the default) keeps every mode's layouts executable; a what-if
    with plan.max_pp = 8 may pipeline."""
    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import make_plan

    cfg = load_config([*PAPER[:-1], f"run.output_dir={tmp_path}", "plan.search_time_s=1"],
                      for_run=False)  # fmt: skip
    for mode in ("symmetric", "search"):
        assert all(a.layout.pp == 1 for a in make_plan(cfg, mode).plan.values()), mode
    from orchestrator.runtime.planning import context
    from planner.search import layout_options

    deep = load_config([*PAPER, f"run.output_dir={tmp_path}"], for_run=False)
    assert any(lay.pp > 1 for lay in layout_options(context(deep), "actor_train", 16))
    assert all(lay.pp == 1 for lay in layout_options(context(cfg), "actor_train", 16))


def test_a_checkpoint_resumes_only_under_its_plan(tmp_path: Path) -> None:
    """Per-rank optimizer files are split as the plan splits them: a checkpoint written
    under one plan is refused under another, naming the calls and the fix; the plan=search
    of a resumed run is the one in its run folder."""
    from orchestrator.config.load import load_config
    from orchestrator.run.context import Run
    from orchestrator.run.folder import RunError
    from orchestrator.run.rl import check_plan
    from orchestrator.runtime.planning import make_plan, plan_for_run
    from planner.plan import to_dict

    cfg = load_config([f"run.output_dir={tmp_path}", "generate.backend=hf"], for_run=False)
    per_role, symmetric = make_plan(cfg, "per_role"), make_plan(cfg, "symmetric")
    ckpt = tmp_path / "step_2"
    ckpt.mkdir()
    calls = to_dict(per_role.ctx, per_role.plan, "per_role", None)["calls"]
    (ckpt / "controller.json").write_text(json.dumps({"step": 2, "plan": calls}))
    check_plan(Run.of(cfg, per_role), ckpt)  # the same plan: fine
    with pytest.raises(RunError, match="written under another plan") as e:
        check_plan(Run.of(cfg, symmetric), ckpt)
    assert "actor_gen" in str(e.value) and "plan=file plan.path=" in str(e.value)

    run_dir = tmp_path / "ppo-sort"
    run_dir.mkdir()
    (run_dir / "plan.json").write_text(json.dumps(to_dict(symmetric.ctx, symmetric.plan,
                                                          "search", None)))  # fmt: skip
    searched = load_config([f"run.output_dir={tmp_path}", "plan=search", "generate.backend=hf"])
    assert plan_for_run(searched).plan == symmetric.plan


def test_a_call_profile_prices_calls_as_measured(tmp_path: Path) -> None:
    """planner.measured through the config: a measured call costs its measured time
    (scaled by the roofline to more micro-batches, and by the cores it shares under the
    plan), an unmeasured one the roofline times its kind's measured ratio, every step pays
    the measured overhead; another job's profile is refused naming the field."""
    from orchestrator.config.load import load_config
    from orchestrator.config.schema import ConfigError
    from orchestrator.runtime.planning import context, job_identity, make_plan
    from planner.layout import Layout, Mesh
    from planner.plan import Assignment, evaluate

    cfg = load_config([], for_run=False)
    plain = context(cfg)
    prof = {
        "job": job_identity(cfg, plain.workload), "cores_per_node": 2, "step_overhead_s": 0.05,
        "kind_ratio": {"generate": 2.0, "inference": 3.0, "train": 4.0},
        "calls": [{"call": c.name, "mesh_size": 1, "dp": 1, "tp": 1, "seconds": 0.1 * (i + 1),
                   "cores": 2.0} for i, c in enumerate(plain.topo)],
    }  # fmt: skip
    path = tmp_path / "calls.json"
    path.write_text(json.dumps(prof))
    ctx = context(load_config([f"cluster.calls_profile={path}"], for_run=False))
    one = Assignment(Mesh(0, 1), Layout(1, 1, 1, 1))
    first = ctx.topo[0].name
    assert ctx.call_s(first, one) == pytest.approx(0.1)  # alone, as measured
    two_mb = Assignment(Mesh(0, 1), Layout(1, 1, 1, 2))
    scale = plain.roofline_s(first, two_mb) / plain.roofline_s(first, one)
    assert ctx.call_s(first, two_mb) == pytest.approx(0.1 * scale)
    dp2 = Assignment(Mesh(0, 2), Layout(2, 1, 1, 1))  # not measured: roofline x ratio
    train = next(c.name for c in ctx.topo if c.kind.value == "train")
    assert ctx.call_s(train, dp2) == pytest.approx(4.0 * plain.roofline_s(train, dp2))
    # per_role on 4 devices of 2 cores: the step's first call runs alone (2 cores), the
    # three inference calls share the node's 2 cores (2/3 core each, 3x slower)
    plan = make_plan(load_config([f"cluster.calls_profile={path}", "plan=per_role"],
                                 for_run=False)).plan  # fmt: skip
    slow = ctx.slowdowns(plan)
    assert slow["actor_gen"] == pytest.approx(1.0)
    assert slow["ref_inf"] == pytest.approx(3.0)
    est = evaluate(ctx, plan)
    assert est.call_s["ref_inf"] == pytest.approx(ctx.call_s("ref_inf", plan["ref_inf"]) * 3)
    base = evaluate(replace(ctx, measured=None, _call_s={}), plan)
    assert est.time_per_iteration_s != pytest.approx(base.time_per_iteration_s)
    # measured on one core too, a call follows its own curve: here two threads gained
    # nothing, so sharing 2 cores three ways (2/3 core each) costs 1.5x, not 3x
    ref_s = next(c["seconds"] for c in prof["calls"] if c["call"] == "ref_inf")
    prof["calls"].append({"call": "ref_inf", "mesh_size": 1, "dp": 1, "tp": 1, "seconds": ref_s,
                          "cores": 1.0})  # fmt: skip
    path.write_text(json.dumps(prof))
    curved = context(load_config([f"cluster.calls_profile={path}"], for_run=False))
    assert curved.slowdowns(plan)["ref_inf"] == pytest.approx(1.5)
    assert curved.call_s("ref_inf", one) == pytest.approx(ref_s)
    # another job's profile (another batch) is refused, naming the field and what differs
    with pytest.raises(ConfigError, match=r"cluster.calls_profile.*calls"):
        context(load_config([f"cluster.calls_profile={path}", "train.rollout_batch_prompts=32"],
                            for_run=False))  # fmt: skip


def test_profile_calls_measures_every_layout_all_calls_can_take(tmp_path: Path) -> None:
    """relay profile --calls: its layouts on the default job's 4 devices (the tiny model
    has 2 heads: tp up to 2), each as a plan file the runtime reads back; bad options
    exit 2 before anything runs."""
    from launch.profile_calls import candidate_layouts, plan_file
    from orchestrator.config.load import load_config
    from orchestrator.runtime.planning import context
    from planner.plan import load_plan_file

    ctx = context(load_config([], for_run=False))
    layouts = candidate_layouts(ctx)
    assert layouts == [(1, 1, 1), (2, 1, 2), (2, 2, 1), (4, 2, 2), (4, 4, 1)]
    plan = load_plan_file(plan_file(ctx, 4, 2, 2, tmp_path))
    assert {(a.mesh.size, a.layout.dp, a.layout.tp) for a in plan.values()} == {(4, 2, 2)}
    assert main(["profile", "--calls", "--steps", "0"]) == 2
    assert main(["profile", "--calls", "--out", str(tmp_path)]) == 2


def test_profile_calls_measures_later_layouts_on_the_first_runs_models(tmp_path: Path) -> None:
    """The first profiling run trains the job's SFT and reward models; every later run
    starts its RL stage from the finished ones (a stage's folder counts once DONE)."""
    from launch.profile_calls import reuse_models

    models = tmp_path / "models"
    assert reuse_models(tmp_path) == ()
    (models / "sft").mkdir(parents=True)
    (models / "reward").mkdir()
    (models / "reward" / "DONE").write_text("{}")
    assert reuse_models(tmp_path) == (f"reward.path={models / 'reward'}",)
    (models / "sft" / "DONE").write_text("{}")
    assert reuse_models(tmp_path) == ("sft.enabled=false", f"model.path={models / 'sft'}",
                                      f"reward.path={models / 'reward'}")  # fmt: skip


def test_search_runs_a_hand_made_plan_unless_estimated_min_gain_faster(tmp_path: Path) -> None:
    """plan.min_gain: the searched plan runs only when its estimate beats the best
    hand-made plan's by that fraction; otherwise the run gets that hand-made plan and says
    so. An out-of-range value is refused naming the field."""
    from orchestrator.config.load import load_config
    from orchestrator.config.schema import ConfigError
    from orchestrator.runtime.planning import hand_made_plans, make_plan

    job = [*PAPER, f"run.output_dir={tmp_path}", "plan=search", "plan.search_time_s=1"]
    free = make_plan(load_config([*job, "plan.min_gain=0"], for_run=False))
    hand = {m: make_plan(load_config(job, for_run=False), m) for m in hand_made_plans(free.ctx)}
    best = min(hand, key=lambda m: hand[m].estimate.time_per_iteration_s)
    best_s = hand[best].estimate.time_per_iteration_s
    gain = 1 - free.estimate.time_per_iteration_s / best_s
    assert free.plan != hand[best].plan and gain > 0, (best, gain)
    assert f"estimated {gain:.0%} faster than {best}" in free.reason
    strict = make_plan(load_config([*job, f"plan.min_gain={min(0.99, gain + 0.05):.2f}"],
                                   for_run=False))  # fmt: skip
    assert strict.mode == "search" and strict.plan == hand[best].plan
    assert strict.estimate.time_per_iteration_s == pytest.approx(best_s)
    assert f"running {best}'s plan" in strict.reason and "plan.min_gain=" in strict.reason
    with pytest.raises(ConfigError, match=r"plan.min_gain.*must be in \[0, 1\)"):
        load_config([*job, "plan.min_gain=1.5"], for_run=False)


def test_profile_calls_passes_alternate_so_drift_falls_on_every_layout() -> None:
    """relay profile --calls --rounds: every layout once per pass, every other pass
    backwards (the first layout, which trains the job's models, runs first); a round
    count below one exits 2 before anything runs."""
    from launch.profile_calls import pass_order

    assert pass_order(3, 1) == [0, 1, 2]
    assert pass_order(3, 2) == [0, 1, 2, 2, 1, 0]
    assert pass_order(2, 3) == [0, 1, 1, 0, 0, 1]
    assert main(["profile", "--calls", "--rounds", "0"]) == 2
