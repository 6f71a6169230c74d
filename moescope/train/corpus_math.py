"""Generated mathematics for the corpus: arithmetic, algebra and word problems with answers.

Every document comes from its own ``random.Random`` seeded with a string of the corpus seed
and the document's index. String seeds are hashed with SHA-512 by CPython, so the output is
the same on every machine and Python 3 version, and any document can be regenerated alone.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["MathProblem", "generate_math_documents", "math_document", "render_problem"]

_NAMES = ("Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas",
          "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq")
_ITEMS = (("apple", "apples"), ("pencil", "pencils"), ("notebook", "notebooks"),
          ("ticket", "tickets"), ("book", "books"), ("melon", "melons"), ("card", "cards"))


@dataclass(frozen=True)
class MathProblem:
    """A question and its answer; ``solution`` holds worked steps or is empty."""

    kind: str
    question: str
    answer: str
    solution: str = ""


def _signed(b: int) -> str:
    return f"+ {b}" if b >= 0 else f"- {-b}"


def _coef(a: int) -> str:
    return {1: "", -1: "-"}.get(a, str(a))


_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                               "*": lambda a, b: a * b}


def _arithmetic(r: random.Random) -> MathProblem:
    op = r.choice("+-*")
    digits = r.choice((1, 2, 2, 3, 3, 4)) if op != "*" else r.choice((1, 2, 2))
    a, b = r.randint(1, 10**digits), r.randint(1, 10**digits)
    return MathProblem("arithmetic", f"What is {a} {op} {b}?", str(_OPS[op](a, b)))


def _division(r: random.Random) -> MathProblem:
    b, q = r.randint(2, 25), r.randint(2, 60)
    if r.random() < 0.5:
        return MathProblem("division", f"What is {b * q} / {b}?", str(q))
    n = b * q + r.randint(1, b - 1)
    return MathProblem("remainder", f"What is the remainder when {n} is divided by {b}?", str(n % b),
                       f"{n} = {b} * {n // b} + {n % b}.")


def _precedence(r: random.Random) -> MathProblem:
    a, b, c, d = (r.randint(1, 20) for _ in range(4))
    expr, value = r.choice((
        (f"{a} + {b} * {c}", a + b * c), (f"({a} + {b}) * {c}", (a + b) * c),
        (f"{a} * {b} - {c} * {d}", a * b - c * d), (f"{a} * ({b} + {c}) - {d}", a * (b + c) - d),
        (f"({a} - {b}) * ({c} + {d})", (a - b) * (c + d)),
    ))
    return MathProblem("precedence", f"What is {expr}?", str(value))


def _power(r: random.Random) -> MathProblem:
    base = r.randint(2, 15)
    if base <= 10 and r.random() < 0.3:
        return MathProblem("power", f"What is {base} cubed?", str(base**3))
    return MathProblem("power", f"What is {base} squared?", str(base**2))


def _fraction(r: random.Random) -> MathProblem:
    x = Fraction(r.randint(1, 9), r.randint(2, 12))
    y = Fraction(r.randint(1, 9), r.randint(2, 12))
    op = r.choice("+-*")
    value = {"+": x + y, "-": x - y, "*": x * y}[op]
    return MathProblem("fraction", f"What is {x} {op} {y}? Give the answer as a fraction in lowest terms.",
                       str(value))


def _linear(r: random.Random) -> MathProblem:
    x, a = r.randint(-12, 12), r.choice((2, 3, 4, 5, 6, 7, 8, 9, -2, -3))
    b = r.choice((-1, 1)) * r.randint(1, 30)
    c = a * x + b
    steps = (f"Subtract {b} from both sides: {a}x = {c - b}. " if b >= 0
             else f"Add {-b} to both sides: {a}x = {c - b}. ")
    return MathProblem("linear", f"Solve for x: {_coef(a)}x {_signed(b)} = {c}.", f"x = {x}",
                       steps + f"Divide both sides by {a}: x = {x}.")


def _system(r: random.Random) -> MathProblem:
    x, y = r.randint(-9, 9), r.randint(-9, 9)
    while True:
        a1, b1, a2, b2 = (r.choice((1, 2, 3, -1, -2, 4)) for _ in range(4))
        if a1 * b2 - a2 * b1 != 0:
            break
    eq1 = f"{_coef(a1)}x {'+' if b1 > 0 else '-'} {_coef(abs(b1))}y = {a1 * x + b1 * y}"
    eq2 = f"{_coef(a2)}x {'+' if b2 > 0 else '-'} {_coef(abs(b2))}y = {a2 * x + b2 * y}"
    return MathProblem("system", f"Solve the system of equations: {eq1} and {eq2}.", f"x = {x}, y = {y}")


def _polynomial(r: random.Random) -> MathProblem:
    v, a, b, c = r.randint(-6, 6), r.randint(1, 5), r.randint(-9, 9), r.randint(-9, 9)
    value = a * v * v + b * v + c
    return MathProblem("polynomial", f"If x = {v}, what is {_coef(a)}x^2 {_signed(b)}x {_signed(c)}?", str(value),
                       f"{a} * ({v})^2 {_signed(b)} * ({v}) {_signed(c)} = {value}.")


def _gcd_lcm(r: random.Random) -> MathProblem:
    k = r.randint(2, 12)
    a, b = k * r.randint(2, 15), k * r.randint(2, 15)
    if r.random() < 0.5:
        return MathProblem("gcd", f"What is the greatest common divisor of {a} and {b}?", str(math.gcd(a, b)))
    return MathProblem("lcm", f"What is the least common multiple of {a} and {b}?", str(math.lcm(a, b)))


def _percent(r: random.Random) -> MathProblem:
    p, n = r.choice((5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 80)), 20 * r.randint(1, 50)
    return MathProblem("percent", f"What is {p}% of {n}?", str(p * n // 100), f"{p} / 100 * {n} = {p * n // 100}.")


def _word_problem(r: random.Random) -> MathProblem:
    name = r.choice(_NAMES)
    item, items = r.choice(_ITEMS)
    kind = r.randrange(6)
    if kind == 0:
        q, price = r.randint(2, 12), r.randint(1, 9)
        bill = next(b for b in (10, 20, 50, 100, 200) if b >= q * price)
        return MathProblem("change", f"{name} buys {q} {items} at {price} dollars each and pays with a "
                           f"{bill}-dollar bill. How much change does {name} get, in dollars?", str(bill - q * price),
                           f"The {items} cost {q} * {price} = {q * price} dollars; {bill} - {q * price} = {bill - q * price}.")
    if kind == 1:
        v, t = r.randint(3, 12) * 10, r.randint(2, 9)
        return MathProblem("distance", f"A train travels at {v} km per hour for {t} hours. How many km does it travel?",
                           str(v * t), f"Distance is speed times time: {v} * {t} = {v * t}.")
    if kind == 2:
        k, n = r.randint(2, 9), r.randint(10, 99)
        return MathProblem("sharing", f"{name} shares {n} {items} equally among {k} friends. How many does each "
                           "friend get, and how many are left over?", f"{n // k} each, {n % k} left over",
                           f"{n} = {k} * {n // k} + {n % k}.")
    if kind == 3:
        younger, gap = r.randint(3, 40), r.randint(1, 30)
        total = 2 * younger + gap
        other = r.choice([x for x in _NAMES if x != name])
        return MathProblem("ages", f"{name} is {gap} years older than {other}. Together their ages add up to {total}. "
                           f"How old is {other}?", str(younger),
                           f"Twice {other}'s age is {total} - {gap} = {total - gap}, so {other} is {younger}.")
    if kind == 4:
        w, length = r.randint(2, 30), r.randint(2, 30)
        return MathProblem("rectangle", f"A rectangle is {w} m wide and {length} m long. What are its area and perimeter?",
                           f"area {w * length} square m, perimeter {2 * (w + length)} m",
                           f"Area = {w} * {length} = {w * length}; perimeter = 2 * ({w} + {length}) = {2 * (w + length)}.")
    s, weeks = r.randint(2, 40), r.randint(2, 20)
    return MathProblem("savings", f"{name} saves {s} dollars a week. After how many weeks will {name} have "
                       f"{s * weeks} dollars?", str(weeks), f"{s * weeks} / {s} = {weeks}.")


_GENERATORS: tuple[tuple[Callable[[random.Random], MathProblem], int], ...] = (
    (_arithmetic, 4), (_division, 2), (_precedence, 2), (_power, 1), (_fraction, 1), (_linear, 2),
    (_system, 1), (_polynomial, 1), (_gcd_lcm, 1), (_percent, 1), (_word_problem, 4),
)


def render_problem(p: MathProblem) -> str:
    """The problem as corpus text: "Problem: ...", optional "Solution: ...", "Answer: ..."."""
    lines = [f"Problem: {p.question}"]
    if p.solution:
        lines.append(f"Solution: {p.solution}")
    lines.append(f"Answer: {p.answer}")
    return "\n".join(lines)


def math_document(seed: int, index: int) -> list[MathProblem]:
    """The 6 to 12 problems of document ``index`` for corpus ``seed``."""
    r = random.Random(f"moescope-math:{seed}:{index}")
    funcs = [f for f, weight in _GENERATORS for _ in range(weight)]
    return [r.choice(funcs)(r) for _ in range(r.randint(6, 12))]


def generate_math_documents(seed: int, min_chars: int) -> list[tuple[str, str]]:
    """``(doc_id, text)`` pairs, as many as needed for at least ``min_chars`` characters."""
    docs: list[tuple[str, str]] = []
    total = 0
    while total < min_chars:
        text = "\n\n".join(render_problem(p) for p in math_document(seed, len(docs)))
        docs.append((f"math:{len(docs):06d}", text))
        total += len(text)
    return docs
