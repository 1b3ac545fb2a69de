"""Text pair files (JSONL/CSV/TSV) and offline embedding with the disk cache."""

from __future__ import annotations

import json

import pytest
import torch

import efgraph.data.embed as embed_mod
from efgraph.data import embed_texts, load_text_pairs, read_text_pairs, resolve_model_path

# --- reading ---------------------------------------------------------------------------------


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path, rows):
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_reads_pairs_keys_by_line_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path / "p.jsonl",
                  '{"source": "a cat", "target": "un chat"}\n\n'
                  '{"source": "a dog", "target": "un chien", "extra": 1}\n')
    pairs = read_text_pairs(path)
    assert pairs.sources == ["a cat", "a dog"]
    assert pairs.targets == ["un chat", "un chien"]
    assert pairs.keys == ["p.jsonl:1", "p.jsonl:3"]  # line numbers, blank line counted
    assert pairs.groups is None


def test_jsonl_custom_fields_keys_and_groups(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [
        {"en": "one", "fr": "un", "id": "x1", "book": "A"},
        {"en": "two", "fr": "deux", "id": "x2", "book": "B"},
    ])
    pairs = read_text_pairs(path, source_field="en", target_field="fr", key_field="id",
                            group_field="book")
    assert pairs.sources == ["one", "two"] and pairs.targets == ["un", "deux"]
    assert pairs.keys == ["x1", "x2"] and pairs.groups == ["A", "B"]


