"""Plan-executing workers on a real two-node Ray cluster (two device slots per node): a
model trained data parallel over all four devices (DeepSpeed over gloo, across nodes),
reallocated to a tensor-parallel replica on the second node, runs a forward pass there
and comes back bit for bit."""

from __future__ import annotations

import sys
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


def _set_specs(worker, folder: str) -> None:
    from orchestrator.workers.spec import RoleSpec

    worker.specs = {"actor": RoleSpec("actor", "causal", folder, folder, "sort", 4)}


def test_train_reallocate_forward_across_nodes(two_nodes, tmp_path: Path) -> None:
    import ray
    from ray import cloudpickle
    from transformers import LlamaConfig, LlamaForCausalLM

    import tests.plan_training as training
    from orchestrator.workers.cluster import DeviceCluster

    # the workers run these test functions: send them by value (tests/ is not installed)
    cloudpickle.register_pickle_by_value(training)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    torch.manual_seed(0)
    folder = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(**CFG)).save_pretrained(folder)
    ids = torch.randint(0, 37, (8, 12), generator=torch.Generator().manual_seed(3))
    want_state, want_logits = reference(folder, ids)
    shape = shape_from_hf_config("actor", CFG)

    dc = DeviceCluster(num_nodes=2, devices_per_node=2, shardings=[TRAIN, GEN])

    def on(mesh, fn, *args):
        return ray.get([w.apply.remote(fn, *args) for w in dc.on(mesh)])

    def shards(sh):
        return ray.get([w.shards.remote("actor", sh) for w in dc.on(sh[0])])

    def reallocate(src, dst):
        devices = sorted(set(src[0].devices) | set(dst[0].devices))
        stats = ray.get([dc.workers[d].reallocate.remote("actor", src, dst, 2, 1) for d in devices])
        return {k: sum(s[k] for s in stats) for k in ("sent", "received", "local")}

    try:
        nodes = dc.node_ids()
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]
        ray.get([w.apply.remote(_set_specs, str(folder)) for w in dc.workers])
        ray.get([w.load.remote("actor", TRAIN) for w in dc.workers])
        batch = {"input_ids": ids}
        loss = on(TRAIN[0], training.train_step, "actor", TRAIN, batch, LR, "sgd")[0]
        assert 0 < loss < 10
        trained = shards(TRAIN)
        for rank in trained[1:]:  # the data-parallel replicas agree bit for bit
            assert all(torch.equal(rank[k], trained[0][k]) for k in trained[0])
        for k, v in want_state.items():  # and match one process's step on the whole batch
            torch.testing.assert_close(trained[0][k], v, rtol=0, atol=1e-5, msg=k)

        moved = reallocate(TRAIN, GEN)
        assert moved["received"] == 0 and moved["local"] > 0  # d2, d3 hold it all already
        gen = shards(GEN)
        for dev, held in zip(GEN[0].devices, gen):
            want = shard_state(trained[0], shape, GEN, dev)
            assert held.keys() == want.keys()
            assert all(torch.equal(held[k], want[k]) for k in want)
        outs = on(GEN[0], training.forward, "actor", GEN, batch)
        logits = torch.cat([o for o in outs if o is not None])
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)

        # a replica on the first node only, from the second node's tp replica: real traffic
        other = (Mesh(0, 2), Layout(2, 1, 1))
        moved = reallocate(GEN, other)
        assert moved["received"] > 0
        back = shards(other)
        assert all(torch.equal(back[0][k], trained[0][k]) for k in trained[0])
        assert all(torch.equal(back[1][k], trained[0][k]) for k in trained[0])
    finally:
        dc.shutdown()
