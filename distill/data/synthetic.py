"""Seeded multi-step arithmetic word problems with GSM8K-style worked solutions.

They let the embedded demo and the tests run with no download. Each problem is a short story about a
person and some items, built from a chain of operations (buy, give away, collect per day, multiply,
share equally, pack and sell); every operation adds one calculation line with a GSM8K calculator
annotation (`12 + 5 = <<12+5=17>>17`), and the solution ends with `#### <answer>`. All numbers are
positive integers (shares and packs divide exactly). Problem i depends only on (seed, i), so the
first n problems of a larger set are the same n problems.
"""

from __future__ import annotations

import random
from pathlib import Path

from distill.errors import DistillError
from distill.io import atomic_write_jsonl

_PEOPLE = [("Maya", "she", "her"), ("Liam", "he", "his"), ("Sofia", "she", "her"), ("Omar", "he", "his"),
           ("Hana", "she", "her"), ("Diego", "he", "his"), ("Priya", "she", "her"), ("Tom", "he", "his"),
           ("Lena", "she", "her"), ("Kofi", "he", "his"), ("Aiko", "she", "her"), ("Ben", "he", "his")]
_ITEMS = ["apples", "marbles", "stickers", "cookies", "pencils", "seashells", "stamps", "eggs", "books",
          "oranges", "cupcakes", "cards"]
_FRIENDS = ["a neighbour", "a classmate", "a cousin", "an older brother", "a friend", "the teacher"]
_GROUPS = ["friends", "classmates", "cousins", "teammates", "neighbours"]
_CONTAINERS = ["bags", "boxes", "baskets", "jars"]


def _start(rng: random.Random, p: dict) -> tuple[str, list[str], int, int]:
    """Opening sentence; returns (sentence, solution lines, quantity, steps used)."""
    if rng.random() < 0.3:
        rate, hours = rng.randint(2, 12), rng.randint(2, 6)
        value = rate * hours
        sentence = f"{p['Name']} collects {rate} {p['items']} every hour for {hours} hours."
        line = f"{p['Name']} collects {rate} * {hours} = <<{rate}*{hours}={value}>>{value} {p['items']}."
        return sentence, [line], value, 1
    value = rng.randint(8, 60)
    opener = rng.choice(["has", "starts the week with", "owns", "has a box of"])
    return f"{p['Name']} {opener} {value} {p['items']}.", [], value, 0


def _middle(rng: random.Random, p: dict, x: int, room: int):
    """One story step that keeps a running count of items; None when it does not fit."""
    kind = rng.choice(["gain", "loss", "times", "daily"] if room >= 2 else ["gain", "loss", "times"])
    if kind == "gain":
        b = rng.randint(2, 30)
        verb = rng.choice(["buys", "finds", "is given", "wins"])
        return (f"{p['He']} {verb} {b} more {p['items']}.",
                [f"After that {p['he']} has {x} + {b} = <<{x}+{b}={x + b}>>{x + b} {p['items']}."], x + b, 1)
    if kind == "loss":
        if x < 4:
            return None
        b = rng.randint(1, x - 2)
        friend = rng.choice(_FRIENDS)
        return (f"{p['He']} gives {b} {p['items']} to {friend}.",
                [f"{p['He']} has {x} - {b} = <<{x}-{b}={x - b}>>{x - b} {p['items']} left."], x - b, 1)
    if kind == "times":
        if x > 60:
            return None
        k = rng.randint(2, 4)
        word = {2: "doubles", 3: "triples", 4: "quadruples"}[k]
        return (f"Then {p['he']} {word} the number of {p['items']} {p['he']} has.",
                [f"Now {p['he']} has {x} * {k} = <<{x}*{k}={x * k}>>{x * k} {p['items']}."], x * k, 1)
    b, d = rng.randint(2, 9), rng.randint(2, 7)
    c = b * d
    return (f"Over the next {d} days {p['he']} gets {b} more {p['items']} each day.",
            [f"In {d} days {p['he']} gets {b} * {d} = <<{b}*{d}={c}>>{c} {p['items']}.",
             f"So {p['he']} has {x} + {c} = <<{x}+{c}={x + c}>>{x + c} {p['items']}."], x + c, 2)


