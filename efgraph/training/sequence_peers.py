"""Sequence peers: baselines that read a token sequence ``(x [N, T, d], mask [N, T])``.

The peers of a model that takes a sequence (e.g. the compositional table lookup's token encoding,
:mod:`efgraph.data.lookup`), each sized to a parameter count like the vector baselines and trained
by the model's own loop (:class:`~efgraph.training.loop.Trainer`, through
:class:`~efgraph.training.baselines.LearnedBaseline`: AdamW, warm-up + cosine,
best validation state, :func:`~efgraph.training.metrics.embedding_loss`):

* :class:`SequenceTransformerBaseline` -- :class:`SequenceTransformer`, a pre-norm Transformer
  over the tokens with a choice of position code (``"sinusoidal"`` absolute, ``"rotary"``
  relative, ``"none"``), attention bidirectional or causal, pooled at the first token, the last
  real token or the mean over the mask. With ``shared`` it is a single block looped ``loops``
  times (NDR-like; ``loops=0``: each row's own number of tokens, so a longer chain gets more
  steps at test time than any training chain had).
* :class:`GRUBaseline` -- :class:`GRUReader`, a GRU reading the tokens left to right, read out
  at the last real token (the looped peer: one step per token).

Shapes: ``x [N, T, d]`` float, ``mask [N, T]`` bool (True = real token; real tokens first, then
padding, which is ignored: attention never reads it, the GRU is read before it), out ``[N, D_out]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efgraph.training.baselines import _EVAL_CHUNK, LearnedBaseline

POSITIONS = ("sinusoidal", "rotary", "none")
POOLS = ("first", "last", "mean")


def check_sequence(name: str, x: Any, mask: Any, d: int | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``x`` is a finite float ``[N, T, d]`` and ``mask``
    a bool ``[N, T]`` with a real first token in every row and no real token after a padded one."""
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"{name}_x: must be a float tensor [N, T, d], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if d is not None and x.shape[2] != d:
        raise ValueError(f"{name}_x: token width {x.shape[2]} differs from the training width {d}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{name}_mask: must be a bool tensor of shape {tuple(x.shape[:2])}, got "
                         f"{(mask.dtype, tuple(mask.shape)) if isinstance(mask, Tensor) else type(mask).__name__}")
    if not bool(mask[:, 0].all()) or bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(f"{name}_mask: every row must start with its real tokens (mask True) and end with its "
                         "padding (False)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}_x: contains a non-finite value (NaN or inf)")


def _sinusoid(positions: Tensor, width: int) -> Tensor:
    """``[T] -> [T, width]``: the Transformer's sinusoidal code (Vaswani et al.), defined at any position."""
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, width, 2, dtype=torch.float32) / width)
    angle = positions.float().unsqueeze(1) * freq
    return torch.stack([angle.sin(), angle.cos()], dim=2).flatten(1)[:, :width]


def _rotate(q: Tensor, positions: Tensor) -> Tensor:
    """Rotary position code (Su et al.) on ``q [B, H, T, h]`` (``h`` even): pairs of channels turned by
    position-proportional angles, so a query-key product depends on their distance only."""
    h = q.shape[-1]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, h, 2, dtype=torch.float32, device=q.device) / h)
    angle = positions.float().unsqueeze(1) * freq  # [T, h/2]
    cos, sin = angle.cos().to(q.dtype), angle.sin().to(q.dtype)
    even, odd = q[..., 0::2], q[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class _Block(nn.Module):
    """A pre-norm Transformer layer (attention, then a GELU feed-forward of ``2 width``), whose
    attention takes an optional rotary code. ``8 width^2 + 11 width`` parameters."""

    def __init__(self, width: int, heads: int, rotary: bool) -> None:
        super().__init__()
        self.heads, self.rotary = heads, rotary
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h: Tensor, allowed: Tensor) -> Tensor:
        """``h [B, T, w]``, ``allowed [B, 1, T, T]`` bool (query row attends to key column)."""
        b, t, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if self.rotary:
            pos = torch.arange(t, device=h.device)
            q, k = _rotate(q, pos), _rotate(k, pos)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # [B, H, T, w/H]
        h = h + self.out(att.transpose(1, 2).reshape(b, t, w))
        return h + self.ff(self.norm2(h))


