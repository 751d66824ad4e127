"""The code-pairs example: extraction, split, noise, tokens, batch, the SigLIP loss on hand-computed
cases, the model's protocol, and short real training runs."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from batchkit_examples import code_pairs as cp

ROOT = Path(__file__).resolve().parents[3]
BATCHKIT = Path(sys.executable).with_name("batchkit")

HAND_WRITTEN = '''
import os
import os.path
import xml.etree.ElementTree as ET
from collections import OrderedDict as OD
from . import sibling


def read_config(path, default=None):
    """Read a configuration file and return its entries.

    The second paragraph is not part of the query.
    """
    full = os.path.join(path, "setup.cfg")
    entries = OD()
    tree = ET.parse(full)
    for node in tree.iter():
        entries[node.tag] = sibling.convert(node.text)
    return entries


class Store:
    def save(self, key):
        """Save one key into the backing store now."""
        self._write(key, len(key))

    def only_doc(self):
        """A method whose body is only its docstring."""

    def short_doc(self):
        """Too short."""
        return 1

    def undocumented(self):
        return 2
'''


# --- extraction ---------------------------------------------------------------------------------


def test_pairs_from_a_hand_written_module() -> None:
    pairs = cp.pairs_from_source(HAND_WRITTEN, "pkg/mod.py")
    assert [p.qualname for p in pairs] == ["read_config", "Store.save"]
    first = pairs[0]
    assert first.module == "pkg/mod.py"
    assert first.doc == "Read a configuration file and return its entries."
    # The docstring is cut out of the code side; the signature and body stay, dedented.
    assert '"""' not in first.code and "paragraph" not in first.code
    assert first.code.startswith("def read_config(path, default=None):\n    full = os.path.join")
    assert pairs[1].code == "def save(self, key):\n    self._write(key, len(key))\n"


def test_concepts_of_a_hand_written_function() -> None:
    pairs = cp.pairs_from_source(HAND_WRITTEN, "pkg/mod.py")
    # Modules through any import form (top-level name), calls by their last name; the relative
    # import ``sibling`` is not a module of the standard library's namespace and is left out.
    assert pairs[0].concepts == ("call:OD", "call:convert", "call:iter", "call:join", "call:parse",
                                 "mod:collections", "mod:os", "mod:xml")
    assert pairs[1].concepts == ("call:_write", "call:len")


def test_docstring_summary_is_the_first_paragraph_capped_at_a_word() -> None:
    assert cp.docstring_summary("Line one\ncontinues here.\n\nSecond.") == "Line one continues here."
    long = " ".join(["word"] * 200)
    summary = cp.docstring_summary(long)
    assert len(summary) <= cp.MAX_DOC_CHARS and summary.endswith("word") and set(summary.split()) == {"word"}


def test_extraction_is_deterministic_and_the_cache_matches_a_fresh_parse() -> None:
    modules = ["fnmatch.py", "json/decoder.py", "json/encoder.py", "shlex.py", "textwrap.py"]  # sorted, as read
    first = cp.extract_pairs(modules)
    assert first == cp.extract_pairs(modules)
    assert len(first) > 20
    # The whole-library list (possibly from the on-disk cache) holds these modules' pairs in the same
    # order; de-duplication across the whole library can only drop some.
    cached = [p for p in cp.stdlib_pairs() if p.module in modules]
    assert cached and set(cached) <= set(first)
    assert cached == [p for p in first if p in set(cached)]


def test_whole_library_has_no_duplicate_queries_or_code() -> None:
    pairs = cp.stdlib_pairs()
    assert len(pairs) > 5000
    assert len({p.doc.lower() for p in pairs}) == len(pairs)
    assert len({p.code for p in pairs}) == len(pairs)
    assert all(len(p.doc.split()) >= cp.MIN_DOC_WORDS and len(p.doc) <= cp.MAX_DOC_CHARS for p in pairs)
    assert all(len(p.code) <= cp.MAX_CODE_CHARS for p in pairs)
    assert not any("/test/" in f"/{p.module}" or "/tests/" in f"/{p.module}" for p in pairs)


def test_split_is_by_module_and_disjoint() -> None:
    pairs = cp.stdlib_pairs()
    train, held = cp.split_pairs(pairs, val_percent=15)
    assert len(train) + len(held) == len(pairs)
    assert {p.module for p in train}.isdisjoint({p.module for p in held})
    assert 0.05 < len(held) / len(pairs) < 0.3
    # A different percentage moves whole modules only.
    _, held_30 = cp.split_pairs(pairs, val_percent=30)
    assert {p.module for p in held} <= {p.module for p in held_30}


