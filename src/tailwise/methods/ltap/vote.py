"""LT-Vote: per-class validation feedback that sets the criterion weights ``alpha`` (paper section 2.2, App. D).

State: the vote matrix ``D`` (K criteria x C classes, zeros at the start), the per-class accuracy of the previous
round, the number of closed rounds ``R``, the weights ``alpha`` in force and the suppressed criterion.

Two kinds of round share the steps 2-4 below and differ in what earns a vote (step 1):

* :meth:`LTVote.observe_trials` (``vote: trial``, the default): at a pruning stage every criterion ``k`` prunes a
  copy of the model to the stage's budget alone and is evaluated on the same validation images (``A[k, c]``,
  percent). The comparison for class ``c`` is the mean over the criteria, ``mean_k A[k, c]``: ``D[k, c] += 1`` when
  ``A[k, c]`` is above it (``increment="indicator"``) or ``+= (A[k, c] - mean) / 100`` when positive
  (``increment="gain"``). Every criterion votes in every round, the suppressed one included. This goes beyond the
  paper: eq. 6, ``D_k[c] += 1(A_c^(t) > A_c^(t-1))``, has no ``k`` on its right-hand side, so read literally every
  active criterion receives the same votes and the weights move only through the random suppression; the trial
  gives each criterion its own, paired, counterfactual accuracy at the moment its ranking is used. Why the mean
  over criteria as the comparison: it needs no extra evaluation (no unpruned reference), treats the criteria
  symmetrically, and credits a criterion only where it does better than the alternatives at the same budget (a
  criterion as good as the others earns nothing; the class weights then make the tail's classes count most).
* :meth:`LTVote.observe` (``vote: paper``, the literal reading): per-class accuracy ``A`` of the model as trained.

A paper round closes with :meth:`LTVote.observe` (per-class accuracy ``A`` in percent, from the validation split):

1. votes (eq. 6): for every class ``c`` with ``A_c > A_c^prev`` (strictly; classes without validation samples
   never improve), every criterion *active in the round that just ended* (``alpha_k > 0``: selected and not
   suppressed) gets ``D[k, c] += 1`` (``increment="indicator"``, eq. 6) or ``+= (A_c - A_c^prev) / 100``
   (``increment="gain"``, the magnitude-proportional reading of Lemma A);
2. importance (eq. 4, normalised): ``I = D @ w / R`` with ``w`` the normalised class weights
   (:func:`class_weights`); since ``sum(w) = 1`` and ``D[k, c] <= R``, ``I_k`` lies in ``[0, 1]``;
3. weights (eq. 5 with the temperature tau of section 4.1): ``alpha = softmax(I / tau)`` over the K criteria;
4. suppression (section 2.2): one criterion ``m`` is drawn with probability ``(1/alpha_m) / sum_j (1/alpha_j)``
   ("inverse probability") from the vote's own generator (seeded from the run seed); ``alpha_m`` is set to 0 and
   redistributed uniformly, ``alpha_j += alpha_m / (K - 1)`` for every other ``j`` (section 2.2's wording; App.
   D's ``alpha_j + alpha_j / (K - 1)`` would not keep ``sum(alpha) = 1``).

Before any round (``R = 0``) ``I = 0``: uniform weights with one criterion suppressed (drawn at construction).
``D`` is only ever updated by adding a full ``K x C`` matrix (no advanced indexing, whose results are copies), the
softmax runs over the criteria dimension of a 1-D vector, and the redistribution uses a boolean mask: the three
defects of the public code (``../shared/reference/ltap-public-code-audit.md`` section 3) cannot occur.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

CLASS_WEIGHTS = ("tail", "counts", "inverse", "uniform")
INCREMENTS = ("indicator", "gain")


def class_weights(counts: Sequence[int], kind: str = "tail") -> torch.Tensor:
    """Normalised (sum 1) per-class vote weights from training counts ``N_c``.

    ``tail`` (default, Proposition 1): ``w_c ∝ (N_1 / N_c) / log(1 + N_c)`` with ``N_1 = max_c N_c`` (``log(1 + N)``
    instead of the paper's ``log N`` so that a one-image class is finite); ``counts``: ``w_c ∝ N_c`` (the public
    code's raw counts, head-biased); ``inverse``: ``w_c ∝ 1 / N_c``; ``uniform``: ``1 / C``.
    """
    if kind not in CLASS_WEIGHTS:
        raise ValueError(f"class_weights: {kind!r} is not allowed; allowed: {', '.join(CLASS_WEIGHTS)}")
    n = torch.as_tensor(list(counts), dtype=torch.float64).clamp_min(1.0)
    if kind == "tail":
        w = (n.max() / n) / torch.log1p(n)
    elif kind == "counts":
        w = n.clone()
    elif kind == "inverse":
        w = 1.0 / n
    else:
        w = torch.ones_like(n)
    return w / w.sum()


def as_accuracy(values) -> torch.Tensor:
    """Per-class accuracy as a float64 vector (``None`` -> NaN: a class without validation samples)."""
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)


class LTVote:
    def __init__(self, criteria: Sequence[str], weights: torch.Tensor, tau: float = 0.5, suppress: bool = True,
                 increment: str = "indicator", seed: int = 0):
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if increment not in INCREMENTS:
            raise ValueError(f"increment: {increment!r}; allowed: {', '.join(INCREMENTS)}")
        self.criteria = list(criteria)
        self.w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if not math.isclose(float(self.w.sum()), 1.0, rel_tol=1e-9):
            raise ValueError("class weights must sum to 1")
        self.tau, self.increment = float(tau), increment
        self.suppress = suppress and len(self.criteria) > 1
        self.D = torch.zeros(len(self.criteria), len(self.w), dtype=torch.float64)
        self.rounds = 0
        self.prev: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(int(seed) % 2**64)
        self.history: list[dict] = []
        self.alpha, self.suppressed = self.draw()

    # ----------------------------------------------------------------------------------------- weights
    def importance(self) -> torch.Tensor:
        """``I = D @ w / R`` (K values in [0, 1]; zeros before the first round)."""
        return self.D @ self.w / max(self.rounds, 1)

    def base_alpha(self) -> torch.Tensor:
        """``softmax(I / tau)`` over the criteria (before suppression)."""
        return torch.softmax(self.importance() / self.tau, dim=0)

    def draw(self) -> tuple[torch.Tensor, int | None]:
        """This round's weights: the base weights with one criterion suppressed and its weight redistributed."""
        alpha = self.base_alpha()
        if not self.suppress:
            return alpha, None
        inverse = 1.0 / alpha
        m = int(torch.multinomial(inverse / inverse.sum(), 1, generator=self.generator))
        others = torch.arange(len(alpha)) != m  # boolean mask over the criteria
        share = alpha[m] / (len(alpha) - 1)
        alpha = alpha.clone()
        alpha[others] += share
        alpha[m] = 0.0
        return alpha, m

    def alpha_dict(self) -> dict[str, float]:
        return {k: float(a) for k, a in zip(self.criteria, self.alpha)}

    def suppressed_name(self) -> str | None:
        return None if self.suppressed is None else self.criteria[self.suppressed]

    # ------------------------------------------------------------------------------------------- rounds
    def observe(self, accuracy: Sequence[float | None]) -> dict | None:
        """Close a round with per-class accuracy ``accuracy`` (percent, ``None`` for a class without samples).

        The first call only records the reference accuracy (returns None). Later calls vote, recompute and
        redraw ``alpha`` and return the round's record.
        """
        acc = as_accuracy(accuracy)
        if acc.numel() != self.D.shape[1]:
            raise ValueError(f"LT-Vote: {acc.numel()} per-class accuracies for {self.D.shape[1]} classes")
        if self.prev is None:
            self.prev = acc
            return None
        gain = acc - self.prev
        improved = gain > 0  # NaN compares False: classes without samples never vote
        step = improved.double() if self.increment == "indicator" else torch.where(improved, gain / 100.0, 0.0)
        active = self.alpha > 0
        used_alpha, used_suppressed = self.alpha_dict(), self.suppressed_name()
        self.D += active.double()[:, None] * step[None, :]
        self.rounds += 1
        self.prev = torch.where(torch.isnan(acc), self.prev, acc)
        self.alpha, self.suppressed = self.draw()
        record = {"round": self.rounds, "improved_classes": int(improved.sum()),
                  "alpha_used": used_alpha, "suppressed_used": used_suppressed,
                  "votes": {k: float(v) for k, v in zip(self.criteria, (active.double() * float(step.sum())))},
                  "alpha": self.alpha_dict(), "suppressed": self.suppressed_name()}
        self.history.append(record)
        return record

    def observe_trials(self, accuracy) -> dict:
        """Close a trial round: ``accuracy[k][c]`` is class ``c``'s validation accuracy (percent; NaN / None
        without samples) of the model pruned by criterion ``k`` alone (rows in ``self.criteria`` order). Credits
        every criterion against the per-class mean over criteria (module docstring), recomputes and redraws
        ``alpha`` and returns the round's record."""
        acc = torch.stack([as_accuracy(row) for row in accuracy])
        if acc.shape != self.D.shape:
            raise ValueError(f"LT-Vote: trial accuracies of shape {tuple(acc.shape)}, expected {tuple(self.D.shape)}")
        margin = acc - acc.mean(0, keepdim=True)
        better = margin > 1e-9  # NaN compares False; the tolerance absorbs the rounding of the mean
        step = better.double() if self.increment == "indicator" else torch.where(better, margin / 100.0, 0.0)
        self.D += step
        self.rounds += 1
        base = self.base_alpha()
        self.alpha, self.suppressed = self.draw()
        record = {"round": self.rounds,
                  "votes": {k: float(v) for k, v in zip(self.criteria, step.sum(1))},
                  "weighted_votes": {k: float(v) for k, v in zip(self.criteria, step @ self.w)},
                  "alpha_base": {k: float(a) for k, a in zip(self.criteria, base)},
                  "alpha": self.alpha_dict(), "suppressed": self.suppressed_name()}
        self.history.append(record)
        return record

    # ----------------------------------------------------------------------------------------- summary
    def summary(self, membership: Sequence[str] | None = None) -> dict:
        """The vote matrix in brief: rounds, total votes and class-weighted importance per criterion, and (given
        the shot-group membership of the classes) the votes each criterion collected from each group."""
        out = {"rounds": self.rounds, "tau": self.tau, "increment": self.increment,
               "votes_total": {k: float(v) for k, v in zip(self.criteria, self.D.sum(1))},
               "importance": {k: float(v) for k, v in zip(self.criteria, self.importance())},
               "base_alpha": {k: float(v) for k, v in zip(self.criteria, self.base_alpha())}}
        if membership is not None:
            names = [g for g in ("many", "medium", "few") if g in membership]
            idx = {g: torch.tensor([c for c, m in enumerate(membership) if m == g]) for g in names}
            out["votes_by_group"] = {k: {g: float(self.D[i, idx[g]].sum()) for g in names}
                                     for i, k in enumerate(self.criteria)}
            out["class_weight_by_group"] = {g: float(self.w[idx[g]].sum()) for g in names}
        return out

    # -------------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {"D": self.D.clone(), "rounds": self.rounds, "prev": None if self.prev is None else self.prev.clone(),
                "alpha": self.alpha.clone(), "suppressed": self.suppressed, "generator": self.generator.get_state(),
                "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        # everything lives on the CPU, whatever device a checkpoint was loaded to
        self.D = state["D"].detach().to("cpu", torch.float64, copy=True)
        self.rounds = int(state["rounds"])
        self.prev = None if state["prev"] is None else state["prev"].detach().to("cpu", torch.float64, copy=True)
        self.alpha = state["alpha"].detach().to("cpu", torch.float64, copy=True)
        self.suppressed = None if state["suppressed"] is None else int(state["suppressed"])
        self.generator.set_state(state["generator"].cpu())
        self.history = [dict(r) for r in state["history"]]
