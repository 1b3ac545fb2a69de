"""Loss and evaluation metrics for embedding-to-embedding models.

Both the energy-flow model and every baseline (:mod:`efgraph.training.baselines`) are trained with
:func:`embedding_loss` and scored with :func:`evaluate_predictions`, so their numbers are comparable.

Shapes: ``B`` / ``N`` rows (samples), ``D`` embedding width.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from efgraph.data._atomic import atomic_write
from efgraph.data.pairs import check_embedding_pair

# Norm floor for cosine similarity: a zero row gets cosine 0 instead of NaN.
_COS_EPS = 1e-8

# Upper bound on the number of similarity scores held at once by the R@1 computation
# (2**22 float32 = 16 MiB). With N = 10_000 targets that is chunks of 419 prediction rows,
# instead of one 10_000 x 10_000 matrix (400 MB).
_MAX_SIM_ELEMENTS = 1 << 22


def _check_pair(pred: Tensor, target: Tensor, finite: bool = False) -> None:
    """Raise ``ValueError`` naming the argument whose type, rank, shape, device (or, with
    ``finite``, values) is wrong (:func:`efgraph.data.pairs.check_embedding_pair`)."""
    check_embedding_pair(pred, target, ("pred", "target"), same_width=True, finite=finite)


def embedding_loss(pred: Tensor, target: Tensor, mse_weight: float, cosine_weight: float) -> Tensor:
    """``mse_weight * MSE + cosine_weight * (1 - mean cosine similarity)``.

    Args:
        pred: ``[B, D]`` predicted embeddings.
        target: ``[B, D]`` target embeddings.
        mse_weight: weight of the mean squared error (mean over all ``B * D`` entries).
        cosine_weight: weight of the cosine term (mean over the ``B`` rows).

    Returns:
        A scalar tensor (``[]``), differentiable with respect to ``pred``.
    """
    _check_pair(pred, target)
    mse = F.mse_loss(pred, target)
    cos = F.cosine_similarity(pred, target, dim=-1, eps=_COS_EPS).mean()
    return mse_weight * mse + cosine_weight * (1.0 - cos)


@torch.no_grad()
def evaluate_predictions(pred: Tensor, target: Tensor, chunk_size: int | None = None) -> dict[str, float]:
    """Mean cosine similarity, MSE and retrieval recall@1 of ``pred`` against ``target``.

    R@1 treats the ``N`` target rows as a retrieval gallery: row ``i`` is a hit when target ``i`` is
    *strictly* more cosine-similar to ``pred[i]`` than every other target row. Ties count as
    misses, so a prediction that cannot tell targets apart (e.g. a zero vector, equally similar to
    all of them) gets no credit; the flip side is that a split with duplicate target rows cannot
    reach 1.0. The diagonal score is read from the same similarity matrix as the other
    scores, so "strictly best" is decided on identically rounded numbers.

    Args:
        pred: ``[N, D]`` predicted embeddings.
        target: ``[N, D]`` target embeddings (row ``i`` is the truth for ``pred[i]``).
        chunk_size: prediction rows scored per block of the ``[chunk, N]`` similarity matrix;
            by default as many as fit in ``2**22`` scores.

    Returns:
        ``{"cosine": mean cosine, "mse": mean squared error, "r_at_1": fraction of hits in [0, 1]}``.

    Raises:
        ValueError: naming ``pred`` or ``target`` if either is not a finite, floating ``[N, D]``
            tensor, or if their shapes or devices differ.
    """
    pred, target = _scoring_pair(pred, target)
    n = pred.shape[0]

    mse = F.mse_loss(pred, target).item()
    cosine = F.cosine_similarity(pred, target, dim=-1, eps=_COS_EPS).mean().item()
    hits = _retrieval_hits(pred, target, chunk_size)
    return {"cosine": cosine, "mse": mse, "r_at_1": int(hits.sum().item()) / n}


@torch.no_grad()
def answer_hits(pred: Tensor, target: Tensor, answers: Tensor) -> Tensor:
    """``[N]`` bool: the answer nearest to ``pred[i]`` (by cosine) is the one nearest to ``target[i]``.

    For a task whose targets are drawn from a finite set of answers (the values of a lookup): a
    prediction is right when no other answer is closer to it than the true one.

    Args:
        pred: ``[N, D]``; target: ``[N, D]``; answers: ``[A, D]``, the candidate answers.
    """
    pred, target = _scoring_pair(pred, target)
    if answers.dim() != 2 or answers.shape[1] != pred.shape[1] or answers.shape[0] < 2:
        raise ValueError(f"answers: expected [A >= 2, {pred.shape[1]}], got {tuple(answers.shape)}")
    gallery = F.normalize(answers.to(pred.dtype), dim=1, eps=_COS_EPS)
    return (F.normalize(pred, dim=1, eps=_COS_EPS) @ gallery.T).argmax(1) == (target @ gallery.T).argmax(1)


def answer_accuracy(pred: Tensor, target: Tensor, answers: Tensor) -> float:
    """Fraction of rows whose nearest answer is the true one (:func:`answer_hits`), in ``[0, 1]``."""
    return float(answer_hits(pred, target, answers).float().mean())


def _scoring_pair(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Check a ``[N, D]`` pair for scoring and promote it to at least float32."""
    _check_pair(pred, target, finite=True)  # a NaN would silently turn into a miss (NaN > x is False)
    # Half-precision dot products over D = 768 lose enough to flip close retrieval calls.
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return pred.to(dtype), target.to(dtype)


