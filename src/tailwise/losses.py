"""Standard long-tailed classification losses behind a single factory, :func:`build_loss`.

Every loss is a :class:`LongTailLoss` (an ``nn.Module``) built from the per-class training counts ``n_c``
(label order, ``C = len(class_counts)``). Class-dependent constants (log-priors, margins, weights) are computed
once, in float64, and stored as (non-persistent) buffers in the default float dtype, so ``.to(device)`` /
``.to(torch.float64)`` move them and nothing is recomputed per step. They are derived from ``class_counts``
and therefore kept out of ``state_dict``. All losses return the mean over the batch (see each class for the
exact reduction when class weights are involved).

Names (``build_loss(name, class_counts, **kw)``):

=====================  =======================================================  =================================
name                   loss                                                     keyword arguments (defaults)
=====================  =======================================================  =================================
``ce``                 cross-entropy                                            --
``focal``              Lin et al. 2017                                          ``gamma=2.0``
``class_balanced``     Cui et al. 2019, effective-number weights                ``beta=0.9999, base="ce",
                                                                                gamma=2.0`` (focal base only)
``balanced_softmax``   Ren et al. 2020                                          --
``logit_adjust``       Menon et al. 2021                                        ``tau=1.0, mode="loss"``
``ldam_drw``           Cao et al. 2019, LDAM with deferred re-weighting         ``max_m=0.5, s=30.0,
                                                                                drw_epoch=160, beta=0.9999``
``ldam``               Cao et al. 2019, LDAM without re-weighting               ``max_m=0.5, s=30.0``
=====================  =======================================================  =================================
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Registry

__all__ = [
    "LongTailLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "ClassBalancedLoss",
    "BalancedSoftmaxLoss",
    "LogitAdjustedLoss",
    "LDAMLoss",
    "build_loss",
    "list_losses",
    "register_loss",
    "validate_class_counts",
    "class_prior",
    "effective_number_weights",
    "ldam_margins",
]


# ----------------------------------------------------------------------------------------------------------------
# Class-dependent constants (float64 NumPy; converted to buffers by the losses)
# ----------------------------------------------------------------------------------------------------------------
def validate_class_counts(class_counts: Sequence[int]) -> np.ndarray:
    """Return ``class_counts`` as a 1-D int64 array; ``ValueError`` unless it is a non-empty list of positive integers."""
    if isinstance(class_counts, Tensor):
        class_counts = class_counts.detach().cpu().tolist()
    if isinstance(class_counts, (str, bytes)):
        raise ValueError(f"class_counts must be a sequence of positive integers, got {class_counts!r}")
    try:
        class_counts = list(class_counts)
        values = [float(c) for c in class_counts]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"class_counts must be a sequence of positive integers, got {class_counts!r}") from exc
    if len(values) == 0:
        raise ValueError("class_counts must not be empty")
    bad = [i for i, v in enumerate(values) if not (math.isfinite(v) and v.is_integer() and v > 0)]
    if bad:
        shown = ", ".join(f"class {i}: {class_counts[i]!r}" for i in bad[:5])
        raise ValueError(f"class_counts must all be positive integers (every class needs >= 1 sample); bad: {shown}")
    return np.asarray(values, dtype=np.int64)


def class_prior(class_counts: Sequence[int]) -> np.ndarray:
    """Empirical class prior ``pi_c = n_c / sum_k n_k`` (float64)."""
    counts = validate_class_counts(class_counts).astype(np.float64)
    return counts / counts.sum()


def effective_number_weights(class_counts: Sequence[int], beta: float) -> np.ndarray:
    """Cui et al. (2019) class-balanced weights, normalised to sum to ``C``.

    ``w_c = (1 - beta) / (1 - beta ** n_c)``, then ``w_c <- C * w_c / sum_k w_k``. ``beta = 0`` gives all ones;
    ``beta -> 1`` tends to inverse-frequency weights. Requires ``0 <= beta < 1``.
    """
    beta = float(beta)
    if not (0.0 <= beta < 1.0):
        raise ValueError(f"beta must satisfy 0 <= beta < 1, got {beta}")
    counts = validate_class_counts(class_counts).astype(np.float64)
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return weights / weights.sum() * len(counts)


def ldam_margins(class_counts: Sequence[int], max_m: float) -> np.ndarray:
    """LDAM margins (Cao et al. 2019): ``m_c = 1 / n_c ** (1/4)``, rescaled so that ``max_c m_c = max_m``."""
    counts = validate_class_counts(class_counts).astype(np.float64)
    margins = 1.0 / np.sqrt(np.sqrt(counts))
    return margins * (float(max_m) / margins.max())


# ----------------------------------------------------------------------------------------------------------------
# Hyperparameter checks
# ----------------------------------------------------------------------------------------------------------------
def _real(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real number, got {value!r}") from exc
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _nonneg(name: str, value: Any) -> float:
    out = _real(name, value)
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return out


def _positive(name: str, value: Any) -> float:
    out = _real(name, value)
    if out <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out


def _beta(value: Any) -> float:
    out = _real("beta", value)
    if not (0.0 <= out < 1.0):
        raise ValueError(f"beta must satisfy 0 <= beta < 1, got {value!r}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------------------------
class LongTailLoss(nn.Module):
    """Base class of the long-tailed losses.

    ``forward(logits, target)``: ``logits`` of shape ``(N, C)``, integer ``target`` of shape ``(N,)``; returns a
    scalar (mean over the batch). ``set_epoch(epoch)`` is called by the trainer at the start of every epoch
    (epochs counted from 0); it is a no-op unless the loss has a schedule (LDAM-DRW). ``adjust_logits`` maps the
    model's logits to the scores used for prediction (identity unless post-hoc logit adjustment).
    ``requires_normed_head`` is True when the classifier must output cosines in ``[-1, 1]`` (LDAM).
    """

    name: str = "base"
    requires_normed_head: ClassVar[bool] = False

    def __init__(self, class_counts: Sequence[int]) -> None:
        super().__init__()
        counts = validate_class_counts(class_counts)
        self.num_classes = int(len(counts))
        self.register_buffer("class_counts", torch.as_tensor(counts, dtype=torch.long), persistent=False)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _float_buffer(self, name: str, values: np.ndarray) -> None:
        tensor = torch.as_tensor(np.asarray(values, dtype=np.float64)).to(torch.get_default_dtype())
        self.register_buffer(name, tensor, persistent=False)

    def _check(self, logits: Tensor, target: Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{self.name}: logits must have shape (N, {self.num_classes}), got {tuple(logits.shape)}"
            )
        if target.dim() != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"{self.name}: target must have shape ({logits.shape[0]},), got {tuple(target.shape)}"
            )

    # -- API --------------------------------------------------------------------------------------------------
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Inform the loss of the current (0-based) epoch. No-op by default."""
        return None

    def batch_weight(self, target: Tensor) -> float:
        """The denominator of this loss's reduction over a batch with labels ``target``: the number of samples
        for a mean (data parallelism weights each process's loss by its share of the global denominator)."""
        return float(len(target))

    def adjust_logits(self, logits: Tensor) -> Tensor:
        """Scores to use for prediction. Identity by default."""
        return logits

    def hparams(self) -> dict[str, Any]:
        """Resolved hyperparameters (JSON-serialisable)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """``{"name": ..., **resolved hyperparameters}``, for result.json."""
        return {"name": self.name, **self.hparams()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())


def _focal_terms(logits: Tensor, target: Tensor, gamma: float) -> Tensor:
    """Per-sample softmax focal loss ``-(1 - p_t)^gamma * log p_t`` (shape ``(N,)``)."""
    log_pt = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    if gamma == 0.0:
        return -log_pt
    pt = log_pt.exp()
    return -torch.pow((1.0 - pt).clamp_min(0.0), gamma) * log_pt


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
class CrossEntropyLoss(LongTailLoss):
    """Plain softmax cross-entropy: ``L = mean_i [ -log softmax(x_i)_{y_i} ]``."""

    name = "ce"

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return F.cross_entropy(logits, target.long())


class FocalLoss(LongTailLoss):
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017), multi-class softmax form.

    ``p_t = softmax(x_i)_{y_i}``,  ``L = mean_i [ -(1 - p_t)^gamma * log p_t ]``. ``gamma = 0`` is cross-entropy.
    No ``alpha`` balancing term (use ``class_balanced`` with ``base="focal"`` for class weights).
    """

    name = "focal"

    def __init__(self, class_counts: Sequence[int], gamma: float = 2.0) -> None:
        super().__init__(class_counts)
        self.gamma = _nonneg("gamma", gamma)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return _focal_terms(logits, target, self.gamma).mean()

    def hparams(self) -> dict[str, Any]:
        return {"gamma": self.gamma}


