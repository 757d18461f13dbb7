"""Plan-executing workers on a real two-node Ray cluster (two device slots per node): a
model trained data parallel over all four devices (DeepSpeed over gloo, across nodes),
reallocated to a tensor-parallel replica on the second node, runs a forward pass there
and comes back bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.workers.realloc import shard_state
from planner.catalogue import shape_from_hf_config
from planner.layout import Layout, Mesh

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CFG = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
           intermediate_size=192, vocab_size=37, tie_word_embeddings=False)  # fmt: skip
TRAIN = (Mesh(0, 4), Layout(4, 1, 1))  # both nodes
GEN = (Mesh(2, 2), Layout(1, 2, 1))  # the second node, tensor parallel
LR = 0.5


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"relay_device": 2},
                        "include_dashboard": False},
    )  # fmt: skip
    cluster.add_node(num_cpus=1, resources={"relay_device": 2},
                     temp_dir=str(tmp_path_factory.mktemp("node2")))  # fmt: skip
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def reference(folder: Path, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One SGD step on the whole batch in this process, and the new model's logits. (SGD:
    Adam's first step moves every weight by about lr x sign(gradient), so gradients that
    differ by rounding near zero would move weights by lr in opposite directions.)"""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        return dict(model.state_dict()), model.eval()(input_ids=ids).logits


def test_train_reallocate_forward_across_nodes(two_nodes, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.workers.device_worker import DeviceCluster

    torch.manual_seed(0)
    folder = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(**CFG)).save_pretrained(folder)
    ids = torch.randint(0, 37, (8, 12), generator=torch.Generator().manual_seed(3))
    want_state, want_logits = reference(folder, ids)
    shape = shape_from_hf_config("actor", CFG)

    dc = DeviceCluster(num_nodes=2, devices_per_node=2, shardings=[TRAIN, GEN])
    try:
        nodes = dc.node_ids()
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]
        dc.load("actor", str(folder), TRAIN)
        loss = dc.train_step("actor", TRAIN, {"input_ids": ids}, LR, optimizer="sgd")
        assert 0 < loss < 10
        trained = dc.shards("actor", TRAIN)
        for rank in trained[1:]:  # the data-parallel replicas agree bit for bit
            assert all(torch.equal(rank[k], trained[0][k]) for k in trained[0])
        for k, v in want_state.items():  # and match one process's step on the whole batch
            torch.testing.assert_close(trained[0][k], v, rtol=0, atol=1e-5, msg=k)

        moved = dc.reallocate("actor", TRAIN, GEN)
        assert moved["received"] == 0 and moved["local"] > 0  # d2, d3 hold it all already
        gen = dc.shards("actor", GEN)
        for dev, held in zip(GEN[0].devices, gen):
            want = shard_state(trained[0], shape, GEN, dev)
            assert held.keys() == want.keys()
            assert all(torch.equal(held[k], want[k]) for k in want)
        logits = dc.forward("actor", GEN, {"input_ids": ids})
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)

        # a replica on the first node only, from the second node's tp replica: real traffic
        other = (Mesh(0, 2), Layout(2, 1, 1))
        moved = dc.reallocate("actor", GEN, other)
        assert moved["received"] > 0
        back = dc.shards("actor", other)
        assert all(torch.equal(back[0][k], trained[0][k]) for k in trained[0])
        assert all(torch.equal(back[1][k], trained[0][k]) for k in trained[0])
        # the trained replica holds optimizer state: weights never flow into it
        import ray

        with pytest.raises(ray.exceptions.RayTaskError, match="reallocate from a trained"):
            dc.reallocate("actor", GEN, TRAIN)
    finally:
        dc.shutdown()
