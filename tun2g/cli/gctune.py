"""The cyclic garbage collector, tuned for a long-running proxy process (`tun2g server`, `tun2g client`).

A request frees almost everything it allocates by reference counting; the cyclic
collector only needs to find the few reference cycles left (tests/server/test_request_garbage.py
keeps the request path free of them). With CPython's default gen0 threshold (700 container
allocations) it ran every few requests and, in a full proxy, took 9-12% of the CPU
(`gc_collect_main` in a py-spy --native profile). So, once start-up is over:

- `gc.freeze()` moves everything allocated so far (modules, classes, the configuration) to the
  permanent generation: no collection traverses it again;
- gen0 runs every GEN0_THRESHOLD allocations (older generations keep CPython's ratios), so a
  collection comes every few hundred requests instead of every few.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 20_000


def after_start_up(gen0: int = GEN0_THRESHOLD) -> None:
    """Collect what start-up left, freeze the survivors and raise the gen0 threshold."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0, gen1, gen2)
