"""The device worker's evaluation: correctness and reward of a replica's responses to
held-out rows (a mixin of DeviceWorker, whose Ray actor serves these methods)."""

from __future__ import annotations

from typing import Any

from orchestrator.workers.failures import portable
from orchestrator.workers.groups import Sharding


class Evaluating:
    """DeviceWorker's `evaluate`."""

    @portable
    def evaluate(
        self, role: str, sharding: Sharding, count: int, params: Any, version: int
    ) -> tuple[int, list[float], list[float]] | None:
        """Correctness and reward of responses to this dp rank's share of the first `count`
        evaluation rows (np.array_split order); None from all but the first rank of each tp
        group. Correctness is NaN where nothing says (a function without "correct")."""
        import numpy as np

        from orchestrator.data.scoring import score_rows
        from orchestrator.data.text import decode_responses, encode_prompts

        rep = self._replica(role, sharding)
        rep.version = version
        ctx = self._context(rep, train=False, generates=True)
        dp_i, dp, first = self._ranks(sharding)
        mine = self.rows.at("eval", np.array_split(np.arange(count), dp)[dp_i])
        if not mine:
            return (dp_i, [], [], {}) if first else None
        ids, mask = encode_prompts(ctx.tokenizer, [r.text for r in mine],
                                   add_bos=not mine[0].templated)  # fmt: skip
        self._reload(rep.key)
        try:
            gen = ctx.generator.generate(ids.to(self.torch_device), mask.to(self.torch_device),
                                         params)  # fmt: skip
        finally:
            if rep.key in self.parked:
                from orchestrator.models.offload import offload

                self.parked[rep.key] = offload(rep.module)
        responses = decode_responses(ctx.tokenizer, gen.response_ids.cpu())
        spec = self.specs[role]
        use = not spec.task_rows and spec.eval_reward is not None
        reward = self._reward(spec.eval_reward) if use else None
        s = score_rows(self.task, spec.task_rows, reward, mine, responses)
        nan = [float("nan")] * len(mine)
        rewards = s.verifier if s.verifier is not None else s.scores or nan
        correct = s.correct if s.correct is not None else nan
        return (dp_i, correct, rewards, s.extras) if first else None


def merge_evaluation(parts: list[Any]) -> dict[str, float]:
    """{'accuracy', 'reward', 'reward_fn/<key>'} over the ranks' `evaluate` results (dp
    index, correct, rewards, the reward functions' values by key; None from ranks that
    report nothing); a figure no sample has (NaN throughout) is left out."""
    import math

    rows = sorted((p for p in parts if p is not None), key=lambda p: p[0])
    columns = {"accuracy": [v for p in rows for v in p[1]],
               "reward": [v for p in rows for v in p[2]]}  # fmt: skip
    for p in rows:
        for k, v in p[3].items():
            columns.setdefault(f"reward_fn/{k}", []).extend(v)
    known = {k: [v for v in vs if not math.isnan(v)] for k, vs in columns.items()}
    return {k: sum(vs) / len(vs) for k, vs in known.items() if vs}
