"""`relay profile --quick`: the measured profile's keys and sanity, and bad options."""

from __future__ import annotations

import json
import math

import pytest

from launch.profile import profile

TOP_KEYS = {
    "device_kind", "threads_per_device", "measured_at", "host", "torch", "matmul_flops_s",
    "copy_bytes_s", "link_bytes_s", "link_latency_s", "flops_s", "bytes_s", "layers", "command",
    "tp_collective_s", "tensor_parallel", "decode_step_overhead_s", "allreduce_bytes_s",
}  # fmt: skip
LAYER_KEYS = {
    "hidden", "intermediate", "heads", "kv_heads", "tokens", "seq_len", "forward_s",
    "forward_backward_s", "decode_batch", "kv_len", "decode_step_s",
}  # fmt: skip
FIGURES = ["matmul_flops_s", "copy_bytes_s", "link_bytes_s", "link_latency_s", "flops_s", "bytes_s",
           "tp_collective_s", "decode_step_overhead_s", "allreduce_bytes_s"]  # fmt: skip


def _positive_finite(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.integration
def test_quick_profile_writes_sane_figures(tmp_path):
    out = tmp_path / "p.json"
    assert profile(["--quick", "--out", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temp file left behind
    prof = json.loads(out.read_text())
    assert set(prof) == TOP_KEYS
    assert prof["device_kind"] == "cpu" and prof["threads_per_device"] == 1
    assert prof["command"] == f"relay profile --quick --out {out}"
    for key in FIGURES:
        assert _positive_finite(prof[key]), (key, prof[key])
    # A decoder layer's forward+backward cannot beat a plain square matmul by much.
    assert prof["flops_s"] < 1.5 * prof["matmul_flops_s"]
    tp = prof["tensor_parallel"]
    assert tp["tp_collective_s"] == prof["tp_collective_s"] and tp["tp2_s"] > 0 < tp["tp1_s"]
    from planner.catalogue import device_kind

    assert device_kind("cpu", out).tp_collective_s == prof["tp_collective_s"]
    assert len(prof["layers"]) == 2
    for row in prof["layers"]:
        assert set(row) == LAYER_KEYS
        for key in ("forward_s", "forward_backward_s", "decode_step_s"):
            assert _positive_finite(row[key]), (key, row)
        assert row["forward_backward_s"] > row["forward_s"], row


@pytest.mark.integration
@pytest.mark.parametrize(
    "bad, named",
    [
        (["--threads", "0"], "--threads = 0"),
        (["--hidden", "65"], "--hidden = 65"),
        (["--heads", "4", "--kv-heads", "3"], "--kv-heads = 3"),
        (["--tokens", "200"], "--tokens = [200]"),
        (["--tokens", "a,b"], "--tokens"),
    ],
)
def test_bad_option_returns_2_and_writes_nothing(tmp_path, capsys, bad, named):
    out = tmp_path / "sub" / "p.json"
    assert profile(["--quick", "--out", str(out), *bad]) == 2
    assert list(tmp_path.iterdir()) == []
    message = capsys.readouterr().out
    assert named in message and "Fix:" in message


@pytest.mark.integration
def test_malformed_option_returns_2(tmp_path, capsys):
    assert profile(["--threads", "x", "--out", str(tmp_path / "p.json")]) == 2
    assert list(tmp_path.iterdir()) == []
    assert "--threads" in capsys.readouterr().err
