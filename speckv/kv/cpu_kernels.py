"""The CPU kernels (`csrc/`), compiled once per machine: decode attention reading every
page where it lies, a DEVICE slot or a coded pool row (`paged_attention.cpp`), and
pool rows decoded into DEVICE slots or fresh pages (`page_fetch.cpp`); both decode
rows with `pool_rows.h`, the codecs' `decode` written out element by element. The
same module holds the weight-only matmul over GGUF blocks
(`speckv/models/csrc/quant_matmul.cpp`, used through `speckv.models.quant`) and the
decoder's fused per-layer ops (`layer_ops.cpp`: RMSNorm with the residual add, RoPE).

`make setup` builds them right after installing; otherwise the first engine that
needs them builds them (~30 s, announced on stderr). The build goes to a directory
of its own, keyed by the sources, the flags, torch, Python and the CPU's features
(`$SPECKV_KERNEL_DIR`, default ~/.cache/speckv/kernels/<key>), so two checkouts or
versions never build over each other, and a finished build is imported directly.

One build at a time per directory, under an advisory `flock`: the kernel releases it
when its holder dies, so a build killed halfway (Ctrl-C, a timeout) never leaves a
lock behind that later runs wait on. A process that waits says so, and gives up
after `BUILD_WAIT_S` with an error naming the holder. torch's own lock file in the
build directory, which a killed build does leave, is removed under that flock.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

logger = logging.getLogger(__name__)

NAME = "speckv_cpu_kernels"
BUILD_WAIT_S = 600.0  # longest wait for another process's build
_SOURCES = [*(Path(__file__).parent / "csrc" / name
              for name in ("paged_attention.cpp", "page_fetch.cpp")),
            *(Path(__file__).parent.parent / "models" / "csrc" / name
              for name in ("quant_matmul.cpp", "layer_ops.cpp"))]
_HEADERS = [Path(__file__).parent / "csrc" / "pool_rows.h"]
FORMATS = {"raw": 0, "int8": 1, "kivi4": 2}
"""Pool row formats the kernels read in place (`Codec.row_format`; csrc/pool_rows.h)."""
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math")
_LDFLAGS = ("-fopenmp",)


def build_directory() -> Path:
    """Where this version of the kernels is (or will be) built."""
    import torch

    digest = hashlib.sha256()
    for source in (*_SOURCES, *_HEADERS):
        digest.update(source.read_bytes())
    for part in (*_CFLAGS, *_LDFLAGS, torch.__version__, sys.version, platform.machine(),
                 _cpu_features()):
        digest.update(part.encode())
    root = os.environ.get("SPECKV_KERNEL_DIR") or Path.home() / ".cache" / "speckv" / "kernels"
    return Path(root) / digest.hexdigest()[:16]


def _cpu_features() -> str:
    """The CPU's feature flags (-march=native builds for them)."""
    return _cpuinfo(("flags", "Features")) or platform.processor()


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7R13 Processor"), or what `platform` knows."""
    line = _cpuinfo(("model name",))
    return line.partition(":")[2].strip() if line else platform.processor() or "unknown CPU"


def _cpuinfo(keys: tuple[str, ...]) -> str:
    """The first line of /proc/cpuinfo that starts with one of `keys` ("" if none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith(keys)), "")
    except OSError:
        return ""


def load_cpu_kernels(wait: float = BUILD_WAIT_S) -> ModuleType:
    """Imports the kernels, building them first if this machine has not yet.

    Raises:
        RuntimeError: when the build fails, or another process's build holds the lock
            for more than `wait` seconds; the message names the way out
            (`attention_backend="torch"`).
    """
    directory = build_directory()
    library, done = directory / f"{NAME}.so", directory / "built"
    if done.exists():
        return _import(library)
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory, wait):
        if not done.exists():  # another process may have built it while we waited
            _build(directory)
            done.touch()  # only now: a build killed while linking leaves no usable library
    return _import(library)


def _build(directory: Path) -> None:
    from torch.utils.cpp_extension import load

    (directory / "lock").unlink(missing_ok=True)  # torch's, left by a killed build
    logger.warning("building the CPU kernels (once per machine and version; 1-2 minutes on "
                   "2 cores) in %s", directory)
    started = time.monotonic()
    try:
        load(name=NAME, sources=[str(p) for p in _SOURCES], extra_cflags=list(_CFLAGS),
             extra_ldflags=list(_LDFLAGS), build_directory=str(directory), verbose=False)
    except Exception as exc:  # compiler missing, ninja missing, build error
        raise RuntimeError(
            f"could not build the CPU attention kernel ({type(exc).__name__}: {exc}); "
            "install a C++ compiler and ninja, or use attention_backend='torch'") from exc
    logger.warning("built the CPU kernels in %.0f s", time.monotonic() - started)


@contextmanager
def _build_lock(directory: Path, wait: float) -> Iterator[None]:
    """An exclusive flock on `<directory>.lock`, waited for at most `wait` seconds."""
    path = directory.with_suffix(".lock")
    with open(path, "a+") as fh:
        deadline = time.monotonic() + wait
        announced = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(fh)
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"another process ({holder}) has been building the CPU kernels in "
                        f"{directory} for over {wait:.0f} s; stop it, or use "
                        f"attention_backend='torch'") from None
                if not announced:
                    logger.warning("waiting for another process (%s) to finish building the "
                                   "CPU kernels in %s", holder, directory)
                    announced = True
                time.sleep(0.25)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _holder(fh) -> str:
    fh.seek(0)
    return fh.read().strip() or "pid unknown"


def _import(library: Path) -> ModuleType:
    if NAME in sys.modules:
        return sys.modules[NAME]
    spec = importlib.util.spec_from_file_location(NAME, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[NAME] = module
    return module