# --- noise and subsets --------------------------------------------------------------------------


def test_noisy_assignment_is_a_fixed_derangement_of_the_chosen_fraction() -> None:
    source = cp.noisy_code_assignment(1000, 0.3, seed=0)
    moved = np.flatnonzero(source != np.arange(1000))
    assert len(moved) == 300  # every chosen pair gets another's code: no fixed point among them
    assert sorted(source[moved]) == sorted(moved)  # each moved code is used exactly once
    assert np.array_equal(source, cp.noisy_code_assignment(1000, 0.3, seed=0))
    assert not np.array_equal(source, cp.noisy_code_assignment(1000, 0.3, seed=1))
    assert np.array_equal(cp.noisy_code_assignment(10, 0.0, seed=0), np.arange(10))
    with pytest.raises(ValueError, match="noise_fraction"):
        cp.noisy_code_assignment(10, 1.0, seed=0)


def test_datasets_noise_subset_and_held_out_set() -> None:
    train, held = cp.code_pair_datasets(noise_fraction=0.3, seed=0)
    train_again, _ = cp.code_pair_datasets(noise_fraction=0.3, seed=0)
    assert train.code_texts == train_again.code_texts and train.concepts == train_again.concepts
    n = len(train)
    assert int(train.noisy.sum()) == round(0.3 * n)
    for i in np.flatnonzero(train.noisy.numpy())[:20].tolist():
        assert train.code_texts[i] != train.pairs[i].code  # paired with another function's code
        assert train.concepts[i] == list(train.pairs[train.code_source[i]].concepts)
    clean = np.flatnonzero(~train.noisy.numpy())
    assert all(train.code_texts[i] == train.pairs[i].code for i in clean[:50])
    assert not held.noisy.any()  # the held-out set is always clean
    assert not {p.module for p in train.pairs} & {p.module for p in held.pairs}

    subset, _ = cp.code_pair_datasets(train_subset_size=1000, seed=0)
    assert len(subset) == 1000 and not subset.noisy.any()
    assert set(subset.pairs) <= set(train.pairs)
    assert subset.pairs == cp.code_pair_datasets(train_subset_size=1000, seed=0)[0].pairs
    with pytest.raises(ValueError, match="train_subset_size"):
        cp.code_pair_datasets(train_subset_size=10**6)


# --- tokens and batch ---------------------------------------------------------------------------


def test_word_pieces_split_identifiers() -> None:
    assert cp.word_pieces("getSourceSegment(foo_bar2) HTTPServer") == [
        "get", "source", "segment", "getsourcesegment", "foo", "bar", "2", "foo_bar2", "http", "server", "httpserver"]
    ids = cp.tokenize("def read_config(path): return os.path.join(path)", max_tokens=5, vocab_size=97)
    assert len(ids) == 5 and all(1 <= i < 97 for i in ids)
    assert ids == cp.tokenize("def read_config(path): return os.path.join(path)", max_tokens=5, vocab_size=97)


def _small_train_set(noise_fraction: float = 0.0) -> cp.CodePairDataset:
    return cp.code_pair_datasets(noise_fraction=noise_fraction, train_subset_size=256)[0]


def test_collate_builds_the_documented_batch() -> None:
    data = _small_train_set(noise_fraction=0.5)
    items = [data[i] for i in (5, 0, 17)]
    batch = cp.CodePairCollate()(items)
    assert batch["index"].tolist() == [5, 0, 17]
    assert batch["doc_ids"].shape == (3, max(len(data.doc_tokens[i]) for i in (5, 0, 17)))
    assert batch["code_ids"][1, : len(data.code_tokens[0])].tolist() == data.code_tokens[0]
    assert batch["noisy"].tolist() == [bool(data.noisy[i]) for i in (5, 0, 17)]
    assert batch["doc_text"][2] == data.doc_texts[17] and batch["code_text"][0] == data.code_texts[5]
    assert batch["concepts"][0] == data.concepts[5] and all(isinstance(c, str) for c in batch["concepts"][0])
    assert "hard_negatives" not in batch

    data.set_hard_negatives(torch.arange(len(data) * 2).view(-1, 2) % len(data))
    batch = cp.CodePairCollate()([data[i] for i in (5, 0)])
    assert batch["hard_negatives"].tolist() == [[10, 11], [0, 1]]
    neg = batch["hard_negative_code_ids"]
    assert neg.shape[:2] == (2, 2)
    assert neg[0, 1, : len(data.code_tokens[11])].tolist() == data.code_tokens[11]
    with pytest.raises(ValueError, match="hard-negative table"):
        data.set_hard_negatives(torch.zeros(3, 2, dtype=torch.long))


