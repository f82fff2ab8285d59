"""Training commands: one module per ``dicomnode train ...`` command, reusing ``dicomnode.analyse``."""


def cpu_host() -> str:
    """Where a CPU-only training ran, for model cards (architecture and cores, no host name)."""
    import os
    import platform

    return f"{platform.machine()} CPU, {os.cpu_count()} core(s), no GPU"