def _final(rng: random.Random, p: dict, x: int, room: int):
    """Closing step with its question: (sentence + question, lines, answer, steps) or None."""
    options = ["count", "share", "sell", "pack"] if room >= 2 else ["count", "share", "sell"]
    kind = rng.choice(options if room >= 1 else ["count"])
    if kind == "share":
        divisors = [k for k in range(2, 10) if x % k == 0 and x // k >= 1]
        if room < 1 or not divisors:
            return None
        k = rng.choice(divisors)
        group = rng.choice(_GROUPS)
        return (f"{p['He']} shares all of them equally among {k} {group}. How many {p['items']} does each get?",
                [f"Each gets {x} / {k} = <<{x}/{k}={x // k}>>{x // k} {p['items']}."], x // k, 1)
    if kind == "sell":
        if room < 1:
            return None
        price = rng.randint(2, 9)
        return (f"{p['He']} sells every one of them for ${price} each. How many dollars does {p['he']} earn?",
                [f"{p['He']} earns {x} * {price} = $<<{x}*{price}={x * price}>>{x * price}."], x * price, 1)
    if kind == "pack":
        divisors = [k for k in range(2, 13) if x % k == 0 and x // k >= 2]
        if room < 2 or not divisors:
            return None
        k, price = rng.choice(divisors), rng.randint(3, 15)
        box = rng.choice(_CONTAINERS)
        packs = x // k
        return (f"{p['He']} packs them into {box} of {k} and sells each of the {box} for ${price}. "
                f"How many dollars does {p['he']} make?",
                [f"{p['He']} fills {x} / {k} = <<{x}/{k}={packs}>>{packs} {box}.",
                 f"{p['He']} makes {packs} * {price} = $<<{packs}*{price}={packs * price}>>{packs * price}."],
                packs * price, 2)
    return f"How many {p['items']} does {p['Name']} have now?", [], x, 0


def _problem(seed: int, index: int, min_steps: int, max_steps: int) -> dict:
    rng = random.Random(f"distill-synthetic-{seed}-{index}")
    for _ in range(100):  # retry until the chain uses exactly the drawn number of steps
        target = rng.randint(min_steps, max_steps)
        name, he, his = rng.choice(_PEOPLE)
        p = {"Name": name, "he": he, "He": he.capitalize(), "his": his, "items": rng.choice(_ITEMS)}
        sentence, lines, x, steps = _start(rng, p)
        sentences = [sentence]
        final_reserved = rng.randint(0, min(2, target - steps)) if target > steps else 0
        while steps < target - final_reserved:
            mid = _middle(rng, p, x, target - final_reserved - steps)
            if mid is None:
                continue
            s, ls, x, used = mid
            sentences.append(s)
            lines += ls
            steps += used
        fin = _final(rng, p, x, target - steps)
        if fin is None:
            continue
        s, ls, answer, used = fin
        if steps + used != target or steps + used == 0:
            continue
        sentences.append(s)
        lines += ls
        return {"id": f"synthetic-{seed}-{index}", "question": " ".join(sentences),
                "answer": "\n".join(lines + [f"#### {answer}"])}
    raise RuntimeError(f"synthetic problem {index} (seed {seed}) did not converge")  # pragma: no cover


def synthetic_problems(n: int, seed: int = 0, min_steps: int = 2, max_steps: int = 4) -> list[dict]:
    """`n` problems `{id, question, answer}`; `answer` is a GSM8K-style worked solution."""
    if n < 1:
        raise DistillError(f"number of synthetic problems must be at least 1 (got {n})")
    if not (1 <= min_steps <= max_steps):
        raise DistillError(f"need 1 <= min_steps <= max_steps (got {min_steps}, {max_steps})")
    return [_problem(seed, i, min_steps, max_steps) for i in range(n)]


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """Write records as JSONL atomically (temporary name, fsync, rename)."""
    return atomic_write_jsonl(path, records)
