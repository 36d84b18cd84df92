"""Names that come from records (``case.json``, ``dataset.json``, a server client) and become file or
folder names: validated here, in one place, before any path is built from them.

A record is data, not a trusted program: a ``case_id`` of ``../../../escape`` or ``/etc/x`` must not
steer a write outside the folder it belongs to. :func:`safe_name` is the one check; :func:`child_path`
builds ``folder / name`` through it; :func:`is_within` tells whether a path given in a record stays
inside a folder.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]

MAX_NAME_LENGTH = 128
# Separators of every platform (a record written on Windows is read on Linux and back) and the
# drive/stream colon; the rest of Unicode is allowed (class names such as "left kidney", "Leber").
_FORBIDDEN = set('/\\:')


class UnsafeNameError(ValueError):
    """A name from a record that cannot be used as a file or folder name; the message says why."""


def safe_name(value: object, what: str = "name", max_length: int = MAX_NAME_LENGTH) -> str:
    """Return ``value`` if it is safe as a single file/folder name, else raise :class:`UnsafeNameError`.

    Safe means: a non-empty string of at most ``max_length`` characters, no path separator (``/``,
    ``\\``) or ``:``, not ``.``/``..`` and not starting with ``.`` (hidden, and the engine's temp
    files start so), no control characters, no leading/trailing whitespace. A safe name can never be
    an absolute path or leave the folder it is joined to.

    Args:
        value: the name as read from the record (any type; non-strings are refused).
        what: what the name is, for the message ("case id", "class name", "file name").
        max_length: longest allowed name in characters.

    Returns:
        ``value`` unchanged.

    Raises:
        UnsafeNameError: naming the value (``repr``) and the rule it breaks.
    """
    if not isinstance(value, str):
        raise UnsafeNameError(f"{what} {value!r} is not a string")
    if not value:
        raise UnsafeNameError(f"{what} is empty")
    if len(value) > max_length:
        raise UnsafeNameError(f"{what} {value[:40]!r}... is {len(value)} characters long (at most {max_length})")
    bad = sorted(_FORBIDDEN.intersection(value))
    if bad:
        raise UnsafeNameError(f"{what} {value!r} contains {' '.join(repr(c) for c in bad)}; "
                              "a name cannot hold a path")
    if value.startswith("."):
        raise UnsafeNameError(f"{what} {value!r} starts with '.' (hidden names and '..' are refused)")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value):
        raise UnsafeNameError(f"{what} {value!r} contains control characters")
    if value != value.strip():
        raise UnsafeNameError(f"{what} {value!r} starts or ends with whitespace")
    return value


def child_path(folder: PathLike, name: object, what: str = "name", suffix: str = "") -> Path:
    """``folder / (name + suffix)`` after :func:`safe_name` (e.g. a prediction file named by a case id).

    Raises:
        UnsafeNameError: ``name`` is not safe.
    """
    return Path(folder) / (safe_name(name, what) + suffix)


def is_within(path: PathLike, folder: PathLike) -> bool:
    """True when ``path`` lies inside ``folder`` after normalising ``..`` (symlinks are not followed:
    a dataset made of links the user placed is the user's choice, a ``../`` in a record is not)."""
    base = os.path.normpath(os.path.abspath(os.fspath(folder)))
    target = os.path.normpath(os.path.abspath(os.path.join(base, os.fspath(path))))
    return target == base or target.startswith(base.rstrip(os.sep) + os.sep)
