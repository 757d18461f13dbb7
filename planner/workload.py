"""What one iteration of an algorithm asks of the hardware: each MFC of its dataflow graph
with the model it runs, its batch and its sequence lengths.

The batch of a call follows its keys: a call that reads "U"-shaped keys (ReMax's greedy
generation and its reward) works on the distinct prompts, any other on all sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from algos.graph import FUSABLE_INTERFACES, MFC, CallKind, DataflowGraph
from planner.catalogue import ModelShape


@dataclass(frozen=True)
class Role:
    name: str
    shape: ModelShape
    trainable: bool


@dataclass(frozen=True)
class CallWork:
    """One MFC's work per iteration.

    batch_seqs sequences of prompt_tokens + gen_tokens tokens (a generate call produces
    the gen_tokens); a train call makes optimizer_steps optimizer steps over
    passes x batch_seqs sequences (PPO epochs x mini-batches).
    """

    name: str
    role: str
    kind: CallKind
    batch_seqs: int
    prompt_tokens: int
    gen_tokens: int
    passes: int = 1
    optimizer_steps: int = 1
    parents: tuple[str, ...] = ()
    fusable: bool = False  # runs in one engine batch with like calls ready with it

    @property
    def seq_tokens(self) -> int:
        return self.prompt_tokens + self.gen_tokens


@dataclass(frozen=True)
class Workload:
    """An algorithm's graph as costed work, with its roles' shapes and ZeRO stage."""

    graph: str
    roles: dict[str, Role]
    calls: tuple[CallWork, ...]
    zero_stage: int = 1

    def call(self, name: str) -> CallWork:
        for c in self.calls:
            if c.name == name:
                return c
        raise KeyError(f"no call '{name}' in workload '{self.graph}'")

    def role_calls(self, role: str) -> list[CallWork]:
        return [c for c in self.calls if c.role == role]

    def train_call(self, role: str) -> CallWork | None:
        for c in self.calls:
            if c.role == role and c.kind is CallKind.TRAIN:
                return c
        return None


def _reads_unique(graph: DataflowGraph, call: MFC) -> bool:
    return any(graph.keys[k].shape.split(",")[0] == "U" for k in call.inputs)


def workload_from_graph(
    graph: DataflowGraph,
    shapes: dict[str, ModelShape],
    *,
    prompts: int,
    samples_per_prompt: int,
    prompt_tokens: int,
    gen_tokens: int,
    mini_batches: int,
    ppo_epochs: int = 1,
    zero_stage: int = 1,
) -> Workload:
    """Work per iteration of `graph`: `prompts` distinct prompts, each sampled
    `samples_per_prompt` times; `shapes` maps every role of the graph to its model."""
    missing = [r for r in graph.roles if r not in shapes]
    if missing:
        raise KeyError(f"graph '{graph.name}' has roles {missing} without a model shape")
    roles = {r: Role(r, shapes[r], r in graph.trainable_roles) for r in graph.roles}
    calls = []
    for c in graph.calls:
        batch = prompts if _reads_unique(graph, c) else prompts * samples_per_prompt
        train = c.kind is CallKind.TRAIN
        calls.append(
            CallWork(
                name=c.name,
                role=c.role,
                kind=c.kind,
                batch_seqs=batch,
                prompt_tokens=prompt_tokens,
                gen_tokens=gen_tokens,
                passes=ppo_epochs if train else 1,
                optimizer_steps=mini_batches * ppo_epochs if train else 0,
                parents=tuple(graph.parents(c)),
                fusable=not train and c.interface in FUSABLE_INTERFACES,
            )
        )
    return Workload(graph.name, roles, tuple(calls), zero_stage)


def rl_shapes(graph: DataflowGraph, actor: ModelShape, critic: ModelShape) -> dict[str, ModelShape]:
    """ReaLHF's convention: the reference shares the actor's shape; critic and reward
    share the critic's, with a scalar head."""
    value = critic.as_critic()
    table = {"actor": actor, "ref": actor, "critic": value, "reward": value}
    unknown = [r for r in graph.roles if r not in table]
    if unknown:
        raise KeyError(f"roles {unknown} have no shape convention; pass shapes yourself")
    return {r: table[r] for r in graph.roles}


def without_roles(wl: Workload, roles: set[str]) -> Workload:
    """The workload without the calls of `roles` (roles that hold no model, such as a
    verifier reward): they take no device time and no memory the planner models."""
    gone = {c.name for c in wl.calls if c.role in roles}
    calls = tuple(
        replace(c, parents=tuple(p for p in c.parents if p not in gone))
        for c in wl.calls
        if c.name not in gone
    )
    kept = {r: v for r, v in wl.roles.items() if r not in roles}
    return Workload(wl.graph, kept, calls, wl.zero_stage)