def _retrieval_hits(pred: Tensor, target: Tensor, chunk_size: int | None) -> Tensor:
    """``[N]`` bool: target ``i`` is strictly the most cosine-similar target row to ``pred[i]``.

    ``pred`` and ``target`` are ``[N, D]`` of one floating dtype (already checked).
    """
    n = pred.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _MAX_SIM_ELEMENTS // n)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")

    # One normalized copy of the gallery ([N, D]); predictions are normalized chunk by chunk.
    gallery = F.normalize(target, dim=-1, eps=_COS_EPS)
    hits = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        queries = F.normalize(pred[start:stop], dim=-1, eps=_COS_EPS)
        sims = queries @ gallery.T  # [c, N]
        rows = torch.arange(stop - start, device=sims.device)
        cols = rows + start
        true_score = sims[rows, cols].clone()  # [c]
        sims[rows, cols] = float("-inf")  # exclude the true target from the competitors
        best_other = sims.max(dim=1).values  # [c]; -inf when N == 1
        hits.append(true_score > best_other)
    return torch.cat(hits)


@torch.no_grad()
def pair_scores(pred: Tensor, target: Tensor, chunk_size: int | None = None) -> dict[str, np.ndarray]:
    """Per-pair scores behind :func:`evaluate_predictions`, for paired comparisons of models.

    Args:
        pred, target: ``[N, D]`` as in :func:`evaluate_predictions` (same checks).

    Returns:
        ``{"cosine": [N] float64, "hit": [N] bool}`` on the CPU: the cosine of each prediction
        with its target and whether it is an R@1 hit. Their means are the ``cosine`` and
        ``r_at_1`` of :func:`evaluate_predictions` on the same rows.
    """
    pred, target = _scoring_pair(pred, target)
    cosine = F.cosine_similarity(pred, target, dim=-1, eps=_COS_EPS)
    hits = _retrieval_hits(pred, target, chunk_size)
    return {"cosine": cosine.double().cpu().numpy(), "hit": hits.cpu().numpy()}


def save_pair_scores(path: str | Path, scores: dict[str, dict[str, np.ndarray]]) -> Path:
    """Write ``{model: pair_scores(...)}`` to ``path`` (``.npz``, keys ``"<model>/cosine"``, ``"<model>/hit"``)."""
    arrays: dict[str, np.ndarray] = {}
    for model, per_pair in scores.items():
        if set(per_pair) != {"cosine", "hit"}:
            raise ValueError(f"scores[{model!r}]: expected keys cosine and hit, got {sorted(per_pair)}")
        if "/" in model:
            raise ValueError(f"scores: model name {model!r} must not contain '/'")
        if per_pair["cosine"].shape != per_pair["hit"].shape or per_pair["cosine"].ndim != 1:
            raise ValueError(f"scores[{model!r}]: cosine and hit must be equal-length 1-D arrays")
        arrays[f"{model}/cosine"] = np.asarray(per_pair["cosine"], dtype=np.float64)
        arrays[f"{model}/hit"] = np.asarray(per_pair["hit"], dtype=bool)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(fh, **arrays)

    return atomic_write(path, write)  # never a half-written file for a later reader


def load_pair_scores(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read what :func:`save_pair_scores` wrote: ``{model: {"cosine": [N], "hit": [N]}}``."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            model, _, what = key.rpartition("/")
            out.setdefault(model, {})[what] = data[key]
    return out
