"""Global-batch LBL across 2 processes (DDP on gloo, and DeepSpeed ZeRO-2 on CPU).

* Without accumulation: the ranks' mean loss equals the global-batch LBL that one process computes
  over both ranks' data at once, and the parameter update (SGD, so ``-lr * averaged gradient``)
  equals the one that single-process loss gives.
* With accumulation over 2 micro-batches: the counts ``f`` is computed from at micro-step k are the
  all-reduced counts of micro-steps 1..k (Algorithm 1), the buffer resets at the optimizer step,
  and the two SGD updates equal those of one process minimising the same accumulated objective
  (under DeepSpeed too: batchkit/deepspeed_compat.py keeps DeepSpeed from dividing the loss twice).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_moe import TinyMoE  # noqa: E402
from tiny_moe import TokenDataset  # noqa: E402
from tiny_moe import reference_accumulated_global_lbl  # noqa: E402
from tiny_moe import reference_global_lbl  # noqa: E402

pytestmark = pytest.mark.multiprocess

JOB = Path(__file__).parent / "moe_dist_job.py"


def run_job(tmp_path: Path, *args: str) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(JOB), "--out", str(tmp_path), *args], env=env, capture_output=True,
                          text=True, timeout=400, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def model_at(state: dict) -> TinyMoE:
    model = TinyMoE()
    model.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    return model


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_global_mode_equals_one_process_over_both_ranks_data(tmp_path: Path, strategy: str) -> None:
    ranks = run_job(tmp_path, "--strategy", strategy, "--steps", "1")
    assert ranks[0]["initial"] == ranks[1]["initial"]
    (mb0,), (mb1,) = ranks[0]["micro_batches"], ranks[1]["micro_batches"]
    assert set(mb0["indices"]).isdisjoint(mb1["indices"])
    # Only f is synchronised: both ranks used the same summed counts, which are the sum of their own.
    assert mb0["f_counts"] == mb1["f_counts"]
    assert torch.allclose(torch.tensor(mb0["local_counts"]) + torch.tensor(mb1["local_counts"]), torch.tensor(mb0["f_counts"]))
    assert mb0["local_counts"] != mb1["local_counts"]  # the ranks' data really differ

    # One process, both ranks' data at once (equal token counts per rank, so Eq. 6 is exact).
    model = model_at(ranks[0]["initial"])
    x = TokenDataset().x[mb0["indices"] + mb1["indices"]]
    reference = reference_global_lbl(model, x, top_k=2)
    mean_loss = (mb0["trained_lbl"] + mb1["trained_lbl"]) / 2
    assert mean_loss == pytest.approx(reference.item(), rel=1e-5)
    # and it is not the micro-batch loss (mean of each rank's own LBL)
    own = [reference_global_lbl(model, x[:2], 2), reference_global_lbl(model, x[2:], 2)]
    micro = (own[0] + own[1]) / 2
    assert abs(micro.item() - reference.item()) > 1e-3
    # The loss value returned to Lightning does not wait for the other ranks: at the first micro-batch
    # of a step it carries the LBL with this rank's own counts (README, "global mode").
    assert mb0["loss"] == pytest.approx(own[0].item(), rel=1e-5) and mb1["loss"] == pytest.approx(own[1].item(), rel=1e-5)

    reference.backward()
    lr = model.lr
    for name, param in model.named_parameters():
        expected = torch.tensor(ranks[0]["initial"][name]) - lr * (param.grad if param.grad is not None else 0)
        for r in ranks:
            assert torch.allclose(torch.tensor(r["final"][name]), expected, atol=1e-6), (strategy, name)
    router = model.layers[0].router.gate.weight.grad
    assert router.abs().max() > 1e-3  # the LBL gradient reached the router (not 1/dp too small: compared above)
    # the logged global-batch LBL is the same figure
    assert ranks[0]["logged"]["batchkit/moe_lbl/lbl_global_batch"] == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_accumulation_uses_cumulative_all_reduced_counts_and_resets_at_the_step(tmp_path: Path, strategy: str) -> None:
    ranks = run_job(tmp_path, "--strategy", strategy, "--steps", "2", "--accumulate", "2")
    for r in ranks:
        assert [(m["global_step"], m["micro_step"], m["last_micro"]) for m in r["micro_batches"]] == [
            (0, 0, False), (0, 1, True), (1, 0, False), (1, 1, True)]
        assert r["step_ends"] == [1, 2]
    local = [torch.tensor([m["local_counts"] for m in r["micro_batches"]]) for r in ranks]  # [micro-batch, L, E+1]
    summed = local[0] + local[1]  # all-reduced counts of each micro-batch
    for r in ranks:
        used = torch.tensor([m["f_counts"] for m in r["micro_batches"]])
        assert torch.equal(used[0], summed[0])  # step 1, micro-step 1: its own counts
        assert torch.equal(used[1], summed[0] + summed[1])  # step 1, micro-step 2: micro-steps 1..2
        assert torch.equal(used[2], summed[2])  # step 2 starts from an empty buffer
        assert torch.equal(used[3], summed[2] + summed[3])
        assert used[1][0, -1] == 2 * 2 * 2 * 5  # T: 2 micro-steps x 2 ranks x 2 sequences x 5 tokens

    # The update: two SGD steps of one process on the accumulated objective of each step.
    model = model_at(ranks[0]["initial"])
    data = TokenDataset().x
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    for step in range(2):
        micro = [[data[r["micro_batches"][2 * step + k]["indices"]] for r in ranks] for k in range(2)]
        model.zero_grad()
        reference_accumulated_global_lbl(model, micro, top_k=2).backward()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.grad is not None:
                    param -= model.lr * param.grad
    for name, param in model.named_parameters():
        for r in ranks:
            assert torch.allclose(torch.tensor(r["final"][name]), param.detach(), atol=1e-6), (strategy, name)
    # the steps moved the router by far more than the tolerance, so a 1/N-sized update is caught above
    moved = model.layers[0].router.gate.weight.detach() - initial["layers.0.router.gate.weight"]
    assert moved.abs().max() > 1e-3
