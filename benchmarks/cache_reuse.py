"""How much of a second pass over an array the cache serves, on this machine.

Reads an fp32 array (a.dot(a)) right after evicting the caches with a 1 GiB read, then reads it
again at once; the ratio second/first time says how much a two-pass optimizer (LAMB, LARS: norms,
then the update) can gain from running its passes back to back over cache-sized pieces.
Writes benchmarks/results/cache_reuse.json: per size in MB, `warm_over_cold` (median of 5).

    python benchmarks/cache_reuse.py
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from _common import machine


def main() -> None:
    torch.set_num_threads(2)
    evict = torch.randn(2**28)  # 1 GiB
    sizes = [2, 8, 32, 64, 128, 256, 512]
    out: dict = {"machine": machine(), "command": "python benchmarks/cache_reuse.py", "sizes_mb": {}}
    for mb in sizes:
        a = torch.randn(mb * 2**20 // 4)
        ratios, cold_gbps = [], []
        for _ in range(5):
            evict.sum()
            t0 = time.perf_counter()
            a.dot(a)
            t1 = time.perf_counter()
            a.dot(a)
            t2 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
            cold_gbps.append(mb / 1024 / (t1 - t0))
        out["sizes_mb"][mb] = {"warm_over_cold": statistics.median(ratios), "cold_GBps": statistics.median(cold_gbps)}
        print(f"{mb:4d} MB: second read takes {statistics.median(ratios):.2f}x the first "
              f"(first at {statistics.median(cold_gbps):.1f} GB/s)")
    path = Path(__file__).parent / "results" / "cache_reuse.json"
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
