"""Dataflow graphs: built and checked when declared."""

from __future__ import annotations

import pytest
import torch

from algos.graph import MFC, CallKind, DataflowGraph, GraphError, check_outputs
from algos.ppo import ppo_graph, sft_graph

GEN, INF, T = CallKind.GENERATE, CallKind.INFERENCE, CallKind.TRAIN
PROMPT = ("prompt_ids", "prompt_mask")
INFERENCE_CALLS = {"ref_inf", "reward_inf", "critic_inf"}
TRAIN_CALLS = {"actor_train", "critic_train"}


# ---------------------------------------------------------------- the declared graphs


def test_ppo_graph_order() -> None:
    g = ppo_graph()
    order = [c.name for c in g.order]
    assert len(order) == 6 and set(order) == {"actor_gen"} | INFERENCE_CALLS | TRAIN_CALLS
    # actor_gen first, the three inference calls next (any order), the trainers last
    assert order[0] == "actor_gen"
    assert set(order[1:4]) == INFERENCE_CALLS
    assert set(order[4:]) == TRAIN_CALLS


def test_ppo_graph_parents() -> None:
    g = ppo_graph()
    assert g.parents(g.call("actor_gen")) == []  # reads only dataset keys
    for name in INFERENCE_CALLS:
        assert g.parents(g.call(name)) == ["actor_gen"]
    for name in TRAIN_CALLS:
        assert g.parents(g.call(name)) == ["actor_gen", "critic_inf", "ref_inf", "reward_inf"]
    assert g.producer["values"] == "critic_inf"
    assert g.producer["ref_logprobs"] == "ref_inf"
    assert g.producer["logprobs"] == "actor_gen"
    assert g.producer["prompt_ids"] == "<dataset>"


def test_ppo_graph_roles() -> None:
    g = ppo_graph()
    assert g.roles == ("actor", "ref", "reward", "critic")
    assert g.trainable_roles == ("actor", "critic")
    assert g.call("actor_gen").kind is GEN
    assert all(g.call(n).kind is T and g.call(n).outputs == () for n in TRAIN_CALLS)
    with pytest.raises(KeyError, match="no call 'nope' in graph 'ppo'"):
        g.call("nope")


def test_ready_returns_calls_whose_inputs_are_done() -> None:
    g = ppo_graph()
    assert [c.name for c in g.ready(set(), set())] == ["actor_gen"]
    # a running call is not offered again
    assert [c.name for c in g.ready(set(), {"actor_gen"})] == []
    after_gen = {c.name for c in g.ready({"actor_gen"}, set())}
    assert after_gen == INFERENCE_CALLS
    assert {c.name for c in g.ready({"actor_gen"}, {"ref_inf"})} == {"reward_inf", "critic_inf"}
    # the trainers wait for all three inference calls
    assert {c.name for c in g.ready({"actor_gen", "ref_inf", "reward_inf"}, set())} == {
        "critic_inf"
    }
    inferred = {"actor_gen"} | INFERENCE_CALLS
    assert {c.name for c in g.ready(inferred, set())} == TRAIN_CALLS
    assert g.ready(inferred | TRAIN_CALLS, set()) == []


def test_sft_graph() -> None:
    g = sft_graph()
    assert [c.name for c in g.calls] == ["actor_sft"] and g.trainable_roles == ("actor",)
    assert [c.name for c in g.order] == ["actor_sft"]
    assert g.parents(g.call("actor_sft")) == []  # everything comes from the dataset


# ---------------------------------------------------------------- errors found when built


def build(*calls: MFC, dataset_keys: tuple[str, ...] = PROMPT) -> DataflowGraph:
    return DataflowGraph("test", calls, dataset_keys=dataset_keys)


def test_missing_producer() -> None:
    with pytest.raises(GraphError) as err:
        build(MFC("train", "actor", T, "x", (*PROMPT, "scores")))
    msg = str(err.value)
    assert msg.startswith("dataflow graph 'test' is invalid")
    assert "call 'train' reads 'scores', which no call produces" in msg
    assert len(err.value.problems) == 1


def test_two_producers() -> None:
    with pytest.raises(GraphError) as err:
        build(
            MFC("a", "critic", INF, "x", PROMPT, ("values",)),
            MFC("b", "critic2", INF, "x", PROMPT, ("values",)),
        )
    assert err.value.problems == ["key 'values' has two producers: 'a' and 'b'"]


def test_producing_a_dataset_key_is_a_second_producer() -> None:
    with pytest.raises(GraphError, match="key 'prompt_ids' has two producers: '<dataset>' and 'a'"):
        build(MFC("a", "r", INF, "x", PROMPT, ("prompt_ids",)))


def test_cycle() -> None:
    with pytest.raises(GraphError) as err:
        build(
            MFC("a", "r1", INF, "x", ("scores",), ("values",)),
            MFC("b", "r2", INF, "x", ("values",), ("scores",)),
        )
    # a reads scores (from b), b reads values (from a)
    assert err.value.problems == ["cycle: a -> b -> a"]