class ClassBalancedLoss(LongTailLoss):
    """Class-balanced loss (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019).

    Weights ``w_c = (1 - beta) / (1 - beta^{n_c})`` normalised so that ``sum_c w_c = C``; per-sample base loss
    ``l_i`` is softmax cross-entropy (``base="ce"``) or the softmax focal loss
    ``-(1 - p_t)^gamma log p_t`` (``base="focal"``; Cui et al. used a sigmoid focal loss, this is the softmax one).

    Reduction: the **plain mean over the batch**, ``L = (1/N) sum_i w_{y_i} l_i`` (Cui et al.'s formulation), NOT
    PyTorch's weighted mean ``sum_i w_{y_i} l_i / sum_i w_{y_i}``.
    """

    name = "class_balanced"

    def __init__(
        self,
        class_counts: Sequence[int],
        beta: float = 0.9999,
        base: str = "ce",
        gamma: float | None = None,
    ) -> None:
        super().__init__(class_counts)
        if base not in ("ce", "focal"):
            raise ValueError(f"class_balanced: base must be 'ce' or 'focal', got {base!r}")
        if base == "ce" and gamma is not None:
            raise ValueError("class_balanced: gamma only applies with base='focal'")
        self.beta = _beta(beta)
        self.base = base
        self.gamma = _nonneg("gamma", 2.0 if gamma is None else gamma) if base == "focal" else 0.0
        self._float_buffer("weights", effective_number_weights(class_counts, self.beta))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        target = target.long()
        per_sample = _focal_terms(logits, target, self.gamma)
        w = self.weights.to(per_sample.dtype)[target]
        return (w * per_sample).mean()

    def hparams(self) -> dict[str, Any]:
        out: dict[str, Any] = {"beta": self.beta, "base": self.base}
        if self.base == "focal":
            out["gamma"] = self.gamma
        return out


