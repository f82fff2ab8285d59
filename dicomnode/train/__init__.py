"""Training commands: one module per ``dicomnode train ...`` command, reusing ``dicomnode.analyse``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def cpu_host() -> str:
    """Where a CPU-only training ran, for model cards (architecture and cores, no host name)."""
    import os
    import platform

    return f"{platform.machine()} CPU, {os.cpu_count()} core(s), no GPU"


def jsonable(value: Any) -> Any:
    """``value`` with every tuple turned into a list and every mapping into a dict, for JSON."""
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return value
