"""`relay submit | status | logs | stop` against a real two-node Ray cluster started on
this machine (a head with the job server and four device slots, and a second node)."""

from __future__ import annotations

import json
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from launch.cli import main
from launch.jobs import _client, wait_for
from tests.integration.tiny import ONE_DEVICE, RL_ONLY, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.multinode, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job_server():
    """A head node (job server, 2 CPUs, 4 relay_device slots) plus a second node."""
    from ray.cluster_utils import Cluster

    # a port picked free may be taken before the dashboard binds it (Ray's own processes
    # take ports meanwhile): try a fresh one, a few times
    for attempt in range(3):
        port = _free_port()
        try:
            cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": 2,
                    "resources": {"relay_device": 4},
                    "include_dashboard": True,
                    "dashboard_host": "127.0.0.1",
                    "dashboard_port": port,
                },
            )
            break
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception here
            if attempt == 2:
                raise
            import ray

            ray.shutdown()
    # The second node gets a temp dir of its own: nodes sharing one machine would otherwise
    # share the folder where Ray unpacks a job's working_dir, and one node's cleanup
    # would delete the other's.
    node2 = tempfile.mkdtemp(prefix="relay-node2-")
    cluster.add_node(num_cpus=1, resources={"relay_device": 0}, temp_dir=node2)
    cluster.wait_for_nodes()
    assert len(cluster.list_all_nodes()) == 2
    address = f"http://127.0.0.1:{port}"
    client = _client(address)
    for _ in range(60):  # the job server starts a little after the head
        try:
            client.list_jobs()
            break
        except Exception:  # noqa: BLE001
            import time

            time.sleep(1)
    yield address
    cluster.shutdown()


def _submit(address: str, overrides: list[str], capsys) -> str:
    rc = main(["submit", "--address", address, "--python", sys.executable, *overrides])
    out = capsys.readouterr().out
    assert rc == 0, out
    job_id = out.split("job ")[1].split()[0]
    assert f"relay logs {job_id} --follow" in out
    return job_id


def test_submit_stop_checkpoints_and_resubmit_completes(
    job_server: str, tmp_path: Path, capsys
) -> None:
    # every role on one device: the subject is the job server, not placement (one worker
    # to start per job instead of three)
    extra = ("run.save_every_steps=1000", "logger.wandb_mode=offline", *RL_ONLY, ONE_DEVICE)
    overrides = tiny_overrides(tmp_path, "long", 400, *extra)
    job_id = _submit(job_server, overrides, capsys)
    client = _client(job_server)
    # wait until RL steps run (the first checkpoint would only come at step 400)
    import time

    metrics = tmp_path / "long" / "metrics.jsonl"
    end = time.monotonic() + 600
    while time.monotonic() < end:
        rows = metrics.read_text().splitlines() if metrics.exists() else []
        if sum('"stage": "rl"' in r for r in rows) >= 3:
            break
        assert wait_for(client, job_id, {"FAILED"}, 1) != "FAILED", client.get_job_logs(job_id)
        time.sleep(2)
    assert main(["stop", job_id, "--address", job_server]) == 0
    assert "asked job" in capsys.readouterr().out
    assert wait_for(client, job_id, {"STOPPED", "SUCCEEDED", "FAILED"}, 300) == "STOPPED"
    assert "stopped at step" in client.get_job_logs(job_id)  # a graceful stop, not a kill
    latest = (tmp_path / "long" / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 1 <= stopped_at < 400
    # resubmitting the same overrides continues from that checkpoint
    more = tiny_overrides(tmp_path, "long", stopped_at + 1, *extra)
    again = _submit(job_server, more, capsys)  # train.steps may change on resume
    assert wait_for(client, again, {"SUCCEEDED", "FAILED", "STOPPED"}, 600) == "SUCCEEDED", (
        client.get_job_logs(again)
    )
    assert main(["status", again, "--address", job_server]) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and str(tmp_path / "long") in out
    assert main(["logs", again, "--address", job_server]) == 0
    assert "relay train: done" in capsys.readouterr().out
    run_dir = tmp_path / "long"  # run.output_dir made absolute: the run folder is here
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["mode"] == "symmetric"  # plan=auto on one device
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at + 1}"
    steps = [
        json.loads(r)["step"]
        for r in metrics.read_text().splitlines()
        if json.loads(r)["stage"] == "rl"
    ]
    assert steps.count(stopped_at + 1) == 1 and max(steps) == stopped_at + 1
    # every stage of both jobs wrote to the one wandb run (offline folders end with its id;
    # the first job's RL stage and the resubmitted one's)
    marker = json.loads((tmp_path / "long" / "relay_run.json").read_text())
    runs = sorted((tmp_path / "long" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(marker["wandb_id"]) for r in runs)


def test_bad_input_never_reaches_the_cluster(tmp_path: Path, capsys) -> None:
    # an unreachable job server: a clear error naming --address
    rc = main(["submit", "--address", "http://127.0.0.1:9", f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "--address" in err and "ray start --head" in err
    # a bad config is refused before any submission
    rc = main(["submit", "--address", "http://127.0.0.1:9", "train.stpes=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.stpes" in err and "did you mean 'train.steps'" in err


def test_unknown_job_id(job_server: str, capsys) -> None:
    for cmd in ("status", "logs", "stop"):
        assert main([cmd, "raysubmit_nonexistent", "--address", job_server]) == 2
        assert "no such job" in capsys.readouterr().err
