"""Link models: make a transfer take the time a given interconnect would take.

The data copy is always real; after it, the caller waits until `latency + bytes /
bandwidth` has passed since the transfer started (a copy that is already slower
than the link adds no wait). A batched transfer pays the latency once: requests
to a memory device are pipelined, so a batch costs one round trip plus its bytes.

Profiles (one direction, x16):
    cxl2-x16   64 GB/s, 250 ns   CXL 2.0 runs on the PCIe 5.0 PHY (32 GT/s x16 =
                                 64 GB/s raw); a CXL memory expander adds ~170-250 ns
                                 to a load (Sun et al., "Demystifying CXL Memory",
                                 MICRO'23; the issue's figures).
    cxl3-x16   128 GB/s, 250 ns  CXL 3.x on the PCIe 6.0 PHY (64 GT/s); the added
                                 latency is not lower than CXL 2.0's.
    pcie4-x16  25 GB/s, 1000 ns  ~25 GB/s achieved of 32 GB/s raw for DMA copies
                                 (cudaMemcpy host->device, pinned); ~1 us per
                                 round trip (Neugebauer et al., SIGCOMM'18).
    pcie5-x16  50 GB/s, 1000 ns  PCIe 5.0 achieved of 64 GB/s raw, same latency.
    custom:<GB/s>,<ns>           anything else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LinkProfile:
    name: str
    bandwidth_gbs: float  # GB/s (1e9 bytes per second)
    latency_ns: float

    def seconds(self, nbytes: int) -> float:
        """The time the link takes to move `nbytes` in one batched transfer."""
        return self.latency_ns * 1e-9 + nbytes / (self.bandwidth_gbs * 1e9)

    @property
    def spec(self) -> str:
        return self.name if self.name in PROFILES else \
            f"custom:{self.bandwidth_gbs:g},{self.latency_ns:g}"


PROFILES: dict[str, LinkProfile] = {p.name: p for p in (
    LinkProfile("cxl2-x16", 64.0, 250.0),
    LinkProfile("cxl3-x16", 128.0, 250.0),
    LinkProfile("pcie4-x16", 25.0, 1000.0),
    LinkProfile("pcie5-x16", 50.0, 1000.0),
)}

KNOWN = ["none", *PROFILES, "custom:<GB/s>,<ns>"]


def parse_link(spec: str) -> LinkProfile | None:
    """'none' -> None; a profile name or `custom:<GB/s>,<ns>` -> its profile."""
    if spec == "none":
        return None
    if spec in PROFILES:
        return PROFILES[spec]
    if spec.startswith("custom:"):
        try:
            bandwidth, latency = (float(x) for x in spec[len("custom:"):].split(","))
        except ValueError:
            bandwidth = latency = -1.0
        if bandwidth > 0 and latency >= 0:
            return LinkProfile(spec, bandwidth, latency)
        raise ValueError(f"link {spec!r}: write custom:<GB/s>,<ns> with GB/s > 0 and ns >= 0, "
                         "e.g. custom:16,2000")
    raise ValueError(f"unknown link {spec!r}; known links: {', '.join(KNOWN)}")


def wait_until(deadline: float) -> None:
    """Sleeps, then spins the last ~0.2 ms, until `time.perf_counter()` reaches `deadline`."""
    remaining = deadline - time.perf_counter()
    if remaining > 2e-4:
        time.sleep(remaining - 2e-4)
    while time.perf_counter() < deadline:
        pass
