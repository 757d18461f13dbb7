"""Where metrics go: metrics.jsonl, wandb (offline unless configured online), a console
progress bar with ETA and a one-line summary per step, and a PNG of learning curves."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

SUMMARY_KEYS = (
    ("reward", "rollout/reward_mean"),
    ("acc", "rollout/task_accuracy"),
    ("kl", "rollout/kl_to_ref_token_mean"),
    ("pg", "loss/policy"),
    ("vf", "loss/value"),
    ("sft", "loss/sft"),
    ("rm", "loss/reward_model"),
    ("rm_acc", "train/reward_accuracy"),
    ("greedy", "eval/greedy_accuracy"),
    ("s/step", "time/step_s"),
)

PLOT_KEYS = (
    "rollout/reward_mean",
    "rollout/task_accuracy",
    "eval/greedy_accuracy",
    "eval/sampled_accuracy",
    "rollout/kl_to_ref_token_mean",
    "loss/policy",
    "loss/value",
    "train/explained_variance",
    "loss/sft",
    "loss/reward_model",
    "train/reward_accuracy",
    "eval/reward_model_accuracy",
)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill; dropped
                continue
    return rows


class Tracker:
    """One per stage of a run. On resume, metrics after the restored step are dropped
    from metrics.jsonl first, so the file reads as if the run had never stopped."""

    def __init__(
        self,
        run_dir: Path,
        stage: str,
        total_steps: int,
        start_step: int,
        wandb_mode: str,
        wandb_project: str,
        wandb_id: str,
        run_name: str,
        config: dict[str, Any],
        progress: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.path = self.run_dir / "metrics.jsonl"
        kept = [
            r
            for r in read_metrics(self.path)
            if r.get("stage") != stage or (start_step > 0 and r["step"] <= start_step)
        ]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self.wandb = None
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=wandb_project,
                name=run_name,
                id=wandb_id,
                resume="allow",
                dir=str(self.run_dir),
                mode=wandb_mode,
                config=config,
            )
        self.total, self.start_step = total_steps, start_step
        self.t0 = time.perf_counter()
        self.bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=stage,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """Write one row to metrics.jsonl and wandb (no progress update)."""
        row = {"stage": self.stage, "step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.wandb is not None:
            try:
                self.wandb.log({f"{self.stage}/step": step, **metrics})
            except Exception as e:  # noqa: BLE001 - the service process can be gone
                self._lost_wandb(e)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record a finished step, advance the progress bar, print its summary line."""
        self.record(step, metrics)
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        line = f"[{self.stage} {step}/{self.total} eta {eta:.0f}s] " + " ".join(
            f"{short} {metrics[key]:.4g}" for short, key in SUMMARY_KEYS if key in metrics
        )
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(line)
        else:
            print(line, flush=True)

    def _lost_wandb(self, e: Exception) -> None:
        """wandb's service process died (a stop signal to the whole process tree, as Ray
        Jobs send it, reaches it too): keep running, metrics.jsonl still has every row."""
        print(
            f"relay: wandb stopped answering ({type(e).__name__}: {e}); metrics continue "
            f"in {self.path} only",
            file=sys.stderr,
            flush=True,
        )
        self.wandb = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001
                self._lost_wandb(e)


def plot_learning_curves(run_dir: Path) -> Path | None:
    """Draw every plotted metric against its step into run_dir/learning_curves.png."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        for key in PLOT_KEYS:
            pts = [(r["step"], r[key]) for r in rows if r["stage"] == stage and key in r]
            pts = [(s, v) for s, v in pts if isinstance(v, (int, float)) and math.isfinite(v)]
            if pts:
                series.append((f"{stage}: {key}", pts))
    if not series:
        return None
    cols = 3
    rows_n = -(-len(series) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 2.8 * rows_n), squeeze=False)
    for ax, (title, pts) in zip(axes.flat, series):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(run_dir) / "learning_curves.png"
    tmp = out.with_name(".learning_curves.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)
    return out
