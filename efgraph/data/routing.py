"""A task that needs routing: each part of the input must go to a place the input itself names.

The input holds ``S`` tokens (``routing_token_dim`` wide each) and, beside each token, the address
of the output slot it belongs in (a one-hot over the ``S`` slots, a fresh random permutation per
pair). The target is the tokens written into their slots::

    x = [t_1, a_1, ..., t_S, a_S]          a_i = onehot(pi(i)) * scale
    y[slot pi(i)] = t_i

Why no linear map can do it: slot j of y is ``sum_i [pi(i) = j] t_i``, a product of an address
entry and a token entry; over random permutations a linear map can only predict the mean of the
tokens in every slot (cosine about ``1 / sqrt(S)`` with the truth). An MLP must learn the
multiplicative gating; a lattice can carry each token from where it lies on the input face to
where its slot is read on the output face.

To look like an embedding and not favour any architecture's axes, both sides are rotated by fixed
random orthogonal matrices (drawn from ``seed``) and rows are unit norm. The rotation is linear, so
it changes nothing for linear maps or MLPs in principle.

Difficulty knobs: ``slots`` (more slots: lower linear ceiling, more gating to learn) and
``noise`` (Gaussian noise on the target, relative to a token entry's size). Known ceiling: the
generator's own function (:func:`routing_oracle`) scores cosine 1 at ``noise = 0``; with noise its
test cosine against the noisy targets is the ceiling that :func:`routing_ceiling` reports.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from efgraph.data.pairs import EmbeddingPairs
from efgraph.data.synthetic import _salted


def routing_dims(slots: int, token_dim: int) -> tuple[int, int]:
    """``(input_dim, output_dim)`` of a routing task: ``S * (token_dim + S)`` and ``S * token_dim``."""
    return slots * (token_dim + slots), slots * token_dim


def _rotations(slots: int, token_dim: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(_salted(seed, "routing-rotation"))
    in_dim, out_dim = routing_dims(slots, token_dim)
    q_in, _ = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=gen))
    q_out, _ = torch.linalg.qr(torch.randn(out_dim, out_dim, generator=gen))
    return q_in, q_out


def make_routing_pairs(n: int, slots: int, token_dim: int, seed: int = 0, *, noise: float = 0.0) -> EmbeddingPairs:
    """Draw ``n`` routing pairs (see the module docstring).

    Args:
        n: number of pairs, ``>= 1``.
        slots: ``S >= 2``, tokens per input and slots per output.
        token_dim: width of a token, ``>= 1``.
        seed: fixes the rotations, the tokens, the permutations and the noise.
        noise: standard deviation of the target noise relative to a token entry's size, ``>= 0``.

    Returns:
        :class:`EmbeddingPairs`, ``src [n, S * (token_dim + S)]``, ``tgt [n, S * token_dim]``, rows
        unit norm, keys ``"routing-<i>"``.
    """
    for name, value, low in (("n", n, 1), ("routing_slots", slots, 2), ("routing_token_dim", token_dim, 1)):
        if value < low:
            raise ValueError(f"{name}: must be >= {low}, got {value}")
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"routing_noise: must be a finite value >= 0, got {noise}")
    gen = torch.Generator().manual_seed(_salted(seed, "routing-data"))
    tokens = torch.randn(n, slots, token_dim, generator=gen) / math.sqrt(token_dim)  # each token ~ unit norm
    perm = torch.argsort(torch.rand(n, slots, generator=gen), dim=1)  # perm[:, i] = slot of token i
    address = torch.nn.functional.one_hot(perm, slots).float()  # [n, S, S], unit norm like a token
    src = torch.cat([tokens, address], dim=2).reshape(n, -1)
    tgt = torch.zeros_like(tokens).scatter_(1, perm.unsqueeze(2).expand(-1, -1, token_dim), tokens).reshape(n, -1)
    if noise > 0:
        tgt = tgt + noise / math.sqrt(token_dim) * torch.randn(tgt.shape, generator=gen)
    q_in, q_out = _rotations(slots, token_dim, seed)
    src = torch.nn.functional.normalize(src @ q_in, dim=1)
    tgt = torch.nn.functional.normalize(tgt @ q_out, dim=1)
    return EmbeddingPairs(src=src, tgt=tgt, keys=[f"routing-{i}" for i in range(n)])


def routing_oracle(src: Tensor, slots: int, token_dim: int, seed: int = 0) -> Tensor:
    """The generator's own function: ``src [N, S * (token_dim + S)]`` -> noise-free unit-norm targets."""
    q_in, q_out = _rotations(slots, token_dim, seed)
    parts = (src @ q_in.t()).view(src.size(0), slots, token_dim + slots)
    tokens, perm = parts[..., :token_dim], parts[..., token_dim:].argmax(dim=2)
    tgt = torch.zeros_like(tokens).scatter_(1, perm.unsqueeze(2).expand(-1, -1, token_dim), tokens)
    return torch.nn.functional.normalize(tgt.reshape(src.size(0), -1) @ q_out, dim=1)


def routing_ceiling(pairs: EmbeddingPairs, slots: int, token_dim: int, seed: int = 0) -> float:
    """Mean cosine of :func:`routing_oracle` against ``pairs``' targets: what a perfect router scores
    (1.0 without noise, less with it)."""
    pred = routing_oracle(pairs.src, slots, token_dim, seed)
    return float(torch.nn.functional.cosine_similarity(pred, pairs.tgt, dim=1).mean())
