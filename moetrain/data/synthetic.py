"""The default corpus: generated deterministically, no network, several distinct "domains".

Each document comes from one domain with its own vocabulary and structure, so a model learns
quickly and MoE experts have something to specialise on:
  arithmetic   correct sums, differences and products, one per line
  records      key=value records with a fixed schema and consistent value types
  prose        templated sentences about animals, places and weather
  code         small Python functions with arithmetic bodies
"""

from __future__ import annotations

import random

NAMES = ["Ada", "Bela", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kai",
         "Lena", "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tomas", "Uma"]
CITIES = ["Lisbon", "Oslo", "Kyoto", "Lima", "Accra", "Perth", "Quito", "Riga", "Seoul", "Tunis"]
ROLES = ["engineer", "teacher", "pilot", "nurse", "farmer", "chemist", "writer", "baker"]
ANIMALS = ["fox", "heron", "otter", "badger", "lynx", "crow", "hare", "seal", "moth", "wolf"]
ADJECTIVES = ["quiet", "restless", "golden", "clever", "hungry", "small", "old", "swift"]
VERBS = ["wandered", "rested", "waited", "hunted", "sang", "slept", "listened", "hid"]
PLACES = ["the river", "the old mill", "a pine forest", "the harbour", "the hills", "a meadow"]
WEATHER = ["the rain had stopped", "the wind was cold", "the sun was low", "fog covered it all",
           "snow was falling", "the air was warm"]


def arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a}{op}{b}={value}")
    return "\n".join(lines)


def records(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(2, 5)):
        lines.append(f"id={rng.randint(0, 9999):04d}; name={rng.choice(NAMES)}; "
                     f"city={rng.choice(CITIES)}; age={rng.randint(18, 90)}; "
                     f"role={rng.choice(ROLES)}")
    return "\n".join(lines)


def prose(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 4)):
        sentences.append(f"The {rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)} "
                         f"{rng.choice(VERBS)} near {rng.choice(PLACES)} because "
                         f"{rng.choice(WEATHER)}.")
    return " ".join(sentences)


def code(rng: random.Random) -> str:
    name = rng.choice(["scale", "shift", "mix", "step", "blend"]) + str(rng.randint(0, 99))
    a, b = rng.randint(1, 9), rng.randint(0, 9)
    return f"def {name}(x):\n    y = x * {a}\n    return y + {b}\n"


DOMAINS = {"arithmetic": arithmetic, "records": records, "prose": prose, "code": code}


def generate(num_docs: int, seed: int) -> list[str]:
    """`num_docs` documents, domains interleaved at random; the same seed gives the same list."""
    rng = random.Random(seed)
    makers = list(DOMAINS.values())
    return [rng.choice(makers)(rng) for _ in range(num_docs)]
