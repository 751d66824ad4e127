"""Where B3's neighbour search should switch from exact to faiss IVF, on this machine.

For N targets of dimension 384 (MiniLM's), times the top-(p + m = 130) search of every query
by the exact chunked matmul + topk path and by faiss-cpu's IndexIVFFlat (4 sqrt(N) lists, nprobe
32), and the IVF recall of the exact 130 neighbours. Both searches run on the same
`--queries` sampled queries and are scaled to all N (each query's cost does not depend on the
others); IVF's index build is timed whole. Data: synthetic clustered unit vectors (N / 30 centres,
noise 0.7), a harder case for IVF than real text embeddings. Writes
benchmarks/results/b3_knn_switch.json; `summary.exact_seconds_at` etc. feed
`neighbours.EXACT_MAX_N`.

    python benchmarks/b3_knn_switch.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(10, n // 30), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[8000, 16000, 32000, 64000])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=130)
    ap.add_argument("--nprobe", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    import faiss

    from batchkit_contrastive_mining import top_neighbours

    rows = []
    for n in args.sizes:
        x = clustered(n, 384)
        q = x[: args.queries]
        t0 = time.perf_counter()
        exact = top_neighbours(q, x, k=args.k, knn="exact", exclude_self=False)
        exact_s = (time.perf_counter() - t0) * n / len(q)
        nlist = int(4 * np.sqrt(n))
        t0 = time.perf_counter()
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(384), 384, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234
        index.train(x[np.random.default_rng(0).permutation(n)[: 64 * nlist]])
        index.add(x)
        build_s = time.perf_counter() - t0
        index.nprobe = args.nprobe
        t0 = time.perf_counter()
        found = index.search(q, args.k)[1]
        search_s = (time.perf_counter() - t0) * n / len(q)
        recall = float(np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(exact, found)]))
        row = {"n": n, "exact_seconds": round(exact_s, 2), "ivf_build_seconds": round(build_s, 2),
               "ivf_search_seconds": round(search_s, 2), "ivf_seconds": round(build_s + search_s, 2),
               "ivf_recall": round(recall, 3), "nlist": nlist, "nprobe": args.nprobe}
        rows.append(row)
        print(row, flush=True)
    out = {"machine": machine(), "command": "python benchmarks/b3_knn_switch.py", "rows": rows,
           "load_average_after": os.getloadavg()[0],
           "summary": {"exact_seconds_at": {r["n"]: r["exact_seconds"] for r in rows},
                       "ivf_seconds_at": {r["n"]: r["ivf_seconds"] for r in rows},
                       "ivf_recall_at": {r["n"]: r["ivf_recall"] for r in rows}}}
    path = Path(__file__).parent / "results" / "b3_knn_switch.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"]), "->", path)


if __name__ == "__main__":
    main()
