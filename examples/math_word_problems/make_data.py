"""Multi-step arithmetic word problems with their answers, as JSONL for `data.train_files`
and `data.eval_files`: each row is a chat prompt, the answer as its label, and the number
of steps (an extra field the reward function may read).

    python examples/math_word_problems/make_data.py --out data/math --train 2000 --test 200 --eval 32

Deterministic for a given --seed; train and test share no question.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Eva", "Finn", "Gita", "Hugo", "Ines", "Jon"]
THINGS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards"]
INSTRUCTION = "Solve the problem. End with the final answer as \\boxed{N}."


def problem(rng: random.Random) -> tuple[str, int, int]:
    """(question, answer, steps): a start amount, then one to three changes."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    amount = rng.randint(2, 20)
    parts = [f"{name} has {amount} {thing}."]
    steps = rng.randint(1, 3)
    for _ in range(steps):
        kind = rng.choice(["buy", "give", "double"] if amount < 50 else ["give"])
        if kind == "buy":
            n = rng.randint(1, 15)
            parts.append(f"Then {name} buys {n} more.")
            amount += n
        elif kind == "give" and amount > 1:
            n = rng.randint(1, amount - 1)
            parts.append(f"Then {name} gives away {n}.")
            amount -= n
        else:
            parts.append(f"Then the number of {thing} doubles.")
            amount *= 2
    parts.append(f"How many {thing} does {name} have now?")
    return " ".join(parts), amount, steps


def rows(rng: random.Random, n: int, avoid: set[str]) -> list[dict]:
    out: list[dict] = []
    while len(out) < n:
        question, answer, steps = problem(rng)
        if question in avoid:
            continue
        avoid.add(question)
        messages = [{"role": "user", "content": f"{question} {INSTRUCTION}"}]
        out.append({"prompt": messages, "label": str(answer), "steps": steps})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/math")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=int, default=32, help="eval.jsonl: the first N of test")
    args = parser.parse_args()
    rng, seen = random.Random(args.seed), set()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("test", args.test), ("train", args.train)):  # test first: held out
        lines = [json.dumps(row) + "\n" for row in rows(rng, n, seen)]
        (out / f"{split}.jsonl").write_text("".join(lines))
        print(f"wrote {n} problems to {out / f'{split}.jsonl'}")
        if split == "test":  # what run.sh evaluates on: each evaluation decodes them twice
            (out / "eval.jsonl").write_text("".join(lines[: args.eval]))
            print(f"wrote the first {min(args.eval, n)} of them to {out / 'eval.jsonl'}")


if __name__ == "__main__":
    main()
