"""Loading and saving precomputed embedding pair files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from efgraph.data import EmbeddingPairs, load_embedding_pairs, save_embedding_pairs


def _pairs(n: int = 6) -> EmbeddingPairs:
    gen = torch.Generator().manual_seed(0)
    return EmbeddingPairs(
        torch.randn(n, 4, generator=gen),
        torch.randn(n, 7, generator=gen),  # a different width on purpose
        keys=[f"k{i}" for i in range(n)],
        groups=["a" if i % 2 else "b" for i in range(n)],
    )


@pytest.mark.parametrize("ext", [".pt", ".npz", ".safetensors"])
def test_round_trip_keeps_tensors_keys_and_groups(tmp_path, ext):
    pairs = _pairs()
    path = save_embedding_pairs(pairs, tmp_path / f"pairs{ext}")
    loaded = load_embedding_pairs(path)
    assert torch.equal(loaded.src, pairs.src) and torch.equal(loaded.tgt, pairs.tgt)
    assert loaded.keys == pairs.keys and loaded.groups == pairs.groups
    # Atomic writes leave no temporary files behind.
    assert [p.name for p in tmp_path.iterdir()] == [f"pairs{ext}"]


def test_npy_pair_round_trip_from_either_file(tmp_path):
    pairs = _pairs()
    written = save_embedding_pairs(pairs, tmp_path / "emb.src.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.src.npy", "emb.tgt.npy"]
    for name in ("emb.src.npy", "emb.tgt.npy"):
        loaded = load_embedding_pairs(tmp_path / name)
        assert torch.equal(loaded.src, pairs.src) and torch.equal(loaded.tgt, pairs.tgt)
        assert loaded.keys is None
    assert written == tmp_path / "emb.src.npy"


def test_npy_without_sibling_or_with_bad_name(tmp_path):
    np.save(tmp_path / "only.src.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match=r"only\.tgt\.npy"):
        load_embedding_pairs(tmp_path / "only.src.npy")
    np.save(tmp_path / "plain.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"<stem>\.src\.npy and <stem>\.tgt\.npy"):
        load_embedding_pairs(tmp_path / "plain.npy")


def test_pt_accepts_source_target_aliases_and_numpy_float64(tmp_path):
    torch.save({"source": torch.ones(2, 3), "target": torch.zeros(2, 5, dtype=torch.float64)},
               tmp_path / "a.pt")
    loaded = load_embedding_pairs(tmp_path / "a.pt")
    assert loaded.src.shape == (2, 3) and loaded.tgt.shape == (2, 5)
    assert loaded.tgt.dtype == torch.float32
    np.savez(tmp_path / "b.npz", source=np.ones((3, 2)), target=np.ones((3, 2)))
    assert len(load_embedding_pairs(tmp_path / "b.npz")) == 3


@pytest.mark.parametrize("ext", [".pt", ".npz", ".safetensors"])
def test_missing_entry_is_named_with_what_was_found(tmp_path, ext):
    path = tmp_path / f"m{ext}"
    if ext == ".pt":
        torch.save({"src": torch.zeros(2, 2), "labels": torch.zeros(2)}, path)
    elif ext == ".npz":
        np.savez(path, src=np.zeros((2, 2)), labels=np.zeros(2))
    else:
        save_file({"src": torch.zeros(2, 2), "labels": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError) as info:
        load_embedding_pairs(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "missing entry 'tgt' (or 'target')" in msg and "'labels'" in msg


def test_both_src_and_source_is_ambiguous(tmp_path):
    torch.save({"src": torch.zeros(2, 2), "source": torch.zeros(2, 2), "tgt": torch.zeros(2, 2)},
               tmp_path / "x.pt")
    with pytest.raises(ValueError, match="ambiguous: both 'src' and 'source'"):
        load_embedding_pairs(tmp_path / "x.pt")


@pytest.mark.parametrize("ext", [".pt", ".npz", ".safetensors"])
def test_mismatched_counts_give_both_counts(tmp_path, ext):
    path = tmp_path / f"c{ext}"
    src, tgt = torch.zeros(3, 2), torch.zeros(5, 2)
    if ext == ".pt":
        torch.save({"src": src, "tgt": tgt}, path)
    elif ext == ".npz":
        np.savez(path, src=src.numpy(), tgt=tgt.numpy())
    else:
        save_file({"src": src, "tgt": tgt}, str(path))
    with pytest.raises(ValueError, match=r"c\.\w+: tgt: has 5 rows but src has 3"):
        load_embedding_pairs(path)


def test_empty_set_is_rejected(tmp_path):
    np.savez(tmp_path / "e.npz", src=np.zeros((0, 4), np.float32), tgt=np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match=r"e\.npz: empty pair set"):
        load_embedding_pairs(tmp_path / "e.npz")


def test_non_finite_names_tensor_row_and_file(tmp_path):
    tgt = torch.zeros(4, 3)
    tgt[2, 0] = float("nan")
    save_file({"src": torch.zeros(4, 2), "tgt": tgt}, str(tmp_path / "n.safetensors"))
    with pytest.raises(ValueError, match=r"n\.safetensors: tgt: contains a non-finite value.*"
                                         r"first bad row 2"):
        load_embedding_pairs(tmp_path / "n.safetensors")


def test_unknown_extension_lists_the_supported_ones(tmp_path):
    path = tmp_path / "pairs.h5"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown extension '\.h5'; supported: \.pt, \.npz, "
                                         r"\.safetensors, \.npy"):
        load_embedding_pairs(path)
    with pytest.raises(ValueError, match="unknown extension"):
        save_embedding_pairs(_pairs(), tmp_path / "pairs.txt")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_embedding_pairs(tmp_path / "nope.pt")


class _Payload:
    """Unpickling this would create a folder: proof of code execution if it ever appears."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickle_bearing_pt_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"src": torch.zeros(2, 2), "tgt": torch.zeros(2, 2),
                "meta": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: refusing to load: the file contains pickled"):
        load_embedding_pairs(tmp_path / "evil.pt")
    assert not marker.exists()


def test_pt_that_is_not_a_dict_or_not_torch(tmp_path):
    torch.save(torch.zeros(2, 2), tmp_path / "t.pt")
    with pytest.raises(ValueError, match="expected a dict with entries 'src' and 'tgt', "
                                         "got Tensor"):
        load_embedding_pairs(tmp_path / "t.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt"):
        load_embedding_pairs(tmp_path / "junk.pt")


def test_npz_object_array_needs_pickle_and_is_refused(tmp_path):
    obj = np.empty(2, dtype=object)
    obj[:] = [np.zeros(2), np.zeros(2)]
    np.savez(tmp_path / "o.npz", src=obj, tgt=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"o\.npz: cannot read \.npz without pickle"):
        load_embedding_pairs(tmp_path / "o.npz")


def test_bad_keys_in_file_are_reported(tmp_path):
    torch.save({"src": torch.zeros(2, 2), "tgt": torch.zeros(2, 2), "keys": ["a", "a"]},
               tmp_path / "k.pt")
    with pytest.raises(ValueError, match=r"k\.pt: keys must be unique"):
        load_embedding_pairs(tmp_path / "k.pt")
