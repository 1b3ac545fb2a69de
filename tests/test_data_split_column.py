"""A pair file's own split column, and a sequence source (tokens + mask) in a pair file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efgraph.config import create_debug_config
from efgraph.data import EmbeddingPairs, load_embedding_pairs, save_embedding_pairs
from efgraph.data.split import split_from_labels, split_pairs
from efgraph.training.run import describe_split, load_pairs, make_run_split

LABELS = ["train", "train", "validation", "test", "train", "test"]


def _pairs(split=LABELS, sequence: bool = False) -> EmbeddingPairs:
    gen = torch.Generator().manual_seed(0)
    n = len(split)
    if not sequence:
        return EmbeddingPairs(torch.randn(n, 4, generator=gen), torch.randn(n, 3, generator=gen), split=split)
    seq = torch.randn(n, 5, 4, generator=gen)
    mask = torch.arange(5) < torch.tensor([1, 2, 5, 3, 4, 5][:n]).unsqueeze(1)
    return EmbeddingPairs(seq.flatten(1), torch.randn(n, 3, generator=gen), split=split, src_seq=seq, src_mask=mask)


@pytest.mark.parametrize("ext", [".pt", ".npz", ".safetensors"])
def test_split_column_round_trips_and_the_run_uses_it_instead_of_a_random_split(tmp_path, ext, caplog):
    path = save_embedding_pairs(_pairs(), tmp_path / f"p{ext}")
    loaded = load_embedding_pairs(path)
    assert loaded.split == LABELS
    config = create_debug_config(dataset="pairs", data_path=str(path), input_dim=4, output_dim=3)
    with caplog.at_level("INFO"):
        split = make_run_split(config, load_pairs(config, progress=False))
    assert (split.train, split.validation, split.test) == ([0, 1, 4], [2], [3, 5])
    assert "split column" in caplog.text
    assert describe_split(config, loaded, split)["by"] == "the data's split column"
    assert split_pairs(loaded) == split
    train, val, test = split.apply(loaded)
    assert train.split == ["train"] * 3 and test.split == ["test"] * 2


def test_bad_labels_and_an_empty_part_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"split\[1\]: 'tets' is not a split label; the split column allows "
                                         r"train, validation, test"):
        EmbeddingPairs(torch.ones(2, 2), torch.ones(2, 2), split=["train", "tets"])
    torch.save({"src": torch.ones(2, 2), "tgt": torch.ones(2, 2), "split": ["train", "val"]}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"b\.pt: split\[1\]: 'val' is not a split label"):
        load_embedding_pairs(tmp_path / "b.pt")
    with pytest.raises(ValueError, match="split: no row is labelled 'validation'; the split column must give each "
                                         "of train, validation, test at least one row"):
        split_from_labels(["train", "test", "train"])
    with pytest.raises(ValueError, match="split has 2 entries but there are 3 pairs"):
        EmbeddingPairs(torch.ones(3, 2), torch.ones(3, 2), split=["train", "test"])


@pytest.mark.parametrize("ext", [".pt", ".npz", ".safetensors"])
def test_a_sequence_source_round_trips_with_its_mask_and_padding_is_ignored(tmp_path, ext):
    pairs = _pairs(sequence=True)
    assert bool((pairs.src_seq[~pairs.src_mask] == 0).all())  # padding zeroed on construction
    path = save_embedding_pairs(pairs, tmp_path / f"s{ext}")
    loaded = load_embedding_pairs(path)
    assert torch.equal(loaded.src_seq, pairs.src_seq) and torch.equal(loaded.src_mask, pairs.src_mask)
    assert torch.equal(loaded.src, pairs.src_seq.flatten(1)) and loaded.src_dim == 20
    assert loaded.split == LABELS
    part = loaded.subset([3, 0])
    assert torch.equal(part.src_seq, pairs.src_seq[[3, 0]]) and torch.equal(part.src_mask, pairs.src_mask[[3, 0]])


def test_padding_values_in_a_file_are_ignored_even_nan(tmp_path):
    seq, mask = torch.ones(2, 3, 2), torch.tensor([[True, False, False], [True, True, True]])
    seq[0, 1:] = float("nan")
    np.savez(tmp_path / "n.npz", src=seq.numpy(), mask=mask.numpy(), tgt=np.ones((2, 2), np.float32))
    loaded = load_embedding_pairs(tmp_path / "n.npz")
    assert loaded.src_seq[0, 1:].abs().sum() == 0 and loaded.src_seq[0, 0].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("entries, message", [
    (dict(src=torch.ones(2, 3, 2)), "src: shape (2, 3, 2) is a sequence source [N, T, d], which needs a bool entry "
                                    "'mask'"),
    (dict(src=torch.ones(2, 3), mask=torch.ones(2, 3, dtype=torch.bool)), "mask: given, but src has shape (2, 3)"),
    (dict(src=torch.ones(2, 3, 2), mask=torch.ones(2, 3)), "src_mask: must be a bool tensor [N, T] = [2, 3]"),
    (dict(src=torch.ones(2, 3, 2), mask=torch.ones(2, 4, dtype=torch.bool)), "src_mask: must be a bool tensor"),
    (dict(src=torch.ones(2, 3, 2), mask=torch.tensor([[True, False, False], [False, False, False]])),
     "src_mask: row 1 has no real token; every row needs at least one True"),
    (dict(src=torch.ones(3, 3, 2), mask=torch.ones(3, 3, dtype=torch.bool)), "tgt: has 2 rows but src has 3"),
    (dict(src=torch.ones(2, 3, 2, dtype=torch.long), mask=torch.ones(2, 3, dtype=torch.bool)),
     "src_seq: a sequence source must be a float tensor [N, T, d]"),
    (dict(src=torch.ones(2, 3, 2).index_fill(1, torch.tensor([1]), 0.0), mask=torch.ones(2, 3, dtype=torch.bool)),
     "src_seq: row 0 token 1 is a real token (src_mask True) of all zeros"),
])
def test_a_bad_sequence_source_is_refused_naming_what_is_wrong(tmp_path, entries, message):
    torch.save({"tgt": torch.ones(2, 2), **entries}, tmp_path / "q.pt")
    with pytest.raises(ValueError) as err:
        load_embedding_pairs(tmp_path / "q.pt")
    assert str(err.value).startswith(str(tmp_path / "q.pt")) and message in str(err.value)


def test_a_sequence_source_cannot_go_to_npy_and_the_container_needs_both_parts(tmp_path):
    with pytest.raises(ValueError, match="cannot hold a sequence source's mask"):
        save_embedding_pairs(_pairs(sequence=True), tmp_path / "x.src.npy")
    with pytest.raises(ValueError, match="src_seq, src_mask: a sequence source needs both"):
        EmbeddingPairs(torch.ones(2, 2), torch.ones(2, 2), src_seq=torch.ones(2, 1, 2))


def test_vector_pairs_files_are_unchanged(tmp_path):
    pairs = EmbeddingPairs(torch.randn(3, 4), torch.randn(3, 2), keys=["a", "b", "c"])
    loaded = load_embedding_pairs(save_embedding_pairs(pairs, tmp_path / "v.pt"))
    assert loaded.split is None and loaded.src_seq is None and loaded.src_mask is None
    assert set(torch.load(tmp_path / "v.pt")) == {"src", "tgt", "keys"}
