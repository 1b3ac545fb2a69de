"""EmbeddingPairs: the validated container every efgraph.data loader returns."""

from __future__ import annotations

import importlib
import math
import re
import types

import pytest
import torch

import efgraph.data as data
from efgraph.data import EmbeddingPairs


def _pairs(n: int = 4, d_src: int = 3, d_tgt: int = 5, **kw) -> EmbeddingPairs:
    src = torch.arange(n * d_src, dtype=torch.float32).reshape(n, d_src)
    tgt = -torch.arange(n * d_tgt, dtype=torch.float32).reshape(n, d_tgt)
    return EmbeddingPairs(src, tgt, **kw)


def test_public_api_is_what_the_package_documents_and_defines():
    """``__all__`` is exactly the package's public names: every function and class the module
    docstring documents, each the object of the efgraph.data module that defines it, and nothing
    imported into the package's namespace is left out of it."""
    documented = set(re.findall(r":(?:func|class):`(\w+)`", data.__doc__))
    assert documented and documented <= set(data.__all__)
    assert len(set(data.__all__)) == len(data.__all__)
    public = {name for name, value in vars(data).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public == set(data.__all__)
    for name in data.__all__:
        value = getattr(data, name)
        if name == "SUPPORTED_EXTENSIONS":  # what load_embedding_pairs reads, in the order its errors list
            assert value == (".pt", ".npz", ".safetensors", ".npy")
            continue
        assert callable(value), name
        assert value.__module__.startswith("efgraph.data."), (name, value.__module__)
        assert getattr(importlib.import_module(value.__module__), name) is value, name


def test_widths_may_differ_and_len_counts_rows():
    p = _pairs(4, 3, 5)
    assert len(p) == 4
    assert (p.src_dim, p.tgt_dim) == (3, 5)


def test_float64_is_cast_to_float32_contiguous():
    src = torch.randn(3, 4, dtype=torch.float64).t().contiguous().t()  # non-contiguous view
    p = EmbeddingPairs(src, torch.randn(3, 2, dtype=torch.float64))
    assert p.src.dtype == torch.float32 and p.tgt.dtype == torch.float32
    assert p.src.is_contiguous()
    torch.testing.assert_close(p.src, src.float())


def test_mismatched_row_counts_name_both_counts():
    with pytest.raises(ValueError, match=r"tgt: has 4 rows but src has 3"):
        EmbeddingPairs(torch.zeros(3, 2), torch.zeros(4, 2))


def test_empty_set_is_rejected():
    with pytest.raises(ValueError, match="empty pair set"):
        EmbeddingPairs(torch.zeros(0, 2), torch.zeros(0, 2))


@pytest.mark.parametrize("shape", [(4,), (2, 2, 2)])
def test_non_2d_is_rejected_with_the_tensor_name(shape):
    with pytest.raises(ValueError, match=r"tgt: must be 2-D"):
        EmbeddingPairs(torch.zeros(2, 2), torch.zeros(*shape))


def test_integer_tensor_is_rejected():
    with pytest.raises(ValueError, match=r"src: must be a floating-point tensor.*int64"):
        EmbeddingPairs(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2))


def test_zero_width_is_rejected():
    with pytest.raises(ValueError, match="src: has width 0"):
        EmbeddingPairs(torch.zeros(2, 0), torch.zeros(2, 2))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_names_tensor_and_first_bad_row(bad):
    tgt = torch.zeros(5, 3)
    tgt[3, 1] = bad
    tgt[4, 0] = bad
    with pytest.raises(ValueError, match=r"tgt: contains a non-finite value.*first bad row 3 "
                                         r"\(column 1"):
        EmbeddingPairs(torch.zeros(5, 2), tgt)


def test_float64_overflowing_float32_is_caught_as_non_finite():
    src = torch.zeros(2, 2, dtype=torch.float64)
    src[1, 0] = 1e300
    with pytest.raises(ValueError, match="src: contains a non-finite value.*first bad row 1"):
        EmbeddingPairs(src, torch.zeros(2, 2))


def test_keys_and_groups_are_validated():
    with pytest.raises(ValueError, match="keys has 2 entries but there are 4 pairs"):
        _pairs(keys=["a", "b"])
    with pytest.raises(ValueError, match=r"keys must be unique: 'a' repeats at row 2"):
        _pairs(keys=["a", "b", "a", "c"])
    with pytest.raises(ValueError, match=r"groups\[1\] must be a string"):
        _pairs(groups=["g", 1, "g", "g"])
    # Groups repeat by design.
    assert _pairs(groups=["g", "g", "h", "h"]).groups == ["g", "g", "h", "h"]


def test_subset_keeps_rows_keys_and_groups_in_the_given_order():
    p = _pairs(keys=["k0", "k1", "k2", "k3"], groups=["a", "a", "b", "b"])
    sub = p.subset([3, 0])
    assert len(sub) == 2
    torch.testing.assert_close(sub.src, p.src[[3, 0]])
    torch.testing.assert_close(sub.tgt, p.tgt[[3, 0]])
    assert sub.keys == ["k3", "k0"] and sub.groups == ["b", "a"]
    # A tensor of indices works too.
    assert p.subset(torch.tensor([1])).keys == ["k1"]


def test_subset_rejects_out_of_range_negative_and_empty():
    p = _pairs()
    with pytest.raises(ValueError, match="index 4 is out of range for 4 pairs"):
        p.subset([0, 4])
    with pytest.raises(ValueError, match="index -1 is out of range"):
        p.subset([-1])
    with pytest.raises(ValueError, match="no indices"):
        p.subset([])


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Without the fsyncs a power loss can leave the new name pointing at an empty file."""
    import os

    from efgraph.data._atomic import atomic_write_text

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(tmp_path / "results.json", "{}\n")
    assert events == ["fsync-file", "replace", "fsync-dir"]
    assert (tmp_path / "results.json").read_text() == "{}\n"


def test_atomic_write_gives_the_file_the_permissions_of_an_ordinary_new_file(tmp_path):
    import os

    from efgraph.data._atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