# --- SigLIP -------------------------------------------------------------------------------------


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_siglip_loss_on_a_hand_computed_case() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t, bias = torch.tensor(2.0), torch.tensor(-1.0)
    # logits t<a_i,b_j> + b = [[1, 0.2], [-1, 0.6]]; l = -log sigmoid(z * logit) = softplus(-z * logit)
    expected = torch.tensor([[softplus(-1.0), softplus(0.2)], [softplus(-1.0), softplus(-0.6)]])
    assert torch.allclose(cp.siglip_loss_matrix(a, b, t, bias), expected, atol=1e-6)
    assert cp.siglip_loss(a, b, t, bias).item() == pytest.approx(expected.sum().item() / 2, abs=1e-6)


def _fixed_model(a: torch.Tensor, b: torch.Tensor, t: float, bias: float) -> cp.TwoTowerRetrieval:
    model = cp.TwoTowerRetrieval(vocab_size=64, dim=2)
    with torch.no_grad():
        model.log_temperature.fill_(math.log(t))
        model.bias.fill_(bias)
    model.pair_embeddings = lambda batch: (a, b)  # type: ignore[method-assign]
    return model


def test_per_sample_loss_shares_the_pairwise_terms() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    model = _fixed_model(a, b, t=2.0, bias=-1.0)
    shares = model.per_sample_loss({"index": torch.tensor([0, 1])})
    l00, l01, l10, l11 = softplus(-1.0), softplus(0.2), softplus(-1.0), softplus(-0.6)
    assert shares.tolist() == pytest.approx([l00 + 0.5 * (l01 + l10), l11 + 0.5 * (l01 + l10)], abs=1e-6)
    loss = cp.siglip_loss(a, b, torch.tensor(2.0), torch.tensor(-1.0))
    assert shares.mean().item() == pytest.approx(loss.item(), abs=1e-6)


def test_hard_negatives_add_negative_terms_except_the_query_itself() -> None:
    model = cp.TwoTowerRetrieval(vocab_size=cp.DEFAULT_VOCAB, dim=16)
    data = _small_train_set()
    plain = cp.CodePairCollate()([data[i] for i in (3, 4, 5)])
    table = torch.zeros(len(data), 2, dtype=torch.long)
    table[3] = torch.tensor([40, 4])  # 4 is another query's own example: still a negative for 3 and 5, not for 4
    table[4] = torch.tensor([41, 42])
    table[5] = torch.tensor([43, 44])
    data.set_hard_negatives(table)
    with_negatives = cp.CodePairCollate()([data[i] for i in (3, 4, 5)])
    with torch.no_grad():
        base = model.per_sample_loss(plain)
        extra = model.per_sample_loss(with_negatives) - base
        a, _ = model.pair_embeddings(plain)
        codes = model.code_tower(cp.CodePairCollate()([data[i] for i in (40, 4, 41, 42, 43, 44)])["code_ids"])
        terms = -torch.nn.functional.logsigmoid(-(model.siglip_temperature * a @ codes.T + model.siglip_bias))
    expected = terms.sum(1)
    expected[1] -= terms[1, 1]  # query 4 is not scored against its own code
    assert torch.allclose(extra, expected, atol=1e-5)
    assert (extra > 0).all()


def test_retrieval_recall_on_a_hand_made_case() -> None:
    q = torch.eye(3)
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.8, 0.6]])
    # query 0 finds key 0 first; query 1 ranks key 2 (0.8) above its key 1 (0.6); query 2 ranks key 1 above key 2.
    assert cp.retrieval_recall(q, keys, ks=(1, 2)) == {1: pytest.approx(1 / 3), 2: pytest.approx(1.0)}


# --- the model's protocol -----------------------------------------------------------------------


