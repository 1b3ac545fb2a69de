"""Sequence peers: shapes, parameter counts, masking, the shared fit loop and argument checks."""

from __future__ import annotations

import pytest
import torch

from efgraph.training.sequence_peers import (GRUBaseline, GRUReader, SequenceTransformer, SequenceTransformerBaseline,
                                             gru_param_count, sequence_transformer_param_count)


def _sequences(n: int, t: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t) < lengths.unsqueeze(1)
    x = torch.randn(n, t, d, generator=g) * mask.unsqueeze(-1)
    return x, mask


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("shared", [False, True])
def test_param_counts_are_the_modules(shared):
    model = SequenceTransformer(7, 5, width=16, layers=3, heads=2, position="rotary", pool="first", causal=False,
                                shared=shared)
    assert _count(model) == sequence_transformer_param_count(7, 5, 16, 1 if shared else 3)
    assert _count(GRUReader(7, 5, 11)) == gru_param_count(7, 5, 11)


@pytest.mark.parametrize("position, pool, causal, shared", [
    ("sinusoidal", "mean", False, False), ("rotary", "first", False, False), ("none", "last", True, False),
    ("rotary", "first", False, True)])
def test_padding_is_ignored(position, pool, causal, shared):
    torch.manual_seed(0)
    model = SequenceTransformer(6, 4, width=8, layers=2, heads=2, position=position, pool=pool, causal=causal,
                                shared=shared).eval()
    x, mask = _sequences(5, 4, 6)
    longer = torch.cat([x, torch.randn(5, 3, 6)], dim=1)  # garbage in extra padded positions
    longer_mask = torch.cat([mask, torch.zeros(5, 3, dtype=torch.bool)], dim=1)
    longer[:, :4][~mask] = 7.0
    torch.testing.assert_close(model(x, mask), model(longer, longer_mask), atol=1e-5, rtol=1e-5)
    gru = GRUReader(6, 4, 5).eval()
    torch.testing.assert_close(gru(x, mask), gru(longer, longer_mask), atol=1e-5, rtol=1e-5)


def test_without_a_position_code_a_bidirectional_transformer_cannot_see_order_and_a_causal_one_can():
    torch.manual_seed(0)
    x, mask = torch.randn(1, 4, 6), torch.ones(1, 4, dtype=torch.bool)
    swapped = x[:, [0, 2, 1, 3]]
    blind = SequenceTransformer(6, 4, width=8, layers=1, heads=2, position="none", pool="first", causal=False)
    torch.testing.assert_close(blind(x, mask), blind(swapped, mask))
    # one causal layer read at the last token still sees a set; the second sees prefixes of different sets
    causal = SequenceTransformer(6, 4, width=8, layers=2, heads=2, position="none", pool="last", causal=True)
    assert not torch.allclose(causal(x, mask), causal(swapped, mask))


def test_fit_sizes_to_the_budget_keeps_the_best_state_and_predicts_longer_sequences():
    x, mask = _sequences(64, 4, 6)
    tgt = x.sum(dim=1)[:, :3]
    for peer in (SequenceTransformerBaseline(target_params=3000, heads=2, layers=1, steps=30, eval_every=10),
                 SequenceTransformerBaseline(target_params=3000, heads=2, shared=True, steps=30, eval_every=10),
                 GRUBaseline(target_params=3000, steps=30, eval_every=10)):
        peer.fit((x, mask), tgt, (x[:16], mask[:16]), tgt[:16])
        assert abs(peer.num_parameters - 3000) < 600
        assert peer.best_val_loss_ == min(loss for _, loss in peer.history_)
        assert peer.train_seconds_ > 0
        longer = torch.cat([x, torch.zeros(64, 3, 6)], dim=1)
        longer_mask = torch.cat([mask, torch.zeros(64, 3, dtype=torch.bool)], dim=1)
        torch.testing.assert_close(peer.predict((longer, longer_mask)), peer.predict((x, mask)), atol=1e-5, rtol=1e-5)
        again = type(peer)(**{k: getattr(peer, k) for k in ("target_params", "steps", "eval_every")},
                           **({"heads": 2, "layers": peer.layers, "shared": peer.shared}
                              if isinstance(peer, SequenceTransformerBaseline) else {}))
        again.fit((x, mask), tgt, (x[:16], mask[:16]), tgt[:16])
        torch.testing.assert_close(again.predict((x, mask)), peer.predict((x, mask)))  # deterministic by seed


@pytest.mark.parametrize("kwargs, message", [
    (dict(position="alibi"), "position: must be one of"), (dict(pool="max"), "pool: must be one of"),
    (dict(width=12), "width: must be a positive multiple of 2 heads (8)"), (dict(residual=True), "residual:"),
    (dict(loops=-1), "loops: must be >= 0")])
def test_transformer_peer_checks_its_arguments(kwargs, message):
    args = {"target_params": 1000} if "width" not in kwargs else {}
    with pytest.raises(ValueError) as err:
        SequenceTransformerBaseline(**args, **kwargs)
    assert message in str(err.value)


def test_fit_and_predict_check_the_sequence_inputs():
    x, mask = _sequences(8, 3, 4)
    peer = GRUBaseline(hidden=4, steps=1)
    with pytest.raises(ValueError, match="train_src: a sequence peer takes"):
        peer.fit(x.flatten(1), x[:, 0])
    with pytest.raises(ValueError, match="train_mask: must be a bool tensor"):
        peer.fit((x, mask.float()), x[:, 0])
    bad = mask.clone()
    bad[0] = torch.tensor([False, True, True])
    with pytest.raises(ValueError, match="train_mask: every row must start with its real tokens"):
        peer.fit((x, bad), x[:, 0])
    peer.fit((x, mask), x[:, 0])
    with pytest.raises(ValueError, match="src_x: token width 5 differs from the training width 4"):
        peer.predict((torch.zeros(2, 3, 5), mask[:2]))
