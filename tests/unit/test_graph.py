"""Dataflow graphs: built and checked when declared."""

from __future__ import annotations

import pytest
import torch

from algos.graph import MFC, CallKind, DataflowGraph, GraphError, check_outputs
from algos.ppo import ppo_graph, sft_graph

INF, T = CallKind.INFERENCE, CallKind.TRAIN
PROMPT = ("prompt_ids", "prompt_mask")


def test_ppo_graph_shape() -> None:
    g = ppo_graph()
    assert [c.name for c in g.order][0] == "actor_gen"
    assert {c.name for c in g.order[-2:]} == {"actor_train", "critic_train"}
    for name in ("ref_inf", "reward_inf", "critic_inf"):
        assert g.parents(g.call(name)) == ["actor_gen"]
    assert g.parents(g.call("actor_train")) == ["actor_gen", "critic_inf", "ref_inf", "reward_inf"]
    assert g.roles == ("actor", "ref", "reward", "critic")
    assert g.trainable_roles == ("actor", "critic")
    assert len(g.calls) == 6


def test_ready_returns_calls_whose_inputs_are_done() -> None:
    g = ppo_graph()
    assert [c.name for c in g.ready(set(), set())] == ["actor_gen"]
    assert [c.name for c in g.ready(set(), {"actor_gen"})] == []
    after_gen = {c.name for c in g.ready({"actor_gen"}, set())}
    assert after_gen == {"ref_inf", "reward_inf", "critic_inf"}
    assert {c.name for c in g.ready({"actor_gen", "ref_inf", "reward_inf"}, set())} == {
        "critic_inf"
    }


def test_sft_graph() -> None:
    g = sft_graph()
    assert [c.name for c in g.calls] == ["actor_sft"] and g.trainable_roles == ("actor",)


def build(*calls: MFC) -> DataflowGraph:
    return DataflowGraph("test", calls, dataset_keys=PROMPT)


def test_missing_producer() -> None:
    with pytest.raises(GraphError) as err:
        build(MFC("train", "actor", T, "x", (*PROMPT, "scores")))
    assert "call 'train' reads 'scores', which no call produces" in str(err.value)


def test_two_producers() -> None:
    with pytest.raises(GraphError, match="key 'values' has two producers: 'a' and 'b'"):
        build(
            MFC("a", "critic", INF, "x", PROMPT, ("values",)),
            MFC("b", "critic2", INF, "x", PROMPT, ("values",)),
        )


def test_cycle() -> None:
    with pytest.raises(GraphError, match="cycle: ") as err:
        build(
            MFC("a", "r1", INF, "x", ("scores",), ("values",)),
            MFC("b", "r2", INF, "x", ("values",), ("scores",)),
        )
    assert "a" in str(err.value) and "b" in str(err.value)


def test_undeclared_key_and_duplicate_names_are_listed_together() -> None:
    with pytest.raises(GraphError) as err:
        build(
            MFC("a", "r", INF, "x", PROMPT, ("vaules",)),
            MFC("a", "r", INF, "x", PROMPT, ("scores",)),
        )
    assert "key 'vaules' is not declared" in str(err.value)
    assert "call name 'a' is used by 2 calls" in str(err.value)
    assert len(err.value.problems) == 2


def test_train_calls_produce_nothing() -> None:
    with pytest.raises(GraphError, match="a train call produces no keys"):
        build(MFC("t", "actor", T, "x", PROMPT, ("scores",)))


def test_check_outputs() -> None:
    call = MFC("c", "critic", INF, "values", PROMPT, ("values",))
    check_outputs(call, {"values": torch.zeros(2, 3)})
    with pytest.raises(GraphError, match="'values' is torch.int64"):
        check_outputs(call, {"values": torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(GraphError, match="missing outputs"):
        check_outputs(call, {})
    with pytest.raises(GraphError, match="undeclared outputs"):
        check_outputs(call, {"values": torch.zeros(2, 3), "scores": torch.zeros(2)})