class BalancedSoftmaxLoss(LongTailLoss):
    """Balanced Softmax (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020).

    ``pi_c = n_c / sum_k n_k``,  ``L = mean_i [ -log softmax(x_i + log pi)_{y_i} ]``. Prediction uses the raw logits.
    """

    name = "balanced_softmax"

    def __init__(self, class_counts: Sequence[int]) -> None:
        super().__init__(class_counts)
        self._float_buffer("log_prior", np.log(class_prior(class_counts)))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return F.cross_entropy(logits + self.log_prior.to(logits.dtype), target.long())


class LogitAdjustedLoss(LongTailLoss):
    """Logit adjustment (Menon et al., "Long-Tail Learning via Logit Adjustment", ICLR 2021).

    ``pi_c = n_c / sum_k n_k``.

    * ``mode="loss"`` (logit-adjusted loss): ``L = mean_i [ -log softmax(x_i + tau log pi)_{y_i} ]``; prediction
      uses the raw logits (``adjust_logits`` is the identity).
    * ``mode="posthoc"``: training uses plain cross-entropy; prediction uses ``x - tau log pi``
      (``adjust_logits``).
    """

    name = "logit_adjust"

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0, mode: str = "loss") -> None:
        super().__init__(class_counts)
        if mode not in ("loss", "posthoc"):
            raise ValueError(f"logit_adjust: mode must be 'loss' or 'posthoc', got {mode!r}")
        self.tau = _real("tau", tau)
        self.mode = mode
        self._float_buffer("log_prior", np.log(class_prior(class_counts)))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        if self.mode == "loss":
            logits = logits + self.tau * self.log_prior.to(logits.dtype)
        return F.cross_entropy(logits, target.long())

    def adjust_logits(self, logits: Tensor) -> Tensor:
        if self.mode == "posthoc":
            return logits - self.tau * self.log_prior.to(logits.dtype)
        return logits

    def hparams(self) -> dict[str, Any]:
        return {"tau": self.tau, "mode": self.mode}


