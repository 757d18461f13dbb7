"""Dataflow graphs of model function calls (MFCs).

An algorithm is declared as a graph: each MFC names the role that runs it, its kind
(generate | inference | train), the typed keys it reads and the keys it writes. The
graph is checked when it is built, so a missing producer, two producers of one key or
a cycle is reported before any worker starts.

Shape legend for the keys: B = sequences in the batch, U = distinct prompts of the batch
(B = U x samples per prompt), P = prompt tokens (left padded), T = response tokens (right
padded).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

T = TypeVar("T")


class CallKind(StrEnum):
    GENERATE = "generate"
    INFERENCE = "inference"
    TRAIN = "train"


@dataclass(frozen=True)
class Key:
    """A typed field on a dataflow edge."""

    name: str
    dtype: str  # torch dtype name: int64 | float32 (no torch import, so the planner needs none)
    shape: str  # letters from the legend, e.g. "B,T"
    doc: str

    @property
    def rank(self) -> int:
        return len(self.shape.split(","))


def _keys(*keys: Key) -> dict[str, Key]:
    return {k.name: k for k in keys}


KEYS: dict[str, Key] = _keys(
    Key("prompt_ids", "int64", "B,P", "prompt token ids, left padded, bos first"),
    Key("prompt_mask", "int64", "B,P", "1 on prompt tokens, 0 on left padding"),
    Key("prompt_index", "int64", "B", "the prompt's row in the RL dataset (its label, fields)"),
    Key("response_ids", "int64", "B,T", "response token ids, right padded"),
    Key("response_mask", "int64", "B,T", "1 on response tokens up to and including eos"),
    Key("logprobs", "float32", "B,T", "log-probs of the response under the behaviour policy"),
    Key("ref_logprobs", "float32", "B,T", "log-probs of the response under the reference"),
    Key("values", "float32", "B,T", "critic values before each response token"),
    Key("scores", "float32", "B", "scalar reward of each prompt/response pair"),
    Key("task_correct", "float32", "B", "1 where the task's verifier accepts the response"),
    Key("unique_prompt_ids", "int64", "U,P", "each distinct prompt of the batch once"),
    Key("unique_prompt_mask", "int64", "U,P", "1 on unique_prompt_ids' prompt tokens"),
    Key("unique_prompt_index", "int64", "U", "each distinct prompt's row in the RL dataset"),
    Key("greedy_response_ids", "int64", "U,T", "greedy response to each distinct prompt"),
    Key("greedy_response_mask", "int64", "U,T", "1 on greedy response tokens up to eos"),
    Key("baseline_scores", "float32", "U", "reward of each greedy response (ReMax)"),
    Key("greedy_task_correct", "float32", "U", "1 where the verifier accepts the greedy one"),
    Key("chosen_ids", "int64", "B,T", "preferred response of a preference pair"),
    Key("chosen_mask", "int64", "B,T", "1 on chosen response tokens up to eos"),
    Key("rejected_ids", "int64", "B,T", "dispreferred response of a preference pair"),
    Key("rejected_mask", "int64", "B,T", "1 on rejected response tokens up to eos"),
)


class GraphError(ValueError):
    """A dataflow graph that cannot run; the message lists every problem."""

    def __init__(self, graph: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"dataflow graph '{graph}' is invalid:\n{lines}")


@dataclass(frozen=True)
class MFC:
    """A model function call: one role runs one kind of call on typed keys.

    `interface` names the implementation the role's worker runs (registered in the
    orchestrator); `options` are fixed call options (for example greedy decoding).
    """

    name: str
    role: str
    kind: CallKind
    interface: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...] = ()
    options: Mapping[str, object] = field(default_factory=dict)


class DataflowGraph:
    """MFCs joined by the keys they produce and consume, validated when built."""

    def __init__(
        self,
        name: str,
        calls: Iterable[MFC],
        dataset_keys: Iterable[str],
        keys: Mapping[str, Key] = KEYS,
    ) -> None:
        self.name = name
        self.calls: tuple[MFC, ...] = tuple(calls)
        self.dataset_keys: tuple[str, ...] = tuple(dataset_keys)
        self.keys = dict(keys)
        self.producer: dict[str, str] = {}
        self._validate()
        self.order: tuple[MFC, ...] = self._topological_order()

    def _validate(self) -> None:
        problems: list[str] = []
        names = [c.name for c in self.calls]
        for n in sorted({n for n in names if names.count(n) > 1}):
            problems.append(
                f"call name '{n}' is used by {names.count(n)} calls; names must be unique"
            )
        if not self.calls:
            problems.append("the graph has no calls")
        for k in self.dataset_keys:
            if k not in self.keys:
                problems.append(f"dataset key '{k}' is not a declared key")
            self.producer[k] = "<dataset>"
        for c in self.calls:
            if not isinstance(c.kind, CallKind):
                problems.append(
                    f"call '{c.name}': kind {c.kind!r} is not one of generate|inference|train"
                )
            for k in (*c.inputs, *c.outputs):
                if k not in self.keys:
                    problems.append(
                        f"call '{c.name}': key '{k}' is not declared; declared keys: {sorted(self.keys)}"
                    )
            if c.kind is CallKind.TRAIN and c.outputs:
                problems.append(
                    f"call '{c.name}': a train call produces no keys, got {list(c.outputs)}"
                )
            for k in c.outputs:
                if k in self.producer:
                    problems.append(
                        f"key '{k}' has two producers: '{self.producer[k]}' and '{c.name}'"
                    )
                else:
                    self.producer[k] = c.name
        for c in self.calls:
            for k in c.inputs:
                if k in self.keys and k not in self.producer:
                    problems.append(
                        f"call '{c.name}' reads '{k}', which no call produces and the dataset "
                        "does not provide"
                    )
        if not problems:
            cycle = self._find_cycle()
            if cycle:
                problems.append("cycle: " + " -> ".join(cycle))
        if problems:
            raise GraphError(self.name, problems)

    def parents(self, call: MFC) -> list[str]:
        return sorted({self.producer[k] for k in call.inputs if self.producer[k] != "<dataset>"})

    def _find_cycle(self) -> list[str] | None:
        by_name = {c.name: c for c in self.calls}
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(n: str) -> list[str] | None:
            state[n] = 1
            stack.append(n)
            for p in self.parents(by_name[n]):
                if state.get(p) == 1:
                    return stack[stack.index(p) :] + [p]
                if p not in state:
                    found = visit(p)
                    if found:
                        return found
            stack.pop()
            state[n] = 2
            return None

        for c in self.calls:
            if c.name not in state:
                found = visit(c.name)
                if found:
                    return found
        return None

    def _topological_order(self) -> tuple[MFC, ...]:
        done: set[str] = set()
        order: list[MFC] = []
        while len(order) < len(self.calls):
            for c in self.ready(done, set()):
                order.append(c)
                done.add(c.name)
        return tuple(order)

    def ready(self, done: set[str], running: set[str]) -> list[MFC]:
        """Calls whose producers have all finished and that are neither done nor running."""
        return [
            c
            for c in self.calls
            if c.name not in done
            and c.name not in running
            and all(p in done for p in self.parents(c))
        ]

    def waves(self) -> list[MFC]:
        """Every call in the order an eager runtime dispatches them: the calls whose
        producers are done, in the graph's order, then the next such wave."""
        done: set[str] = set()
        order: list[MFC] = []
        while len(order) < len(self.calls):
            wave = self.ready(done, set())
            order += wave
            done.update(c.name for c in wave)
        return order

    @property
    def roles(self) -> tuple[str, ...]:
        seen: list[str] = []
        for c in self.calls:
            if c.role not in seen:
                seen.append(c.role)
        return tuple(seen)

    @property
    def trainable_roles(self) -> tuple[str, ...]:
        return tuple(
            r
            for r in self.roles
            if any(c.role == r and c.kind is CallKind.TRAIN for c in self.calls)
        )

    def call(self, name: str) -> MFC:
        for c in self.calls:
            if c.name == name:
                return c
        raise KeyError(
            f"no call '{name}' in graph '{self.name}'; calls: {[c.name for c in self.calls]}"
        )


