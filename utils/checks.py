"""Argument checks shared by every ``utils`` module, written once so that they all fail alike.

Each check returns the value (as a plain Python number) when it is fine, and otherwise raises a
``ValueError`` that names the argument, the rule and the value received, e.g.
``k must be a positive int, got 0``. ``bool`` is refused where an int is meant (``True`` is an
``int`` to Python, never a count to a reader).
"""
from __future__ import annotations

import numbers

__all__ = ["check_positive_int", "check_positive_number"]


def check_positive_int(name: str, value: object, minimum: int = 1, hint: str = "") -> int:
    """``value`` as an ``int`` if it is an integer (Python or NumPy) ``>= minimum``; else a ValueError.

    ``hint`` (e.g. ``"how many neighbours to return"``) is added to the message in parentheses.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        rule = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must be {rule}{extra}, got {value!r}")
    return int(value)


def check_positive_number(name: str, value: object) -> float:
    """``value`` as a ``float`` if it is a real number ``> 0`` (NaN is not); else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)