@pytest.mark.parametrize("bad_line, message", [
    ('{"source": "a", "target": ', r"p\.jsonl:3: malformed JSON"),
    ('["a", "b"]', r"p\.jsonl:3: expected a JSON object, got list"),
    ('{"source": "a"}', r"p\.jsonl:3: missing field\(s\) 'target'"),
    ('{"source": "a", "target": "  "}', r"p\.jsonl:3: field 'target' is empty"),
    ('{"source": 5, "target": "b"}', r"p\.jsonl:3: field 'source' must be a string, got int"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    good = '{"source": "s", "target": "t"}\n'
    path = _write(tmp_path / "p.jsonl", good + good + bad_line + "\n" + good)
    with pytest.raises(ValueError, match=message):
        read_text_pairs(path)


def test_duplicate_key_names_both_lines(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"source": "a", "target": "b", "id": "k"},
                                         {"source": "c", "target": "d", "id": "k"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: duplicate key 'k' \(first seen on line 1\)"):
        read_text_pairs(path, key_field="id")


def test_csv_quoting_and_line_numbers_after_multiline_field(tmp_path):
    path = _write(tmp_path / "p.csv",
                  'source,target\n'
                  '"Hello, world","He said ""hi""\nthen left"\n'
                  'plain,text\n')
    pairs = read_text_pairs(path)
    assert pairs.sources == ["Hello, world", "plain"]
    assert pairs.targets == ['He said "hi"\nthen left', "text"]
    # The second record starts on line 4 because the quoted field spans lines 2-3.
    assert pairs.keys == ["p.csv:2", "p.csv:4"]


def test_csv_wrong_field_count_and_empty_field_report_the_line(tmp_path):
    path = _write(tmp_path / "p.csv", "source,target\na,b\nc,d,e\n")
    with pytest.raises(ValueError, match=r"p\.csv:3: expected 2 CSV fields .*found 3"):
        read_text_pairs(path)
    path = _write(tmp_path / "q.csv", "source,target\na,b\n\nc,\n")
    with pytest.raises(ValueError, match=r"q\.csv:4: field 'target' is empty"):
        read_text_pairs(path)


def test_csv_header_must_name_the_columns(tmp_path):
    path = _write(tmp_path / "p.csv", "src,tgt\na,b\n")
    with pytest.raises(ValueError, match=r"p\.csv:1: header lacks column\(s\) 'source', 'target'"):
        read_text_pairs(path)
    assert read_text_pairs(path, source_field="src", target_field="tgt").sources == ["a"]


def test_tsv_has_no_quoting_and_checks_field_count(tmp_path):
    path = _write(tmp_path / "p.tsv", 'id\tsource\ttarget\n1\t"quoted"\tx\n2\ty\tz\n')
    pairs = read_text_pairs(path, key_field="id")
    assert pairs.sources == ['"quoted"', "y"] and pairs.keys == ["1", "2"]
    path = _write(tmp_path / "q.tsv", "source\ttarget\na\tb\nno tab here\n")
    with pytest.raises(ValueError, match=r"q\.tsv:3: expected 2 TSV fields .*found 1"):
        read_text_pairs(path)


def test_unknown_format_and_empty_file(tmp_path):
    with pytest.raises(ValueError, match=r"unknown text pair format '\.json'.*\.jsonl"):
        read_text_pairs(_write(tmp_path / "p.json", "{}"))
    with pytest.raises(ValueError, match="no text pairs found"):
        read_text_pairs(_write(tmp_path / "e.jsonl", "\n\n"))
    with pytest.raises(ValueError, match="empty CSV file: no header row"):
        read_text_pairs(_write(tmp_path / "e.csv", ""))
    with pytest.raises(ValueError, match="no text pairs found"):
        read_text_pairs(_write(tmp_path / "h.csv", "source,target\n"))
    # file_format overrides the extension.
    path = _write(tmp_path / "p.txt", '{"source": "a", "target": "b"}\n')
    assert read_text_pairs(path, file_format="jsonl").sources == ["a"]


# --- embedding (packaged all-MiniLM-L6-v2, offline) --------------------------------------------

_TEXT_ROWS = [
    {"source": "The cat sleeps on the warm windowsill.",
     "target": "A cat is napping in the sunny window."},
    {"source": "Stock markets fell sharply after the announcement.",
     "target": "Share prices dropped steeply following the news."},
    {"source": "She plays the violin in an orchestra.",
     "target": "She is a violinist in a symphony orchestra."},
    {"source": "Heavy rain flooded the streets overnight.",
     "target": "The roads were under water after a night of downpour."},
    {"source": "The recipe needs two cups of flour.",
     "target": "You need 2 cups of flour for this recipe."},
]


@pytest.fixture
def count_encodes(monkeypatch):
    """Count calls that reach the model (embed._encode is the only call site)."""
    calls: list[int] = []
    real = embed_mod._encode

    def counting(model, texts, **kw):
        calls.append(len(texts))
        return real(model, texts, **kw)

    monkeypatch.setattr(embed_mod, "_encode", counting)
    return calls


def test_load_text_pairs_embeds_offline_then_hits_the_cache(tmp_path, monkeypatch, count_encodes):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path = _jsonl(tmp_path / "pairs.jsonl", _TEXT_ROWS)
    cache = tmp_path / "cache"

    first = load_text_pairs(path, cache_dir=cache)
    assert count_encodes == [5, 5]  # source side, then target side
    assert first.src.shape == (5, 384) and first.tgt.shape == (5, 384)
    assert first.src.dtype == torch.float32
    torch.testing.assert_close(first.src.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(first.tgt.norm(dim=1), torch.ones(5))
    assert first.keys == [f"pairs.jsonl:{i}" for i in range(1, 6)]
    # Real semantics: each source is closest to its own paraphrase.
    sim = first.src @ first.tgt.T
    assert torch.equal(sim.argmax(dim=1), torch.arange(5))
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert not list(cache.glob(".*"))  # no temporary files left

    # Second call: served from disk; the model must not even be loaded.
    def no_model(*_a, **_k):
        raise AssertionError("model used on a cache hit")

    monkeypatch.setattr(embed_mod, "load_model", no_model)
    second = load_text_pairs(path, cache_dir=cache)
    assert count_encodes == [5, 5]
    assert torch.equal(second.src, first.src) and torch.equal(second.tgt, first.tgt)


def test_cache_key_depends_on_texts_and_dir_comes_from_env(tmp_path, monkeypatch, count_encodes):
    monkeypatch.setenv("EFGRAPH_CACHE_DIR", str(tmp_path / "envcache"))
    texts = ["alpha beta", "gamma delta", "alpha beta"]
    emb = embed_texts(texts)  # cache_dir=None -> $EFGRAPH_CACHE_DIR
    assert count_encodes == [2]  # duplicates are embedded once
    assert torch.equal(emb[0], emb[2]) and not torch.equal(emb[0], emb[1])
    assert len(list((tmp_path / "envcache").glob("*.safetensors"))) == 1

    embed_texts(texts)
    assert count_encodes == [2]  # hit
    embed_texts(["alpha beta", "gamma delta", "alpha beta."])  # one character differs
    assert count_encodes == [2, 3]
    # The model folder given by path has the same content fingerprint as the default: a hit.
    again = embed_texts(texts, model=str(resolve_model_path(None)))
    assert count_encodes == [2, 3] and torch.equal(again, emb)
    # use_cache=False always runs the model.
    embed_texts(texts, use_cache=False)
    assert count_encodes == [2, 3, 2]


def test_corrupt_cache_entry_is_recomputed(tmp_path, count_encodes):
    texts = ["one sentence", "another sentence"]
    emb = embed_texts(texts, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(b"truncated")
    again = embed_texts(texts, cache_dir=tmp_path)
    assert count_encodes == [2, 2]
    torch.testing.assert_close(again, emb)
    assert torch.equal(embed_texts(texts, cache_dir=tmp_path), again)  # rewritten, now a hit
    assert count_encodes == [2, 2]


def test_embed_texts_rejects_bad_input_and_hub_names(tmp_path):
    with pytest.raises(ValueError, match="no texts"):
        embed_texts([], cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        embed_texts(["ok", " "], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="never downloaded"):
        embed_texts(["ok"], model="sentence-transformers/all-mpnet-base-v2", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="does not look like a sentence-transformers model"):
        embed_texts(["ok"], model=tmp_path, cache_dir=tmp_path)


def test_rows_sharing_a_source_share_a_group_and_one_side_of_the_split(tmp_path):
    """dataset: text groups by source text (or a group column): no source in train and test."""
    from efgraph.data import make_split
    from efgraph.data.text import text_file_has_field

    rows = [{"source": f"premise {i // 3}", "target": f"hypothesis {i}"} for i in range(60)]  # 3 rows per source
    path = _write(tmp_path / "nli.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert not text_file_has_field(path, "group")
    texts = read_text_pairs(path, group_by_source=True)
    assert texts.groups == texts.sources
    split = make_split(len(texts), groups=texts.groups, seed=0)
    sides = [{texts.sources[i] for i in part} for part in (split.train, split.validation, split.test)]
    assert not (sides[0] & sides[2]) and not (sides[0] & sides[1]) and not (sides[1] & sides[2])
    # an explicit group column wins
    grouped = _write(tmp_path / "g.csv", "source,target,group\na,b,g1\nc,d,g1\n")
    assert text_file_has_field(grouped, "group")
    assert read_text_pairs(grouped, group_field="group").groups == ["g1", "g1"]


def test_train_script_text_dataset_splits_by_source(tmp_path, monkeypatch, count_encodes):
    """run.load_pairs for dataset: text carries the groups that make_run_split uses."""
    from efgraph.config import EnergyConfig
    from efgraph.training.run import describe_split, load_pairs, make_run_split

    monkeypatch.setenv("EFGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    rows = [dict(_TEXT_ROWS[i % 5], target=f"{_TEXT_ROWS[i % 5]['target']} ({i})") for i in range(20)]
    path = _write(tmp_path / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    config = EnergyConfig(dataset="text", data_path=str(path), input_dim=384, output_dim=384,
                          val_fraction=0.2, test_fraction=0.2)
    pairs = load_pairs(config, progress=False)
    assert pairs.groups == [r["source"] for r in rows]
    split = make_run_split(config, pairs)
    train_sources = {pairs.groups[i] for i in split.train}
    assert not train_sources & {pairs.groups[i] for i in split.test}
    assert describe_split(config, pairs, split)["by"] == "source text"
    assert describe_split(config, pairs, split)["groups"] == 5


def test_embedding_uses_every_usable_core_and_restores_the_thread_count(monkeypatch):
    """Under torchrun (OMP_NUM_THREADS=1) rank 0 must not embed on one thread."""
    seen: list[int] = []

    class Model:
        def encode(self, texts, **kwargs):
            seen.append(torch.get_num_threads())
            return torch.ones(len(texts), 4)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embed_mod._encode(Model(), ["a", "b"], batch_size=2, progress=False)
        assert seen == [embed_mod.usable_cores()]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