# interfaces whose calls, when several of one replica are ready together, run as one batch
# of the engine (the runtime's FUSED registry implements exactly these)
FUSABLE_INTERFACES = ("generate", "reward")


def fused_groups(graph: DataflowGraph, placement: Mapping[str, Hashable]) -> list[tuple[MFC, ...]]:
    """The graph's calls in dispatch order, grouped into what runs as one task: calls of
    one role under one placement (`placement`: call -> its mesh and layout), of one kind
    and one fusable interface, that become ready together (their producers are the same
    groups), such as ReMax's sampled and greedy generations and then their two reward
    calls. Every other call is a group of its own."""

    def key(c: MFC) -> Hashable | None:
        fusable = c.kind is not CallKind.TRAIN and c.interface in FUSABLE_INTERFACES
        return (c.role, placement[c.name], c.kind, c.interface) if fusable else None

    return group_ready_together(graph.waves(), lambda c: c.name,
                                lambda c: graph.parents(c), key)  # fmt: skip


def group_ready_together(
    order: Iterable[T],
    name: Callable[[T], str],
    parents: Callable[[T], Iterable[str]],
    key: Callable[[T], Hashable | None],
) -> list[tuple[T, ...]]:
    """Items (in an order where producers come first) grouped where their `key` is equal
    and their producers lie in the same groups; a None key never groups (the runtime's
    and the planner's fusing of calls, over MFCs and over costed calls alike)."""
    group_of: dict[str, int] = {}
    groups: list[list[T]] = []
    open_groups: dict[Hashable, int] = {}
    for item in order:
        k = key(item)
        full = (k, frozenset(group_of[p] for p in parents(item)))
        if k is not None and full in open_groups:
            group_of[name(item)] = open_groups[full]
            groups[open_groups[full]].append(item)
            continue
        group_of[name(item)] = len(groups)
        if k is not None:
            open_groups[full] = len(groups)
        groups.append([item])
    return [tuple(g) for g in groups]


def check_outputs(call: MFC, outputs: Mapping[str, Any], keys: Mapping[str, Key] = KEYS) -> None:
    """Check a call's outputs against its declaration (names, dtypes, ranks)."""
    problems: list[str] = []
    missing = [k for k in call.outputs if k not in outputs]
    extra = [k for k in outputs if k not in call.outputs]
    if missing:
        problems.append(f"missing outputs {missing}")
    if extra:
        problems.append(f"undeclared outputs {extra}")
    for k in call.outputs:
        if k in outputs:
            t, spec = outputs[k], keys[k]
            if str(t.dtype).removeprefix("torch.") != spec.dtype or t.dim() != spec.rank:
                problems.append(
                    f"'{k}' is {t.dtype} with {t.dim()} dims, declared torch.{spec.dtype} [{spec.shape}]"
                )
    if problems:
        raise GraphError(f"{call.name} outputs", problems)
