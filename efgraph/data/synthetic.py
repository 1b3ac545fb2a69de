"""Synthetic teacher-student pairs: a known, learnable target for smoke tests and debugging.

The target is the output of a fixed random network (the *teacher*) applied to the source, so a
model that trains well must be able to drive the error towards the noise floor; with real text
pairs one cannot tell a bug from a hard task. Everything is drawn from seeded ``torch.Generator``
objects, so the same arguments give bit-identical tensors on any CPU.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import Tensor

from efgraph.data.pairs import EmbeddingPairs


def make_teacher_pairs(
    n: int,
    input_dim: int,
    output_dim: int,
    seed: int = 0,
    *,
    hidden_dim: int = 64,
    noise: float = 0.0,
    teacher_seed: int | None = None,
) -> EmbeddingPairs:
    """Draw ``n`` pairs ``(x, normalize(teacher(x) + noise))`` from a fixed random teacher.

    The teacher (:func:`teacher_network`) is a 2-layer tanh MLP with Gaussian weights scaled by
    ``1/sqrt(fan_in)``.

    Args:
        n: number of pairs, ``>= 1``.
        input_dim: ``D_src``.
        output_dim: ``D_tgt``.
        seed: seeds the inputs and the noise (and the teacher unless ``teacher_seed`` is given).
        hidden_dim: teacher hidden width.
        noise: standard deviation of Gaussian noise added to the teacher output *relative to its
            typical entry size* before normalisation; 0 gives an exactly learnable map.
        teacher_seed: seed of the teacher weights. Fixing it while varying ``seed`` draws fresh
            samples from the *same* function (e.g. an independent test set).
    Returns:
        :class:`EmbeddingPairs` with ``src [n, input_dim]`` and ``tgt [n, output_dim]``, rows
        unit-norm, keys ``"teacher-<i>"``.
    """
    for name, value in (("n", n), ("input_dim", input_dim), ("output_dim", output_dim),
                        ("hidden_dim", hidden_dim)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite value >= 0, got {noise}")

    # Separate generators: the teacher must not change when n changes, and vice versa.
    teacher = teacher_network(input_dim, output_dim, hidden_dim=hidden_dim,
                              seed=seed if teacher_seed is None else teacher_seed)
    data_gen = torch.Generator().manual_seed(_salted(seed, "data"))
    src = _unit_rows(torch.randn(n, input_dim, generator=data_gen))
    out = teacher(src)
    if noise > 0:
        scale = out.std()
        out = out + noise * scale * torch.randn(n, output_dim, generator=data_gen)
    tgt = _unit_rows(out)
    return EmbeddingPairs(src=src, tgt=tgt, keys=[f"teacher-{i}" for i in range(n)])


def teacher_network(
    input_dim: int, output_dim: int, *, hidden_dim: int = 64, seed: int = 0
) -> Callable[[Tensor], Tensor]:
    """The fixed random teacher used by :func:`make_teacher_pairs`, as a function.

    Returns:
        ``f(x)``: ``[N, input_dim]`` unit-norm rows -> ``[N, output_dim]`` (not normalised);
        ``W2 · tanh(sqrt(input_dim) · x · W1 + b1)``. The same arguments give the same function.
    """
    gen = torch.Generator().manual_seed(_salted(seed, "teacher"))
    w1 = torch.randn(input_dim, hidden_dim, generator=gen) / math.sqrt(input_dim)
    b1 = 0.1 * torch.randn(hidden_dim, generator=gen)
    w2 = torch.randn(hidden_dim, output_dim, generator=gen) / math.sqrt(hidden_dim)
    # Unit-norm rows have entries of size ~1/sqrt(D); the sqrt(input_dim) rescale makes the
    # pre-activations ~N(0, 1), where tanh is clearly non-linear but not saturated.
    in_scale = math.sqrt(input_dim)

    def teacher(x: Tensor) -> Tensor:
        return torch.tanh(in_scale * x @ w1 + b1) @ w2

    return teacher


def _salted(seed: int, stream: str) -> int:
    """Derive a per-stream seed. Without this, ``teacher_seed == seed`` would seed the weights and
    the inputs with the same stream, making ``W1`` literally equal to (a rescaling of) the first
    source rows."""
    digest = hashlib.sha256(f"efgraph.synthetic:{stream}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _unit_rows(x: Tensor) -> Tensor:
    """Scale each row of ``x`` ``[N, D]`` to unit L2 norm."""
    return torch.nn.functional.normalize(x, dim=1)