def test_pair_embeddings_shapes_norms_and_padding() -> None:
    torch.manual_seed(0)
    model = cp.TwoTowerRetrieval(dim=32)
    batch = cp.CodePairCollate()([_small_train_set()[i] for i in range(8)])
    a, b = model.pair_embeddings(batch)
    assert a.shape == (8, 32) and b.shape == (8, 32)
    assert torch.allclose(a.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert torch.allclose(b.norm(dim=-1), torch.ones(8), atol=1e-5)
    padded = dict(batch, code_ids=torch.nn.functional.pad(batch["code_ids"], (0, 7)))
    assert torch.allclose(model.pair_embeddings(padded)[1], b, atol=1e-6)  # padding changes nothing
    assert model.siglip_temperature.item() == pytest.approx(10.0) and model.siglip_bias.item() == pytest.approx(-10.0)
    assert model.siglip_temperature.requires_grad  # learnable, as in SigLIP


# --- training runs ------------------------------------------------------------------------------


def _trainer(max_steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_short_training_run_improves_held_out_retrieval() -> None:
    pl.seed_everything(0)
    model = cp.TwoTowerRetrieval()
    data = cp.CodePairsDataModule(batch_size=64)
    trainer = _trainer(100, check_val_every_n_epoch=None, val_check_interval=100, num_sanity_val_steps=0)
    before = trainer.validate(model, datamodule=data, verbose=False)[0]
    trainer.fit(model, datamodule=data)
    after = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"R@1 {before['val/r1']:.3f} -> {after['val/r1']:.3f}, "
          f"R@10 {before['val/r10']:.3f} -> {after['val/r10']:.3f}")
    assert set(after) >= {"val/r1", "val/r10", "val/r1_code2doc", "val/r10_code2doc", "train_loss"}
    # From the lexical start (shared random token vectors: R@1 0.165) to a trained model: R@1 goes up
    # by a wide margin (to about 0.28 in 100 steps at batch 64, lr 4e-3).
    assert after["val/r1"] > before["val/r1"] + 0.05
    assert after["val/r10"] > before["val/r10"] + 0.05
    assert model.siglip_temperature.item() > 10.0  # t is learnt


def test_reference_model_is_saved_and_loaded_frozen(tmp_path: Path) -> None:
    path = tmp_path / "reference.ckpt"
    trained = cp.train_reference_model(path, clean_subset_size=256, max_steps=5, model_kwargs={"dim": 16})
    loaded = cp.load_reference_model(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    batch = cp.CodePairCollate()([_small_train_set()[i] for i in range(4)])
    for x, y in zip(trained.pair_embeddings(batch), loaded.pair_embeddings(batch)):
        assert torch.equal(x, y)
    assert loaded.siglip_bias.item() == trained.siglip_bias.item()


def test_mismatched_vocabulary_is_refused() -> None:
    model = cp.TwoTowerRetrieval(vocab_size=1024, dim=8)
    with pytest.raises(ValueError, match="vocab_size"):
        _trainer(1).fit(model, datamodule=cp.CodePairsDataModule(batch_size=8))


def _val_metrics(log_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader(next(log_dir.rglob("metrics.csv")).open()))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v}


def test_yaml_job_runs_with_batchkit_fit(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BATCHKIT), "fit", "--config", str(ROOT / "examples/code_pairs.yaml"), "--trainer.max_steps=20",
         "--trainer.val_check_interval=20", "--data.noise_fraction=0.3", f"--trainer.default_root_dir={tmp_path}",
         f"--trainer.logger.init_args.save_dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = _val_metrics(tmp_path)
    assert 0.0 < metrics["val/r1"] <= metrics["val/r10"] <= 1.0


@pytest.mark.multiprocess
def test_held_out_metrics_are_the_same_under_two_process_ddp(tmp_path: Path) -> None:
    """Each rank embeds part of the held-out set; the metrics are over the whole set, as single-process."""
    ckpt = tmp_path / "model.ckpt"
    pl.seed_everything(0)
    cp.train_reference_model(ckpt, clean_subset_size=256, max_steps=10, model_kwargs={"dim": 32})
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}.json"
        run = subprocess.run([sys.executable, str(Path(__file__).with_name("code_pairs_validate_job.py")), str(ckpt),
                              str(out), str(devices)],
                             capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results[devices] = json.loads(out.read_text())
    assert results[1]["val/r1"] > 0
    for key in ("val/r1", "val/r10", "val/r1_code2doc", "val/r10_code2doc"):
        assert results[2][key] == pytest.approx(results[1][key], abs=1e-6)
