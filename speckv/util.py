"""Small helpers with no dependency on the rest of speckv (config and tools import them)."""

from __future__ import annotations

import re


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON's `true` and Python's True are no counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_size(value: int | str) -> int:
    """Parses a byte size: an int, or a string like ``"256MiB"``, ``"1.5GB"``, ``"4096"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a byte size: {value!r}")
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(
            f"not a byte size: {value!r} (write e.g. 1073741824, 512MiB, 1GiB or 2GB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(num_bytes: float) -> str:
    """Formats a byte count with a binary unit, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def stop_child(proc, directory: str | None = None) -> None:
    """Stops a child server, a `subprocess.Popen` (SIGTERM, then SIGKILL after 10 s), closes its stderr pipe and
    removes its private `directory`."""
    import shutil
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