class SequenceTransformer(nn.Module):
    r"""A Transformer over a token sequence: ``H_0 = W_e x_t + b_e [+ \mathrm{PE}(t)]``, ``layers``
    pre-norm blocks (or one block looped), a final LayerNorm, a pooled token, a linear readout.

    Args:
        in_dim: token width ``d``; out_dim: ``D_out``; width: model width (a multiple of
            ``2 heads``); layers: blocks (with ``shared``: ignored, one block); heads.
        position: ``"sinusoidal"`` (added to the embedded tokens), ``"rotary"`` (in every
            attention) or ``"none"`` (order then only comes from a causal mask).
        pool: ``"first"`` token, ``"last"`` real token, or ``"mean"`` over the mask.
        causal: a token attends only to itself and earlier tokens.
        shared: one block applied ``loops`` times; ``loops = 0``: each row gets as many steps as it
            has real tokens (a row stops changing after its own count).

    Shapes: ``x [N, T, d]``, ``mask [N, T]`` bool -> ``[N, D_out]``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, width: int, layers: int, heads: int, position: str,
                 pool: str, causal: bool, shared: bool = False, loops: int = 0) -> None:
        super().__init__()
        self.in_dim, self.width, self.position, self.pool, self.causal = in_dim, width, position, pool, causal
        self.shared, self.loops = shared, loops
        self.embed = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(_Block(width, heads, position == "rotary") for _ in range(1 if shared else layers))
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, out_dim)

    @property
    def in_features(self) -> int:
        return self.in_dim

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = self.embed(x)  # [B, T, w]
        if self.position == "sinusoidal":
            h = h + _sinusoid(torch.arange(t, device=x.device), self.width).to(h.dtype)
        allowed = mask[:, None, None, :].expand(b, 1, t, t)
        if self.causal:
            allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if self.shared:
            counts = mask.sum(dim=1) if self.loops == 0 else torch.full((b,), self.loops, device=x.device)
            for step in range(int(counts.max())):
                h = torch.where((step < counts)[:, None, None], self.blocks[0](h, allowed), h)
        else:
            for block in self.blocks:
                h = block(h, allowed)
        h = self.norm(h)
        if self.pool == "first":
            pooled = h[:, 0]
        elif self.pool == "last":
            pooled = h[torch.arange(b, device=x.device), mask.sum(dim=1) - 1]
        else:
            weights = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * weights).sum(dim=1) / weights.sum(dim=1)
        return self.readout(pooled)


def sequence_transformer_param_count(in_dim: int, out_dim: int, width: int, blocks: int) -> int:
    """Parameters of :class:`SequenceTransformer` with ``blocks`` distinct blocks (1 when shared):
    embedding ``d w + w``, ``8 w^2 + 11 w`` per block, final LayerNorm ``2 w``, readout ``w D_out + D_out``."""
    return in_dim * width + width + blocks * (8 * width * width + 11 * width) + 2 * width + width * out_dim + out_dim


class GRUReader(nn.Module):
    """``nn.GRU(d, hidden)`` over the tokens left to right, read out (linear) at the last real token.

    Shapes: ``x [N, T, d]``, ``mask [N, T]`` bool -> ``[N, D_out]``.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.gru = nn.GRU(in_dim, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, out_dim)

    @property
    def in_features(self) -> int:
        return self.in_dim

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        states, _ = self.gru(x)  # [N, T, hidden]; padding comes after the real tokens, so is never read
        return self.readout(states[torch.arange(x.shape[0], device=x.device), mask.sum(dim=1) - 1])


def gru_param_count(in_dim: int, out_dim: int, hidden: int) -> int:
    """Parameters of :class:`GRUReader`: ``3 (h d + h^2 + 2 h)`` for the GRU, ``h D_out + D_out`` readout."""
    return 3 * (hidden * in_dim + hidden * hidden + 2 * hidden) + hidden * out_dim + out_dim


def _size_for_params(count, n_params: int, step: int, what: str) -> int:
    """The multiple of ``step`` whose ``count`` is closest to ``n_params``."""
    if count(step) > 2 * n_params:
        raise ValueError(f"n_params: {n_params} is too small for {what}; its smallest size ({step}) already has "
                         f"{count(step)} parameters")
    size = step
    while count(size + step) <= n_params:
        size += step
    return min((size, size + step), key=lambda s: abs(count(s) - n_params))


