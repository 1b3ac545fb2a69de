"""Baselines that a model is compared to on the same train / val / test split.

A result for the energy-flow model only means something next to what simpler maps reach on the
same data:

* :class:`IdentityBaseline` -- predict the source embedding itself (only when widths match);
* :class:`RidgeBaseline` -- the best *linear* map (with bias), in closed form;
* :class:`ResidualRidgeBaseline` -- ``x + W x + b``, ridge on the residual ``tgt - src`` (only
  when widths match): the linear counterpart of a residual model, which starts at the identity;
* :class:`MLPBaseline` -- a one-hidden-layer MLP with (about) the model's parameter count, trained
  on the model's own loss (:func:`~efgraph.training.metrics.embedding_loss`);
* :class:`TransformerBaseline` -- :class:`TokenTransformer`, a small pre-norm Transformer over
  tokens it learns to cut from the input vector, with (about) the model's parameter count: the
  peer a user with routing-shaped data would pick instead. The learned baselines train in the
  model's own loop (:class:`~efgraph.training.loop.Trainer`, through :class:`LearnedBaseline`):
  its optimizer, schedule, batches, steps, loss and best-state selection.

All share one interface: ``fit(train_src, train_tgt, val_src=None, val_tgt=None)``,
``predict(src)``, ``name`` and ``num_parameters``. Shapes: sources ``[N, D_in]``, targets
``[N, D_out]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from efgraph.config import LEARNED_BASELINES, EnergyConfig, TrainingConfig
from efgraph.data.pairs import check_embedding_pair
from efgraph.training.loop import Trainer
from efgraph.training.metrics import embedding_loss, evaluate_predictions

if TYPE_CHECKING:
    from efgraph.core.flow_processor import FlowProcessor

Split = tuple[Tensor, Tensor]
"""A ``(src [N, D_in], tgt [N, D_out])`` pair."""

# Absolute ridge penalties tried on the validation set. For N ~ 10k unit-norm 768-d embeddings the
# Gram matrix diagonal is ~10, so the useful range sits inside this grid.
DEFAULT_ALPHAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0, 1e4)

# Rows per block when scoring a validation set, so the check never holds all activations at once.
_EVAL_CHUNK = 4096


class Baseline(Protocol):
    """What :func:`run_baselines` (and a caller) needs from a baseline."""

    name: str

    @property
    def num_parameters(self) -> int: ...

    def fit(self, train_src: Tensor, train_tgt: Tensor, val_src: Tensor | None = None,
            val_tgt: Tensor | None = None) -> "Baseline": ...

    def predict(self, src: Tensor) -> Tensor: ...


def _check_split(src: Tensor, tgt: Tensor, what: str) -> None:
    """Raise ``ValueError`` unless ``src`` [N, D_in] and ``tgt`` [N, D_out] are a matching, finite
    pair (:func:`efgraph.data.pairs.check_embedding_pair`)."""
    check_embedding_pair(src, tgt, (f"{what}_src", f"{what}_tgt"))


def _check_val(val_src: Tensor | None, val_tgt: Tensor | None, train_src: Tensor, train_tgt: Tensor) -> bool:
    """Validate an optional validation pair; return whether one was given."""
    if (val_src is None) != (val_tgt is None):
        raise ValueError("val_src, val_tgt: give both or neither")
    if val_src is None:
        return False
    _check_split(val_src, val_tgt, "val")
    if val_src.shape[1] != train_src.shape[1] or val_tgt.shape[1] != train_tgt.shape[1]:
        raise ValueError(f"val_src, val_tgt: widths {val_src.shape[1]} -> {val_tgt.shape[1]} differ from training "
                         f"widths {train_src.shape[1]} -> {train_tgt.shape[1]}")
    return True


def _check_equal_widths(name: str, src: Tensor, tgt: Tensor) -> None:
    if src.shape[1] != tgt.shape[1]:
        raise ValueError(f"{name} baseline needs equal source and target widths, got source width "
                         f"{src.shape[1]} and target width {tgt.shape[1]}")


@torch.no_grad()
def _chunked_loss(predict: Callable[[Tensor], Tensor], src: Tensor, tgt: Tensor, mse_weight: float,
                  cosine_weight: float) -> float:
    """``embedding_loss`` over a whole split, computed block by block.

    Both terms of the loss are means over rows (MSE: over rows of equal width), so a row-weighted
    average of per-block losses equals the loss of the whole split.
    """
    total = 0.0
    n = tgt.shape[0]
    for start in range(0, n, _EVAL_CHUNK):
        stop = min(start + _EVAL_CHUNK, n)
        loss = embedding_loss(predict(src[start:stop]), tgt[start:stop], mse_weight, cosine_weight)
        total += loss.item() * (stop - start)
    return total / n


# ------------------------------------------------------------------------------------------------
class IdentityBaseline:
    """Predict ``tgt = src``: the score of doing nothing. Only defined when ``D_in == D_out``."""

    name = "identity"

    def __init__(self) -> None:
        self._dim: int | None = None

    @property
    def num_parameters(self) -> int:
        return 0

    def fit(self, train_src: Tensor, train_tgt: Tensor, val_src: Tensor | None = None,
            val_tgt: Tensor | None = None) -> "IdentityBaseline":
        _check_split(train_src, train_tgt, "train")
        _check_equal_widths(self.name, train_src, train_tgt)
        _check_val(val_src, val_tgt, train_src, train_tgt)
        self._dim = train_src.shape[1]
        return self

    def predict(self, src: Tensor) -> Tensor:
        """``[N, D]`` -> a copy of ``src`` (a copy, so callers may modify the prediction)."""
        if self._dim is None:
            raise RuntimeError("identity baseline: call fit() before predict()")
        if src.dim() != 2 or src.shape[1] != self._dim:
            raise ValueError(f"src: expected shape [N, {self._dim}], got {tuple(src.shape)}")
        return src.clone()


# ------------------------------------------------------------------------------------------------
class RidgeBaseline:
    """Linear map with bias, ``tgt ~ src @ W + b``, fitted in closed form by ridge regression.

    The bias is not penalized (the data are centered before solving), so ``alpha`` only shrinks
    ``W``. The solve runs in float64 through one eigendecomposition of the ``[D_in, D_in]`` Gram
    matrix, which makes every ``alpha`` of the grid cost one ``[D_in, D_out]`` product.

    Args:
        alpha: ridge penalty (absolute, > 0) used when ``fit`` gets no validation set.
        alphas: grid searched when a validation set is given; the alpha with the lowest
            validation :func:`embedding_loss` wins. ``None`` (or empty) always uses ``alpha``.
        mse_weight, cosine_weight: weights of the loss that selects alpha (use the model's).

    After ``fit``: ``alpha_`` (the alpha used) and ``val_losses_`` (alpha -> validation loss,
    empty without a validation set).
    """

    name = "ridge"

    def __init__(self, alpha: float = 1.0, alphas: Sequence[float] | None = DEFAULT_ALPHAS, *,
                 mse_weight: float = 1.0, cosine_weight: float = 1.0) -> None:
        grid = list(alphas) if alphas else []
        for a in [alpha, *grid]:
            # alpha = 0 makes the system singular whenever N < D_in or features are collinear.
            if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0):
                raise ValueError(f"alpha: ridge penalties must be finite and > 0, got {a!r}")
        self.alpha = float(alpha)
        self.alphas = [float(a) for a in grid]
        self.mse_weight = mse_weight
        self.cosine_weight = cosine_weight
        self.alpha_: float | None = None
        self.val_losses_: dict[float, float] = {}
        self.weight: Tensor | None = None  # [D_in, D_out], float64
        self.bias: Tensor | None = None  # [D_out], float64

    @property
    def num_parameters(self) -> int:
        if self.weight is None:
            raise RuntimeError("ridge baseline: call fit() before num_parameters")
        return self.weight.numel() + self.bias.numel()

    def fit(self, train_src: Tensor, train_tgt: Tensor, val_src: Tensor | None = None,
            val_tgt: Tensor | None = None) -> "RidgeBaseline":
        _check_split(train_src, train_tgt, "train")
        has_val = _check_val(val_src, val_tgt, train_src, train_tgt)

        # float64: the Gram matrix of 10k embeddings is badly conditioned for small alpha.
        x = train_src.double()
        y = self._regression_target(train_src, train_tgt).double()
        x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)  # [D_in], [D_out]
        xc, yc = x - x_mean, y - y_mean
        # Gram = V diag(s) V^T, so (Gram + alpha I)^-1 Xc^T Yc = V diag(1 / (s + alpha)) V^T Xc^T Yc.
        evals, evecs = torch.linalg.eigh(xc.T @ xc)  # [D_in], [D_in, D_in]
        evals = evals.clamp_min(0.0)  # round-off can leave tiny negative eigenvalues
        projected = evecs.T @ (xc.T @ yc)  # [D_in, D_out]

        def solve(alpha: float) -> tuple[Tensor, Tensor]:
            weight = evecs @ (projected / (evals + alpha).unsqueeze(1))
            return weight, y_mean - x_mean @ weight

        self.val_losses_ = {}
        if has_val and self.alphas:
            for alpha in self.alphas:
                self.weight, self.bias = solve(alpha)
                self.val_losses_[alpha] = _chunked_loss(self.predict, val_src, val_tgt, self.mse_weight,
                                                        self.cosine_weight)
            # min over insertion order: on an exact tie the earlier (smaller, by default) alpha wins.
            self.alpha_ = min(self.val_losses_, key=self.val_losses_.__getitem__)
        else:
            self.alpha_ = self.alpha
        self.weight, self.bias = solve(self.alpha_)
        return self

    def _regression_target(self, train_src: Tensor, train_tgt: Tensor) -> Tensor:
        """What the linear map is fitted to: ``[N, D_out]``, here the target itself."""
        return train_tgt

    def _linear(self, src: Tensor) -> Tensor:
        """``src @ W + b`` in float64: ``[N, D_in]`` -> ``[N, D_out]``."""
        if self.weight is None:
            raise RuntimeError(f"{self.name} baseline: call fit() before predict()")
        if src.dim() != 2 or src.shape[1] != self.weight.shape[0]:
            raise ValueError(f"src: expected shape [N, {self.weight.shape[0]}], got {tuple(src.shape)}")
        return src.double() @ self.weight + self.bias

    def predict(self, src: Tensor) -> Tensor:
        """``[N, D_in]`` -> ``[N, D_out]`` in the dtype of ``src`` (computed in float64)."""
        return self._linear(src).to(src.dtype)


class ResidualRidgeBaseline(RidgeBaseline):
    """``tgt ~ src + src @ W + b``: ridge regression on the residual ``tgt - src``.

    The baseline for a residual model (``y = x + f(x)``): at large ``alpha`` it shrinks to
    "identity plus the mean residual" instead of "the mean target", so it is never worse than a
    near-identity map for lack of the skip connection. ``alpha`` is chosen exactly as in
    :class:`RidgeBaseline` -- the lowest validation :func:`embedding_loss` of the *full*
    prediction ``src + src @ W + b`` against the target -- so the selection sees the same numbers
    the test does. Needs ``D_in == D_out``.
    """

    name = "residual-ridge"

    def _regression_target(self, train_src: Tensor, train_tgt: Tensor) -> Tensor:
        _check_equal_widths(self.name, train_src, train_tgt)
        return train_tgt.double() - train_src.double()

    def predict(self, src: Tensor) -> Tensor:
        """``[N, D]`` -> ``src + src @ W + b`` in the dtype of ``src`` (computed in float64)."""
        return (src.double() + self._linear(src)).to(src.dtype)


def start_linear_skip_at_ridge(model: FlowProcessor, config: EnergyConfig, train_src: Tensor, train_tgt: Tensor,
                               val_src: Tensor, val_tgt: Tensor) -> RidgeBaseline:
    """``linear_skip_init: ridge``: set the model's linear skip ``W`` and its readout bias to the
    ridge fit of the training pairs (:class:`ResidualRidgeBaseline` with ``residual: true``, else
    :class:`RidgeBaseline`; the penalty chosen on validation with the model's loss weights), so
    that ``y = [x +] W x + b`` is that ridge's prediction and the lattice, behind its output gate,
    adds to it (``config``: the run's, for the loss weights). Returns the fitted ridge."""
    if model.linear_skip is None:
        raise ValueError("linear_skip_init: 'ridge' needs linear_skip: true")
    kind = ResidualRidgeBaseline if config.residual else RidgeBaseline
    ridge = kind(mse_weight=config.mse_weight, cosine_weight=config.cosine_weight).fit(train_src, train_tgt,
                                                                                       val_src, val_tgt)
    with torch.no_grad():
        model.linear_skip.weight.copy_(ridge.weight.t())
        model.output_face.readout_bias.copy_(ridge.bias)
    return ridge


# ------------------------------------------------------------------------------------------------
def mlp_param_count(in_dim: int, out_dim: int, hidden: int) -> int:
    """Parameters of ``Linear(in, hidden) -> GELU -> Linear(hidden, out)``, biases included."""
    return hidden * (in_dim + 1) + out_dim * (hidden + 1)


def mlp_hidden_for_params(in_dim: int, out_dim: int, n_params: int) -> int:
    """Hidden width whose MLP (see :func:`mlp_param_count`) has the parameter count closest to ``n_params``.

    The count is ``hidden * (in + out + 1) + out``, so rounding gives a width whose count is within
    half a hidden unit's worth (``(in + out + 1) / 2``) of ``n_params``.

    Raises:
        ValueError: if a dimension is < 1, or if ``n_params`` is so small that the closest width
            is 0 (an MLP with a hidden layer cannot match it).
    """
    for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    per_unit = in_dim + out_dim + 1
    hidden = round((n_params - out_dim) / per_unit)
    if hidden < 1:
        raise ValueError(f"n_params: {n_params} is too small for an MLP {in_dim} -> hidden -> {out_dim}; "
                         f"one hidden unit already needs {mlp_param_count(in_dim, out_dim, 1)} parameters")
    return hidden


class _MLP(nn.Module):
    """``Linear -> GELU -> Linear``, plus the input when ``residual`` (needs D_in == D_out)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    @property
    def in_features(self) -> int:
        return self.net[0].in_features

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        return x + y if self.residual else y


def transformer_param_count(in_dim: int, out_dim: int, tokens: int, width: int, layers: int) -> int:
    """Parameters of :class:`TokenTransformer` (feed-forward ``2 * width``, biases and norms included).

    Tokenizer ``in * T * d + T * d``; per encoder layer ``8 d^2 + 11 d`` (attention ``4 d^2 + 4 d``,
    feed-forward ``4 d^2 + 3 d``, two LayerNorms ``4 d``); final LayerNorm ``2 d``; decoder
    ``T * d * out + out``.
    """
    return (tokens * width * (in_dim + 1) + layers * (8 * width * width + 11 * width) + 2 * width
            + tokens * width * out_dim + out_dim)


def transformer_width_for_params(in_dim: int, out_dim: int, n_params: int, *, tokens: int, layers: int,
                                 heads: int) -> int:
    """The multiple of ``heads`` whose :func:`transformer_param_count` is closest to ``n_params``.

    Raises:
        ValueError: if even ``width = heads`` has more than twice ``n_params`` parameters.
    """
    count = lambda w: transformer_param_count(in_dim, out_dim, tokens, w, layers)  # noqa: E731
    if count(heads) > 2 * n_params:
        raise ValueError(f"n_params: {n_params} is too small for a Transformer baseline with {tokens} tokens and "
                         f"{layers} layers; its narrowest width ({heads}) already has {count(heads)} parameters")
    width = heads
    while count(width + heads) <= n_params:
        width += heads
    return min((width, width + heads), key=lambda w: abs(count(w) - n_params))


class TokenTransformer(nn.Module):
    r"""A Transformer over tokens that it learns to cut from the input vector.

    .. math::
        H_0 = \mathrm{reshape}_{T \times d}(W_t x + b_t), \quad H_{l+1} = \mathrm{EncoderLayer}_l(H_l),
        \quad y = W_o \,\mathrm{vec}(\mathrm{LN}(H_L)) + b_o \;[+\, x]

    Every token has its own rows of ``W_t``, so token identity needs no position code; the encoder
    layers are pre-norm (``norm_first``), GELU, feed-forward ``2 d``, no dropout (the best
    validation state is what guards against over-fitting, as for every baseline). A vector with no
    token structure (a sentence embedding) works too: the tokenizer learns one.

    Args:
        in_dim, out_dim: ``D_in``, ``D_out``.
        tokens: ``T``; width: ``d`` (a multiple of ``heads``); layers: encoder layers; heads:
            attention heads.
        residual: add ``x`` to the output (needs ``D_in == D_out``).

    Shapes: ``[N, D_in] -> [N, D_out]``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, tokens: int, width: int, layers: int, heads: int,
                 residual: bool) -> None:
        super().__init__()
        self.tokens, self.width, self.residual = tokens, width, residual
        self.tokenize = nn.Linear(in_dim, tokens * width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.decode = nn.Linear(tokens * width, out_dim)

    @property
    def in_features(self) -> int:
        return self.tokenize.in_features

    def forward(self, x: Tensor) -> Tensor:
        h = self.tokenize(x).view(x.shape[0], self.tokens, self.width)  # [N, T, d]
        y = self.decode(self.encoder(h).flatten(1))  # [N, D_out]
        return x + y if self.residual else y


@dataclass(eq=False, kw_only=True)
class LearnedBaseline:
    """A baseline network trained by the model's own loop (:class:`~efgraph.training.loop.Trainer`:
    AdamW, linear warm-up and cosine decay, clipping, :func:`embedding_loss`, the best validation
    state); subclasses only say which network (:meth:`build`).

    With ``residual`` it predicts ``x + f(x)``, the baseline to compare a residual model with.
    Gradients are clipped at ``grad_clip`` (``None``: not clipped). The network has (about)
    ``target_params`` parameters, so a baseline gets the model's budget. Training runs exactly
    ``steps`` optimizer steps on the loop's batches (epochs of a permutation seeded by ``seed``,
    as the model's). With a validation set the loss on it is measured every ``eval_every`` steps
    and after the last step, and the weights with the lowest validation loss are kept; without
    one, the final weights are. A non-finite loss or gradient stops the fit with
    ``FloatingPointError`` naming the step.

    Determinism: initialization runs under a forked global RNG seeded with ``seed`` (so fitting
    neither depends on nor disturbs the caller's RNG stream) and batches come from a private
    ``torch.Generator``; the same seed and data give the same weights on the same device.

    After ``fit``: ``model``, ``best_step_``, ``best_val_loss_`` (``None`` without validation),
    ``history_`` (list of ``(step, val_loss)``) and ``train_seconds_`` (the fit's wall time).
    """

    kind: ClassVar[str] = "learned"  # the name without the residual- prefix
    target_params: int | None = None
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    weight_decay_on: str = "matrices"  # the model's recipe (efgraph.training.optim)
    seed: int = 0
    mse_weight: float = 1.0
    cosine_weight: float = 1.0
    eval_every: int = 100
    residual: bool = False
    warmup_steps: int = 0
    grad_clip: float | None = None
    progress: bool = False  # a progress bar: a baseline trains as many steps as the model

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if not self.lr > 0:  # under its own name; batch_size, eval_every, ... are the loop's to check
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        # the loop's settings (validated here, before any fit); a baseline logs at its evaluations
        self.training = TrainingConfig(
            batch_size=self.batch_size, learning_rate=self.lr, weight_decay=self.weight_decay,
            weight_decay_on=self.weight_decay_on, warmup_steps=self.warmup_steps, epochs=1,
            grad_clip=math.inf if self.grad_clip is None else self.grad_clip, mse_weight=self.mse_weight,
            cosine_weight=self.cosine_weight, eval_every=self.eval_every, log_every=self.eval_every, seed=self.seed)
        self.name = f"residual-{self.kind}" if self.residual else self.kind
        self.model: nn.Module | None = None
        self.best_step_: int | None = None
        self.best_val_loss_: float | None = None
        self.history_: list[tuple[int, float]] = []
        self.train_seconds_: float | None = None

    def build(self, in_dim: int, out_dim: int) -> nn.Module:
        """The untrained network ``[N, in_dim] -> [N, out_dim]`` (with an ``in_features`` property)."""
        raise NotImplementedError

    def shape(self) -> dict[str, int]:
        """The sizes :meth:`build` chose (after ``fit``), for the run's records."""
        return {}

    def _check_inputs(self, train_src: Any, train_tgt: Tensor, val_src: Any, val_tgt: Tensor | None) -> tuple[bool, int]:
        """Check the fit's arguments; ``(whether a validation pair was given, the input width)``.
        Here sources are ``[N, D_in]`` tensors (a sequence peer overrides this)."""
        _check_split(train_src, train_tgt, "train")
        return _check_val(val_src, val_tgt, train_src, train_tgt), train_src.shape[1]

    @property
    def num_parameters(self) -> int:
        if self.model is None:
            raise RuntimeError(f"{self.name} baseline: call fit() before num_parameters")
        return sum(p.numel() for p in self.model.parameters())

    def fit(self, train_src: Tensor, train_tgt: Tensor, val_src: Tensor | None = None,
            val_tgt: Tensor | None = None) -> "LearnedBaseline":
        began = time.perf_counter()
        has_val, in_dim = self._check_inputs(train_src, train_tgt, val_src, val_tgt)
        out_dim = train_tgt.shape[1]
        if self.residual and in_dim != out_dim:
            raise ValueError(f"residual: needs equal widths, got {in_dim} and {out_dim}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self.build(in_dim, out_dim)
        self.model = model = model.to(dtype=train_tgt.dtype)
        trainer = Trainer(model, self.training, device=train_tgt.device, progress=self.progress,
                          eval_batch_size=_EVAL_CHUNK, name=f"baseline {self.name}")
        result = trainer.train(train_src, train_tgt, total_steps=self.steps, val_inputs=val_src if has_val else None,
                               val_targets=val_tgt if has_val else None)
        self.history_ = [(int(e["step"]), float(e["loss"])) for e in result.evaluations]
        if trainer.restore_best():
            self.best_step_, self.best_val_loss_ = result.best_step, result.best_val_loss
        else:
            self.best_step_, self.best_val_loss_ = self.steps, None
        model.eval()
        self.train_seconds_ = time.perf_counter() - began
        return self

    @torch.no_grad()
    def predict(self, src: Tensor) -> Tensor:
        """``[N, D_in]`` -> ``[N, D_out]``, in blocks of rows to bound activation memory."""
        if self.model is None:
            raise RuntimeError(f"{self.name} baseline: call fit() before predict()")
        in_dim = self.model.in_features
        if src.dim() != 2 or src.shape[1] != in_dim:
            raise ValueError(f"src: expected shape [N, {in_dim}], got {tuple(src.shape)}")
        self.model.eval()
        param = next(self.model.parameters())
        outs = [self.model(src[i : i + _EVAL_CHUNK].to(param.dtype)) for i in range(0, src.shape[0], _EVAL_CHUNK)]
        return torch.cat(outs).to(src.dtype)


@dataclass(eq=False, kw_only=True)
class MLPBaseline(LearnedBaseline):
    """``Linear(D_in, H) -> GELU -> Linear(H, D_out)``, trained by :class:`LearnedBaseline`'s loop.

    ``H`` is either given (``hidden_dim``) or derived from ``target_params`` with
    :func:`mlp_hidden_for_params`. The other arguments are :class:`LearnedBaseline`'s.
    """

    kind: ClassVar[str] = "mlp"
    hidden_dim: int | None = None

    def __post_init__(self) -> None:
        if (self.target_params is None) == (self.hidden_dim is None):
            raise ValueError("target_params, hidden_dim: give exactly one")
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"hidden_dim: must be >= 1, got {self.hidden_dim}")
        super().__post_init__()

    def build(self, in_dim: int, out_dim: int) -> nn.Module:
        hidden = self.hidden_dim or mlp_hidden_for_params(in_dim, out_dim, self.target_params)
        return _MLP(in_dim, hidden, out_dim, self.residual)

    def shape(self) -> dict[str, int]:
        return {"hidden_dim": self.model.net[0].out_features}


@dataclass(eq=False, kw_only=True)
class TransformerBaseline(LearnedBaseline):
    """:class:`TokenTransformer`, trained by :class:`LearnedBaseline`'s loop: the peer a user with
    routing-shaped data would pick instead of the lattice.

    ``width`` is either given or, with ``target_params``, the multiple of ``heads`` whose count is
    closest to it (:func:`transformer_width_for_params`); ``tokens``, ``layers`` and ``heads`` are
    fixed. The other arguments are :class:`LearnedBaseline`'s.
    """

    kind: ClassVar[str] = "transformer"
    width: int | None = None
    tokens: int = 8
    layers: int = 2
    heads: int = 4

    def __post_init__(self) -> None:
        if (self.target_params is None) == (self.width is None):
            raise ValueError("target_params, width: give exactly one")
        for name in ("tokens", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"transformer_{name}: must be >= 1, got {getattr(self, name)}")
        if self.width is not None and (self.width < 1 or self.width % self.heads):
            raise ValueError(f"transformer_width: must be a positive multiple of transformer_heads ({self.heads}), "
                             f"got {self.width}")
        super().__post_init__()

    def build(self, in_dim: int, out_dim: int) -> nn.Module:
        width = self.width or transformer_width_for_params(in_dim, out_dim, self.target_params, tokens=self.tokens,
                                                           layers=self.layers, heads=self.heads)
        return TokenTransformer(in_dim, out_dim, tokens=self.tokens, width=width, layers=self.layers,
                                heads=self.heads, residual=self.residual)

    def shape(self) -> dict[str, int]:
        return {"tokens": self.tokens, "width": self.model.width, "layers": self.layers, "heads": self.heads}


# ------------------------------------------------------------------------------------------------
def fit_baselines(train: Split, val: Split | None, *, target_params: int, mse_weight: float, cosine_weight: float,
                  residual: bool = False, learned: Sequence[str] = LEARNED_BASELINES, transformer_tokens: int = 8,
                  transformer_layers: int = 2, transformer_heads: int = 4, transformer_width: int = 0,
                  **training: Any) -> list[Baseline]:
    """Fit every applicable baseline on ``train``, selecting on ``val``.

    Identity is included only when source and target widths match. Ridge selects its alpha on
    ``val``; with ``residual`` the residual ridge (``x + W x + b``) is fitted beside it and the
    learned baselines predict ``x + f(x)``. ``val`` may be ``None`` (ridge then uses alpha = 1,
    the learned ones their final weights), but then nothing is selected on held-out data.

    Args:
        target_params: the parameter count of each learned baseline (pass the model's).
        learned: which learned baselines to train, from ``LEARNED_BASELINES`` (``"mlp"``,
            ``"transformer"``).
        transformer_*: the Transformer's tokens, layers, heads and width (0: sized to
            ``target_params``).
        training: the other arguments of :class:`LearnedBaseline` (``steps``, ``batch_size``,
            ``lr``, ``seed``, schedule, clipping, ...), the same for every learned baseline.

    Returns:
        The fitted baselines in the order identity (widths match), ridge, residual-ridge (with
        ``residual``), then the learned ones in the order of ``learned`` (``mlp`` /
        ``residual-mlp``, ``transformer`` / ``residual-transformer``).
    """
    train_src, train_tgt = train
    _check_split(train_src, train_tgt, "train")
    val_src, val_tgt = val if val is not None else (None, None)
    unknown = [m for m in learned if m not in LEARNED_BASELINES]
    if unknown:
        raise ValueError(f"baseline_models: {unknown} are not learned baselines; choose from {LEARNED_BASELINES}")

    baselines: list[Baseline] = []
    if train_src.shape[1] == train_tgt.shape[1]:
        baselines.append(IdentityBaseline())
    baselines.append(RidgeBaseline(mse_weight=mse_weight, cosine_weight=cosine_weight))
    if residual:
        baselines.append(ResidualRidgeBaseline(mse_weight=mse_weight, cosine_weight=cosine_weight))
    training.update(mse_weight=mse_weight, cosine_weight=cosine_weight, residual=residual)
    for kind in learned:
        if kind == "mlp":
            baselines.append(MLPBaseline(target_params=target_params, **training))
        else:
            baselines.append(TransformerBaseline(
                target_params=None if transformer_width else target_params, width=transformer_width or None,
                tokens=transformer_tokens, layers=transformer_layers, heads=transformer_heads, **training))
    for baseline in baselines:  # each fit timed alike (a learned one also times itself), for time to quality
        began = time.perf_counter()
        baseline.fit(train_src, train_tgt, val_src, val_tgt)
        baseline.train_seconds_ = time.perf_counter() - began
    return baselines


def run_baselines(train: Split, val: Split | None, test: Split, **options: Any) -> dict[str, dict[str, float]]:
    """:func:`fit_baselines` (``options`` are its arguments), each scored on ``test``:
    ``{name: evaluate_predictions metrics}`` in the order of :func:`fit_baselines`."""
    test_src, test_tgt = test
    _check_split(test_src, test_tgt, "test")
    baselines = fit_baselines(train, val, **options)
    return {b.name: evaluate_predictions(b.predict(test_src), test_tgt) for b in baselines}


def format_results_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table ``| model | cosine | MSE | R@1 |``, one row per entry of ``results`` in order,
    with an ``answer acc.`` column when every entry has ``answer_accuracy`` (composition, lookup)
    and a ``train s`` column when every entry has ``train_seconds``.

    Extra metric keys are ignored; a missing ``cosine``, ``mse`` or ``r_at_1`` raises ``ValueError``
    naming the model, so a half-filled row never reads as a real number.
    """
    answers = bool(results) and all("answer_accuracy" in m for m in results.values())
    seconds = bool(results) and all("train_seconds" in m for m in results.values())
    lines = ["| model | cosine | MSE | R@1 |" + (" answer acc. |" if answers else "") + (" train s |" if seconds else ""),
             "|---|---:|---:|---:|" + ("---:|" if answers else "") + ("---:|" if seconds else "")]
    for model, metrics in results.items():
        missing = [k for k in ("cosine", "mse", "r_at_1") if k not in metrics]
        if missing:
            raise ValueError(f"results[{model!r}]: missing metrics {missing}")
        label = str(model).replace("|", "\\|")  # a '|' in a name would split the row
        # MSE of unit-scale embeddings is ~1e-3: significant digits, not fixed decimals.
        lines.append(f"| {label} | {metrics['cosine']:.4f} | {metrics['mse']:.4g} | {metrics['r_at_1']:.4f} |"
                     + (f" {metrics['answer_accuracy']:.4f} |" if answers else "")
                     + (f" {metrics['train_seconds']:.0f} |" if seconds else ""))
    return "\n".join(lines) + "\n"
