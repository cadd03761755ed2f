"""Checks of one config value: each returns what would be valid, or None when the value
is fine. Options declare theirs next to their code (e.g. a loss's ``config_rules``);
kdrun/run/validate.py runs them before anything is trained."""

from __future__ import annotations

import re
from collections.abc import Callable

Check = Callable[[object], str | None]  # returns what would be valid, or None when fine


def number(lo=None, hi=None, *, lo_open=False, hi_open=False, integer=False,
           optional=False) -> Check:
    kind = "an integer" if integer else "a number"
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        bounds.append(f"{'<' if hi_open else '<='} {hi}")
    want = f"must be {kind}" + (f" {' and '.join(bounds)}" if bounds else "")
    want += " (or null)" if optional else ""

    def check(v):
        if v is None:
            return None if optional else want
        if isinstance(v, bool) or not isinstance(v, int if integer else int | float):
            return want
        if lo is not None and (v <= lo if lo_open else v < lo):
            return want
        if hi is not None and (v >= hi if hi_open else v > hi):
            return want
        return None

    return check


def one_of(*options) -> Check:
    return lambda v: None if v in options else f"must be one of {', '.join(map(str, options))}"


def boolean(v) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def positive_ints(v) -> str | None:
    ok = isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i > 0
                                     for i in v)
    return None if ok else "must be a list of positive integers, e.g. [64, 64]"


def increasing_epochs(v) -> str | None:
    ok = isinstance(v, list) and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1
                                     for m in v) and v == sorted(set(v))
    return None if ok else "must be a list of increasing epoch numbers >= 1, e.g. [150, 180, 210]"


def label_budget(v) -> str | None:
    """split.labeled: null, a count >= 1, or a share strictly between 0 and 1."""
    count = isinstance(v, int) and not isinstance(v, bool) and v >= 1
    share = isinstance(v, float) and 0 < v < 1
    return None if v is None or count or share else (
        "must be a count of labelled examples (an integer >= 1), a share of the training "
        "examples (a number between 0 and 1, exclusive), or null for all")


def int_or_ints(v) -> str | None:
    return None if isinstance(v, int) and v > 0 else positive_ints(v)


def device(v) -> str | None:
    ok = isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v)
    return None if ok else "must be auto, cpu, cuda or cuda:N"


PROBABILITY = number(0, 1)


def layer_name(v) -> str | None:
    return None if isinstance(v, str) and v else "must be a layer name"
