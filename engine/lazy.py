"""Lazy package exports (PEP 562): a package's public names are imported from their modules on first use, so
importing the package stays cheap: the napari plugin imports parts of :mod:`engine` on the GUI thread, where torch,
MONAI and the network code must not come along."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Mapping, Tuple


def lazy_exports(package: str, exports: Mapping[str, str],
                 namespace: Dict[str, Any]) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for a package's namespace.

    Args:
        package: the package's name (for the error message).
        exports: public name -> the module that defines it.
        namespace: the package's ``globals()``.
    """
    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
