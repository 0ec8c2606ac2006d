"""Requests that run as more than one denoise pass, each kind a module: A1111's hires fix (engine/hires.py) and
SDXL's base → refiner handoff (engine/refiner.py).

A pass module has `FIELD` (the request field that turns it on), `LATER_FIELDS` (request fields only its later
pass's model takes, which the first model lets through), `wanted(request)`, `check(request)` (before any engine is
read), `prepare(pipe, request, given)` (against the engines, before any work; `given`: the request as asked, before
the engine filled it in) and `run(pipe, prepared, j, size, **kw)`
(the images of request j). One request runs at most one of them.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

from engine import hires, refiner
from export.errors import RequestError

PASSES: tuple[ModuleType, ...] = (hires, refiner)


def of(r: Any) -> ModuleType | None:
    """The pass module a request asks for (None: one ordinary pass)."""
    return next((m for m in PASSES if m.wanted(r)), None)


def check(r: Any) -> None:
    """RequestError naming the field for a request that asks for two kinds at once or a bad value of one."""
    wanted = [m for m in PASSES if m.wanted(r)]
    if len(wanted) > 1:
        raise RequestError(wanted[1].FIELD, f"{wanted[0].FIELD} and {wanted[1].FIELD} cannot be combined in one "
                                            "request: give one of them")
    if wanted:
        wanted[0].check(r)


def later_fields(r: Any) -> tuple[str, ...]:
    """The request fields the first model lets through for a later pass's model."""
    plan = of(r)
    return () if plan is None else plan.LATER_FIELDS
