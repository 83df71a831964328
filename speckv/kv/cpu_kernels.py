"""The CPU kernels (`csrc/`), compiled on first use: decode attention reading pages in
place (`paged_attention.cpp`) and fused pool -> DEVICE page fetches (`page_fetch.cpp`).

Built with torch's JIT extension loader (needs a C++ compiler and ninja) into
torch's extension cache (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions);
later loads reuse the build.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("paged_attention.cpp", "page_fetch.cpp")]


def load_cpu_kernels() -> ModuleType:
    """Compiles (once per machine) and imports the kernels.

    Raises:
        RuntimeError: when the build fails, naming the way out (`attention_backend="torch"`).
    """
    from torch.utils.cpp_extension import load

    try:
        return load(name="speckv_cpu_kernels", sources=[str(p) for p in _SOURCES],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # compiler missing, ninja missing, build error
        raise RuntimeError(
            f"could not build the CPU attention kernel ({type(exc).__name__}: {exc}); "
            "install a C++ compiler and ninja, or use attention_backend='torch'") from exc
