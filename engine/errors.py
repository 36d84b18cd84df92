"""Whether an exception was raised by the engine itself: the test behind every "is this message for users?".

The engine raises its deliberate errors (a ``ValueError`` naming the case or file and what to fix) with a ``raise``
statement in its own code. A ``ValueError`` of the same type raised inside numpy, torch, scipy, nibabel or MONAI
("operands could not be broadcast together with shapes (3,4) (5,)") was written for nobody and may carry internals;
where the engine means such a text for users it wraps it in its own error (``raise VolumeError(...) from exc``),
which is then raised in the engine's frame.
"""
from __future__ import annotations

import dis
from functools import lru_cache
from pathlib import Path

import engine

ENGINE_DIR = Path(engine.__file__).resolve().parent
"""This package's folder: code in a file under it is the engine's own."""

_RAISE = dis.opmap["RAISE_VARARGS"]


@lru_cache(maxsize=1024)
def _in_engine(filename: str) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(ENGINE_DIR)
    except (OSError, ValueError, RuntimeError):
        return False


def raised_by_engine(exc: BaseException) -> bool:
    """True when ``exc`` was raised by a ``raise`` statement in the engine's code (the innermost frame of its
    traceback is a file under :data:`ENGINE_DIR`, stopped at a ``raise``), or has no traceback (constructed and
    handed on, never raised).

    The ``raise`` matters: code of a C extension (a numpy ufunc, ``int("x")``, torch's operators) adds no frame of
    its own, so its error's innermost frame is the engine line that called it. An error re-raised unchanged
    (``raise`` alone, ``raise exc``, ``future.result()``) keeps the traceback of where it was first raised;
    ``raise OurError(...) from exc`` is raised here.

    Args:
        exc: the exception.

    Returns:
        Whether the engine raised it.
    """
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    if not _in_engine(code.co_filename):
        return False
    raw = code.co_code
    return 0 <= tb.tb_lasti < len(raw) and raw[tb.tb_lasti] == _RAISE
