"""Time of the JEST and CABS selection algorithms alone (no model), at the sizes the
joint_selection benchmark uses, each against the strongest straightforward alternative, both sides
interleaved in one process, median of several repeats.

* JEST, super-batch B = 5 * 64 = 320 and 5 * 256 = 1280, b = B / 5, n_chunks = 16:
  - ``scoring``: two models' pairwise SigLIP matrices (D = 256) and S = L_learner - L_reference;
  - ``joint_sample`` (running row/column sums, O(B b)) against the paper's pseudo-code, which
    rebuilds the conditional logits from the whole B x B matrix at every chunk (O(n_chunks B^2));
  - ``independent_topk`` for comparison.
* CABS at N = 320 and 1280 examples (T = N / 5) with 10 distinct concepts each, drawn from a
  vocabulary of 2000 by a Zipf(1.1) law (a long tail with a few concepts in most examples, as
  concepts taken from code are; the cap of 10 stops the greedy early) or uniformly (every concept
  rare, so the greedy makes all T picks: the slow case): ``cabs_dm`` (numpy greedy)
  against a lazy max-heap greedy in plain Python (the released code's structure, without numba),
  and ``cabs_fm``.

    python benchmarks/joint_selection_algorithms.py [--repeats 9] [--device cpu|cuda]

One torch thread; times are the thread's CPU time (CPU) or wall time (GPU), median of the repeats.

Writes benchmarks/results/joint_selection_algorithms.json (``..._cuda.json`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "plugins" / "joint_selection" / "tests"))
from _common import machine  # noqa: E402
from _common import reexec_with_stable_malloc  # noqa: E402


def paper_pseudocode_sample(scores, batch_size: int, n_chunks: int, generator):  # noqa: ANN001, ANN201
    """The blocked sampler as the paper's pseudo-code writes it: the conditional logits rebuilt from
    the full matrix (two masked B x B reductions) at every chunk."""
    import torch

    from batchkit_joint_selection import gumbel_topk

    size = scores.shape[0]
    n_draws = batch_size // n_chunks
    logits_ii = scores.diagonal()
    chosen = gumbel_topk(logits_ii, n_draws, generator)
    for _ in range(n_chunks - 1):
        is_sampled = torch.zeros(size, dtype=scores.dtype, device=scores.device)
        is_sampled[chosen] = 1.0
        logits_kj = (scores * is_sampled[:, None]).sum(0)
        logits_ik = (scores * is_sampled[None, :]).sum(1)
        logits = (logits_ii + logits_kj + logits_ik).masked_fill(is_sampled.bool(), float("-inf"))
        chosen = torch.cat([chosen, gumbel_topk(logits, n_draws, generator)])
    return chosen


def timed(fn: Callable[[], Any], sync: Callable[[], None], clock: Callable[[], float]) -> float:
    sync()
    start = clock()
    fn()
    sync()
    return (clock() - start) * 1e3


def interleaved(
    cases: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None], clock: Callable[[], float]
) -> dict[str, float]:
    for fn in cases.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(timed(fn, sync, clock))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    reexec_with_stable_malloc()

    import numpy as np
    import torch
    from cabs_lazy_heap import lazy_heap_dm

    from batchkit_joint_selection import cabs_dm
    from batchkit_joint_selection import cabs_fm
    from batchkit_joint_selection import concept_table
    from batchkit_joint_selection import concept_targets
    from batchkit_joint_selection import independent_topk
    from batchkit_joint_selection import joint_sample
    from batchkit_joint_selection import learnability_matrix
    from batchkit_joint_selection import siglip_pair_losses

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # CPU: the CPU time of this thread (one torch thread does all the work), which other processes
    # on a shared machine disturb far less than wall time; GPU: wall time around a synchronize.
    torch.set_num_threads(1)
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    results: dict[str, Any] = {"machine": machine(), "device": str(device), "repeats": args.repeats,
                               "clock": "thread CPU time (CABS always; JEST on CPU), "
                                        "wall time around a synchronize (JEST on a GPU)",
                               "jest": {}, "cabs": {}}
    if device.type == "cuda":
        results["machine"]["gpu"] = torch.cuda.get_device_name(device)

    for batch in (64, 256):
        size, dim = 5 * batch, 256
        g = torch.Generator(device=device).manual_seed(0)
        emb = [torch.nn.functional.normalize(torch.randn(size, dim, generator=g, device=device), dim=1)
               for _ in range(4)]

        def scoring() -> torch.Tensor:
            learner = siglip_pair_losses(emb[0], emb[1], 10.0, -10.0)
            reference = siglip_pair_losses(emb[2], emb[3], 10.0, -10.0)
            return learnability_matrix(learner, reference)

        scores = scoring()
        gen = torch.Generator(device=device).manual_seed(1)
        times = interleaved({
            "scoring": scoring,
            "joint_sample": lambda: joint_sample(scores, batch, n_chunks=16, generator=gen),
            "paper_pseudocode_sample": lambda: paper_pseudocode_sample(scores, batch, 16, gen),
            "independent_topk": lambda: independent_topk(scores, batch),
        }, args.repeats, sync, clock)
        times["pseudocode_over_joint_sample"] = times["paper_pseudocode_sample"] / times["joint_sample"]
        results["jest"][f"B{size}_b{batch}"] = times
        print(f"JEST B={size} b={batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()), flush=True)

    vocab = [f"concept{v:04d}" for v in range(2000)]
    zipf = 1.0 / np.arange(1, 2001) ** 1.1
    for law, weights in (("zipf", zipf / zipf.sum()), ("uniform", None)):
        rng = np.random.default_rng(0)
        for size in (320, 1280):
            concepts = [[vocab[j] for j in rng.choice(2000, size=10, replace=False, p=weights)] for _ in range(size)]
            target = size // 5
            table = concept_table([concepts])
            targets = concept_targets(len(table.names), target, 10).tolist()
            freq = table.freq.tolist()
            picked = cabs_dm(concepts, target, generator=torch.Generator().manual_seed(0))
            heap = lazy_heap_dm(concepts, table.names, freq, targets, target, 10, torch.Generator().manual_seed(0))
            assert picked.indices.tolist() == heap[0], "the greedy and the lazy heap disagree"
            times = interleaved({
                "cabs_dm": lambda: cabs_dm(concepts, target, generator=torch.Generator().manual_seed(0)),
                "lazy_heap_python": lambda: lazy_heap_dm(
                    concepts, table.names, freq, targets, target, 10, torch.Generator().manual_seed(0)),
                "cabs_fm": lambda: cabs_fm(concepts, target),
            }, args.repeats, lambda: None, time.thread_time)
            times["lazy_heap_over_cabs_dm"] = times["lazy_heap_python"] / times["cabs_dm"]
            times["concepts"] = len(table.names)
            times["greedy_picks"] = picked.greedy
            results["cabs"][f"{law}_N{size}_T{target}"] = times
            print(f"CABS {law} N={size} T={target}: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()), flush=True)

    jest = results["jest"]
    cabs = results["cabs"]
    results["summary"] = {
        "unit": "ms, median",
        "jest_sample_ms_B320": jest["B320_b64"]["joint_sample"],
        "jest_sample_ms_B1280": jest["B1280_b256"]["joint_sample"],
        "jest_scoring_ms_B320": jest["B320_b64"]["scoring"],
        "jest_scoring_ms_B1280": jest["B1280_b256"]["scoring"],
        "jest_pseudocode_over_sample_B1280": jest["B1280_b256"]["pseudocode_over_joint_sample"],
        "cabs_dm_ms_320": cabs["zipf_N320_T64"]["cabs_dm"],
        "cabs_dm_ms_1280": cabs["zipf_N1280_T256"]["cabs_dm"],
        "cabs_dm_ms_1280_uniform": cabs["uniform_N1280_T256"]["cabs_dm"],
        "cabs_fm_ms_1280": cabs["zipf_N1280_T256"]["cabs_fm"],
        "cabs_lazy_heap_over_dm_1280": cabs["zipf_N1280_T256"]["lazy_heap_over_cabs_dm"],
        "cabs_lazy_heap_over_dm_1280_uniform": cabs["uniform_N1280_T256"]["lazy_heap_over_cabs_dm"],
    }
    name = "joint_selection_algorithms_cuda.json" if device.type == "cuda" else "joint_selection_algorithms.json"
    out = args.out or Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