class LDAMLoss(LongTailLoss):
    """LDAM loss with optional deferred re-weighting (Cao et al., "Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss", NeurIPS 2019).

    Expects cosine logits ``x`` (normalised classifier, ``requires_normed_head = True``). Margins
    ``m_c = 1 / n_c^{1/4}`` rescaled so ``max_c m_c = max_m``; the margin is subtracted at the target entry only::

        z_{ij} = x_{ij} - m_{y_i} [j = y_i],     l_i = -log softmax(s * z_i)_{y_i}

    Deferred re-weighting (DRW): before ``drw_epoch`` (0-based, set via ``set_epoch``) the loss is unweighted,
    ``L = mean_i l_i``; from ``epoch >= drw_epoch`` on it uses the effective-number weights
    ``w_c = (1 - beta) / (1 - beta^{n_c})`` normalised to ``sum_c w_c = C``. As in the LDAM-DRW reference code
    (``F.cross_entropy(s * z, y, weight=w)``) the weighted reduction is PyTorch's **weighted mean**,
    ``L = sum_i w_{y_i} l_i / sum_i w_{y_i}``. ``drw_epoch=None`` never re-weights (plain LDAM).
    Prediction: argmax of the cosines (``adjust_logits`` is the identity).
    """

    name = "ldam_drw"
    requires_normed_head = True

    def __init__(
        self,
        class_counts: Sequence[int],
        max_m: float = 0.5,
        s: float = 30.0,
        drw_epoch: int | None = 160,
        beta: float = 0.9999,
    ) -> None:
        super().__init__(class_counts)
        self.max_m = _positive("max_m", max_m)
        self.s = _positive("s", s)
        if drw_epoch is not None:
            if isinstance(drw_epoch, bool) or not float(drw_epoch).is_integer() or drw_epoch < 0:
                raise ValueError(f"drw_epoch must be a non-negative integer or None, got {drw_epoch!r}")
            drw_epoch = int(drw_epoch)
        self.drw_epoch = drw_epoch
        self.beta = _beta(beta)
        if drw_epoch is None:
            self.name = "ldam"
        self._float_buffer("margins", ldam_margins(class_counts, self.max_m))
        self._float_buffer("drw_weights", effective_number_weights(class_counts, self.beta))
        self.use_weights = False

    def set_epoch(self, epoch: int) -> None:
        self.use_weights = self.drw_epoch is not None and int(epoch) >= self.drw_epoch

    @property
    def weight(self) -> Tensor | None:
        """The class weights currently in use (``None`` before ``drw_epoch``)."""
        return self.drw_weights if self.use_weights else None

    def batch_weight(self, target: Tensor) -> float:
        """With DRW weights, ``F.cross_entropy(weight=w)`` divides by ``sum_i w_{y_i}``, not by the batch size."""
        weight = self.weight
        return float(len(target)) if weight is None else float(weight[target.long().to(weight.device)].sum())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        target = target.long()
        margins = self.margins.to(logits.dtype)[target]
        offset = torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), margins.unsqueeze(1))
        weight = self.weight
        if weight is not None:
            weight = weight.to(logits.dtype)
        return F.cross_entropy(self.s * (logits - offset), target, weight=weight)

    def hparams(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_m": self.max_m, "s": self.s}
        if self.drw_epoch is not None:
            out.update(drw_epoch=self.drw_epoch, beta=self.beta)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------------------
LOSSES: Registry[Callable[..., LongTailLoss]] = Registry("loss.name")
register_loss = LOSSES.register  # decorator registering a loss class or factory ``fn(class_counts, **hparams)``
list_losses = LOSSES.names
for _cls in (CrossEntropyLoss, FocalLoss, ClassBalancedLoss, BalancedSoftmaxLoss, LogitAdjustedLoss, LDAMLoss):
    register_loss(_cls.name)(_cls)


@register_loss("ldam")
def ldam(class_counts: Sequence[int], max_m: float = 0.5, s: float = 30.0) -> LDAMLoss:
    """LDAM without deferred re-weighting (``ldam_drw`` with ``drw_epoch=None``)."""
    return LDAMLoss(class_counts, max_m, s, drw_epoch=None)


def build_loss(name: str, class_counts: Sequence[int], **kw: Any) -> LongTailLoss:
    """Build the loss ``name`` (one of :func:`list_losses`) for training counts ``class_counts``.

    Hyperparameters are keyword arguments (see the module docstring for names and defaults). Raises
    ``ValueError`` for an unknown name, an unknown keyword, an invalid hyperparameter value, or class counts
    that are not all positive integers.
    """
    key = str(name).strip().lower()
    factory = LOSSES.get(key)
    allowed = [p for p in inspect.signature(factory).parameters if p != "class_counts"]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        allowed_txt = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"loss {key!r}: unknown keyword argument(s) {', '.join(unknown)}; allowed: {allowed_txt}")
    loss = factory(class_counts, **kw)
    loss.name = key
    return loss