def test_self_cycle() -> None:
    with pytest.raises(GraphError) as err:
        build(MFC("loop", "r", INF, "x", (*PROMPT, "values"), ("values",)))
    assert err.value.problems == ["cycle: loop -> loop"]


def test_undeclared_key() -> None:
    with pytest.raises(GraphError) as err:
        build(MFC("a", "r", INF, "x", PROMPT, ("vaules",)))
    msg = str(err.value)
    assert "call 'a': key 'vaules' is not declared" in msg
    assert "'values'" in msg  # the declared keys are listed, so the typo is easy to spot


def test_undeclared_dataset_key() -> None:
    with pytest.raises(GraphError, match="dataset key 'prompt_text' is not a declared key"):
        build(MFC("a", "r", INF, "x", PROMPT, ("values",)), dataset_keys=(*PROMPT, "prompt_text"))


def test_duplicate_call_names() -> None:
    with pytest.raises(GraphError) as err:
        build(
            MFC("a", "r", INF, "x", PROMPT, ("values",)),
            MFC("a", "r", INF, "x", PROMPT, ("scores",)),
        )
    assert err.value.problems == ["call name 'a' is used by 2 calls; names must be unique"]


def test_problems_are_listed_together() -> None:
    with pytest.raises(GraphError) as err:
        build(
            MFC("a", "r", INF, "x", PROMPT, ("vaules",)),
            MFC("a", "r", INF, "x", PROMPT, ("scores",)),
        )
    assert "key 'vaules' is not declared" in str(err.value)
    assert "call name 'a' is used by 2 calls" in str(err.value)
    assert len(err.value.problems) == 2


def test_train_calls_produce_nothing() -> None:
    with pytest.raises(GraphError, match="call 't': a train call produces no keys"):
        build(MFC("t", "actor", T, "x", PROMPT, ("scores",)))


def test_empty_graph() -> None:
    with pytest.raises(GraphError, match="the graph has no calls"):
        build()


# ---------------------------------------------------------------- check_outputs


def test_check_outputs() -> None:
    call = MFC("c", "critic", INF, "values", PROMPT, ("values",))
    check_outputs(call, {"values": torch.zeros(2, 3)})  # as declared: no error
    with pytest.raises(GraphError) as err:
        check_outputs(call, {"values": torch.zeros(2, 3, dtype=torch.long)})
    assert "'c outputs'" in str(err.value)
    assert "'values' is torch.int64 with 2 dims, declared torch.float32 [B,T]" in str(err.value)
    with pytest.raises(GraphError, match=r"missing outputs \['values'\]"):
        check_outputs(call, {})
    with pytest.raises(GraphError, match=r"undeclared outputs \['scores'\]"):
        check_outputs(call, {"values": torch.zeros(2, 3), "scores": torch.zeros(2)})


def test_check_outputs_wrong_rank() -> None:
    call = MFC("r", "reward", INF, "x", PROMPT, ("scores",))
    check_outputs(call, {"scores": torch.zeros(4)})
    with pytest.raises(GraphError, match="'scores' is torch.float32 with 2 dims, declared"):
        check_outputs(call, {"scores": torch.zeros(4, 1)})


def test_remax_calls_fuse_into_one_generation_and_one_reward_task() -> None:
    """Under one placement, ReMax's sampled and greedy generations become one task, then
    their two reward calls (ready together once the generations are one task); the
    reference and the train call stay alone. Placed apart, nothing fuses."""
    from algos.graph import FUSABLE_INTERFACES, fused_groups
    from algos.ppo import remax_graph
    from orchestrator.interfaces.lookup import fusable

    g = remax_graph()
    one = {c.name: "d0" for c in g.calls}
    names = [tuple(c.name for c in grp) for grp in fused_groups(g, one)]
    assert names == [
        ("actor_gen", "actor_greedy_gen"),
        ("ref_inf",),
        ("reward_inf", "reward_greedy_inf"),
        ("actor_train",),
    ]
    apart = {**one, "actor_greedy_gen": "d1"}
    assert all(len(grp) == 1 for grp in fused_groups(g, apart))
    assert [
        len(grp) for grp in fused_groups(ppo_graph(), {c.name: "d0" for c in ppo_graph().calls})
    ] == [1] * 6
    # the runtime fuses exactly the interfaces the graph (and the planner) call fusable
    assert all(fusable(name) for name in FUSABLE_INTERFACES)
    assert not fusable("logprobs")


def test_concurrent_calls_are_neither_ancestors_nor_descendants() -> None:
    from planner.threads import concurrent

    g = ppo_graph()
    c = concurrent({x.name: g.parents(x) for x in g.calls})
    assert c["actor_gen"] == set()
    assert c["ref_inf"] == {"critic_inf", "reward_inf"}
    assert c["actor_train"] == {"critic_train"}
    # the next step's rollout launched while this step trains: each side beside the other
    trains = frozenset({"actor_train", "critic_train"})
    o = concurrent({x.name: g.parents(x) for x in g.calls}, trains)
    assert o["actor_gen"] == set(trains)
    assert o["actor_train"] == {"critic_train", "actor_gen", "ref_inf", "reward_inf", "critic_inf"}