@dataclass(eq=False, kw_only=True)
class SequenceBaseline(LearnedBaseline):
    """A :class:`LearnedBaseline` whose sources are ``(x [N, T, d], mask [N, T])`` tuples: ``fit((x, mask),
    tgt, (val_x, val_mask), val_tgt)``, ``predict((x, mask))``. ``T`` may differ between calls
    (longer test sequences). ``residual`` is not defined for a sequence source."""

    def __post_init__(self) -> None:
        if self.residual:
            raise ValueError(f"residual: not defined for the sequence peer {self.kind!r} (its input is a sequence)")
        super().__post_init__()

    def _check_inputs(self, train_src: Any, train_tgt: Tensor, val_src: Any, val_tgt: Tensor | None) -> tuple[bool, int]:
        for name, src, tgt in (("train", train_src, train_tgt), ("val", val_src, val_tgt)):
            if name == "val" and (src is None) != (tgt is None):
                raise ValueError("val_src, val_tgt: give both or neither")
            if src is None:
                continue
            if not (isinstance(src, tuple) and len(src) == 2):
                raise ValueError(f"{name}_src: a sequence peer takes (x [N, T, d], mask [N, T]), got "
                                 f"{type(src).__name__}")
            check_sequence(name, *src, d=None if name == "train" else train_src[0].shape[2])
            if not isinstance(tgt, Tensor) or tgt.dim() != 2 or tgt.shape[0] != src[0].shape[0]:
                raise ValueError(f"{name}_tgt: must be [N, D_out] with N = {src[0].shape[0]} rows, got "
                                 f"{tuple(tgt.shape) if isinstance(tgt, Tensor) else type(tgt).__name__}")
            if name == "val" and tgt.shape[1] != train_tgt.shape[1]:
                raise ValueError(f"val_tgt: width {tgt.shape[1]} differs from the training width {train_tgt.shape[1]}")
        return val_src is not None, train_src[0].shape[2]

    @torch.no_grad()
    def predict(self, src: tuple[Tensor, Tensor]) -> Tensor:  # type: ignore[override]
        """``(x [N, T, d], mask [N, T])`` -> ``[N, D_out]``, in blocks of rows."""
        if self.model is None:
            raise RuntimeError(f"{self.name} baseline: call fit() before predict()")
        if not (isinstance(src, tuple) and len(src) == 2):
            raise ValueError(f"src: a sequence peer takes (x [N, T, d], mask [N, T]), got {type(src).__name__}")
        x, mask = src
        check_sequence("src", x, mask, d=self.model.in_features)
        self.model.eval()
        param = next(self.model.parameters())
        outs = [self.model(x[i: i + _EVAL_CHUNK].to(param.dtype), mask[i: i + _EVAL_CHUNK])
                for i in range(0, x.shape[0], _EVAL_CHUNK)]
        return torch.cat(outs).to(x.dtype)


@dataclass(eq=False, kw_only=True)
class SequenceTransformerBaseline(SequenceBaseline):
    """:class:`SequenceTransformer` sized to ``target_params`` (its ``width``, a multiple of ``2 heads``)
    or of a given ``width``. Named ``transformer-<position>[-causal][-looped]``."""

    kind: ClassVar[str] = "seq-transformer"
    width: int | None = None
    layers: int = 3
    heads: int = 4
    position: str = "rotary"
    pool: str = "first"
    causal: bool = False
    shared: bool = False
    loops: int = 0

    def __post_init__(self) -> None:
        if (self.target_params is None) == (self.width is None):
            raise ValueError("target_params, width: give exactly one")
        if self.position not in POSITIONS:
            raise ValueError(f"position: must be one of {POSITIONS}, got {self.position!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool: must be one of {POOLS}, got {self.pool!r}")
        for name, low in (("layers", 1), ("heads", 1), ("loops", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: must be >= {low}, got {getattr(self, name)}")
        if self.width is not None and (self.width < 1 or self.width % (2 * self.heads)):
            raise ValueError(f"width: must be a positive multiple of 2 heads ({2 * self.heads}), got {self.width}")
        super().__post_init__()
        self.name = ("transformer-" + self.position + ("-causal" if self.causal else "") + f"-{self.pool}"
                     + ("-looped" if self.shared else ""))

    def build(self, in_dim: int, out_dim: int) -> nn.Module:
        blocks = 1 if self.shared else self.layers
        width = self.width or _size_for_params(lambda w: sequence_transformer_param_count(in_dim, out_dim, w, blocks),
                                               self.target_params, 2 * self.heads, "a sequence Transformer")
        return SequenceTransformer(in_dim, out_dim, width=width, layers=self.layers, heads=self.heads,
                                   position=self.position, pool=self.pool, causal=self.causal, shared=self.shared,
                                   loops=self.loops)

    def shape(self) -> dict[str, int]:
        return {"width": self.model.width, "layers": 1 if self.shared else self.layers, "heads": self.heads,
                "loops": self.loops}


@dataclass(eq=False, kw_only=True)
class GRUBaseline(SequenceBaseline):
    """:class:`GRUReader` sized to ``target_params`` (its ``hidden`` width) or of a given ``hidden``."""

    kind: ClassVar[str] = "gru"
    hidden: int | None = None

    def __post_init__(self) -> None:
        if (self.target_params is None) == (self.hidden is None):
            raise ValueError("target_params, hidden: give exactly one")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"hidden: must be >= 1, got {self.hidden}")
        super().__post_init__()

    def build(self, in_dim: int, out_dim: int) -> nn.Module:
        hidden = self.hidden or _size_for_params(lambda h: gru_param_count(in_dim, out_dim, h), self.target_params,
                                                 1, "a GRU")
        return GRUReader(in_dim, out_dim, hidden)

    def shape(self) -> dict[str, int]:
        return {"hidden": self.model.gru.hidden_size}