def test_overlapped_train_and_generation_share_the_cores() -> None:
    """GRPO with the train call on device 0 and the rollout on device 1: alone, each gets
    both cores; overlapped (train.overlap_generation), one each."""
    from algos.ppo import ALGORITHM_GRAPHS
    from planner.layout import Mesh
    from planner.threads import call_threads

    g = ALGORITHM_GRAPHS["grpo"]()
    parents = {c.name: g.parents(c) for c in g.calls}
    meshes = {"actor_gen": Mesh(1, 1), "ref_inf": Mesh(1, 1), "reward_inf": Mesh(1, 1),
              "actor_train": Mesh(0, 1)}  # fmt: skip
    assert call_threads(parents, meshes, 2, 2, 1)["actor_train"] == 2
    assert call_threads(parents, meshes, 2, 2, 1)["actor_gen"] == 2
    overlapped = call_threads(parents, meshes, 2, 2, 1, overlapped=frozenset({"actor_train"}))
    assert overlapped["actor_train"] == overlapped["actor_gen"] == 1


def test_a_call_running_alone_gets_every_core() -> None:
    """planner.threads: the node's cores split among the devices busy while a call runs."""
    from planner.layout import Mesh
    from planner.threads import call_threads

    g = ppo_graph()
    parents = {c.name: g.parents(c) for c in g.calls}
    on = {"actor_gen": 0, "ref_inf": 1, "reward_inf": 2, "critic_inf": 3, "actor_train": 0,
          "critic_train": 3}  # fmt: skip
    meshes = {n: Mesh(d, 1) for n, d in on.items()}
    t = call_threads(parents, meshes, 4, 2, 1)
    assert t["actor_gen"] == 2  # alone: both cores
    assert t["ref_inf"] == t["reward_inf"] == t["critic_inf"] == 1  # three at once
    assert t["actor_train"] == t["critic_train"] == 1  # beside each other
    assert call_threads(parents, meshes, 4, 16, 1)["critic_train"] == 8
    assert call_threads(parents, meshes, 4, 2, 3)["actor_gen"] == 3  # never below the device's
    # a verifier's call (no model) keeps no device busy: the three inference calls are two
    light = frozenset({"reward_inf"})
    assert call_threads(parents, meshes, 4, 4, 1, light)["ref_inf"] == 2
    # ReMax fused: the greedy reward call waits for the fused generation, which then
    # runs alone on its device and gets both cores
    from algos.graph import fused_groups
    from algos.ppo import remax_graph
    from planner.threads import fused_parents

    r = remax_graph()
    on_r = {"actor_gen": 0, "actor_greedy_gen": 0, "ref_inf": 1, "reward_inf": 2,
            "reward_greedy_inf": 2, "actor_train": 0}  # fmt: skip
    groups = [[c.name for c in g] for g in fused_groups(r, on_r)]
    fused = fused_parents({c.name: r.parents(c) for c in r.calls}, groups)
    m_r = {n: Mesh(d, 1) for n, d in on_r.items()}
    assert call_threads(fused, m_r, 4, 2, 1)["actor_gen"] == 2
    assert call_threads({c.name: r.parents(c) for c in r.calls}, m_r, 4, 2, 1)["actor_gen"] == 1
    # a call on two devices of a 16-core node, alone: 8 threads each
    two = {n: Mesh(0, 2) for n in on}
    assert call_threads(parents, two, 4, 16, 1)["actor_gen"] == 8


def test_overlap_names_the_calls_that_share_a_train_device() -> None:
    """train.overlap_generation under a plan whose rollout and train calls share devices:
    the run says which (orchestrator.run.rl.shared_devices); none under the split plan."""
    from algos.ppo import ALGORITHM_GRAPHS
    from orchestrator.run.rl import shared_devices
    from planner.layout import Layout, Mesh

    g = ALGORITHM_GRAPHS["grpo"]()
    one = (Layout(1, 1, 1),)
    split = {"actor_gen": (Mesh(1, 1), *one), "ref_inf": (Mesh(1, 1), *one),
             "reward_inf": (Mesh(1, 1), *one), "actor_train": (Mesh(0, 1), *one)}  # fmt: skip
    assert shared_devices(g, split) == ""
    wide = {**split, "ref_inf": (Mesh(0, 2), *one)}
    assert shared_devices(g, wide) == "ref_inf and actor_train on device 0"
    wide["actor_train"] = (Mesh(0, 2), *one)
    assert shared_devices(g, wide) == (
        "actor_gen and actor_train on device 1; ref_inf and actor_train on devices 0, 1; "
        "reward_inf and actor_train on device 1"
    )
