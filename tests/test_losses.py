"""Tests of tailwise.losses against independent hand computations (plain math, no torch losses)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tailwise.losses import LongTailLoss, build_loss, list_losses

LOGITS = [
    [2.0, 1.0, 0.1],
    [0.5, 2.5, -1.0],
    [0.0, 0.3, 1.5],
    [1.2, -0.4, 0.7],
]
TARGET = [0, 2, 1, 2]
COUNTS = [100, 10, 1]
BALANCED = [7, 7, 7]


# ---------------------------------------------------------------------------------------------------------------
# Independent reference helpers (pure Python)
# ---------------------------------------------------------------------------------------------------------------
def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    z = sum(e)
    return [v / z for v in e]


def ce_terms(logits, target):
    return [-math.log(softmax(row)[t]) for row, t in zip(logits, target)]


def mean(xs):
    return sum(xs) / len(xs)


def shift(logits, offsets):
    return [[v + o for v, o in zip(row, offsets)] for row in logits]


def eff_weights(counts, beta):
    w = [(1 - beta) / (1 - beta**n) for n in counts]
    return [len(counts) * v / sum(w) for v in w]


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def y():
    return torch.tensor(TARGET, dtype=torch.long)


def approx(value):
    return pytest.approx(value, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------------
def test_ce_hand():
    loss = build_loss("ce", COUNTS)
    assert float(loss(t(LOGITS), y())) == approx(mean(ce_terms(LOGITS, TARGET)))
    # a fully written-out single sample: logits (1, 2, 3), target 0
    expected = -math.log(math.exp(1) / (math.exp(1) + math.exp(2) + math.exp(3)))
    assert float(loss(t([[1.0, 2.0, 3.0]]), torch.tensor([0]))) == approx(expected)


@pytest.mark.parametrize("gamma", [0.5, 2.0, 3.0])
def test_focal_hand(gamma):
    loss = build_loss("focal", COUNTS, gamma=gamma)
    terms = []
    for row, c in zip(LOGITS, TARGET):
        p = softmax(row)[c]
        terms.append(-((1 - p) ** gamma) * math.log(p))
    assert float(loss(t(LOGITS), y())) == approx(mean(terms))


def test_focal_default_and_gamma0_is_ce():
    assert build_loss("focal", COUNTS).describe() == {"name": "focal", "gamma": 2.0}
    f0 = build_loss("focal", COUNTS, gamma=0)
    assert float(f0(t(LOGITS), y())) == approx(mean(ce_terms(LOGITS, TARGET)))


def test_class_balanced_ce_hand_plain_mean():
    beta = 0.99
    loss = build_loss("class_balanced", COUNTS, beta=beta)
    w = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    w = [3 * v / sum(w) for v in w]
    assert sum(w) == pytest.approx(3.0)
    l = ce_terms(LOGITS, TARGET)
    expected = sum(w[c] * li for c, li in zip(TARGET, l)) / len(l)
    got = float(loss(t(LOGITS), y()))
    assert got == approx(expected)
    # and NOT the weighted mean (which differs here)
    weighted_mean = sum(w[c] * li for c, li in zip(TARGET, l)) / sum(w[c] for c in TARGET)
    assert abs(got - weighted_mean) > 1e-3
    assert torch.allclose(loss.weights, t(w))


def test_class_balanced_focal_hand():
    beta, gamma = 0.999, 1.5
    loss = build_loss("class_balanced", COUNTS, beta=beta, base="focal", gamma=gamma)
    w = eff_weights(COUNTS, beta)
    terms = []
    for row, c in zip(LOGITS, TARGET):
        p = softmax(row)[c]
        terms.append(w[c] * -((1 - p) ** gamma) * math.log(p))
    assert float(loss(t(LOGITS), y())) == approx(mean(terms))
    assert loss.describe() == {"name": "class_balanced", "beta": 0.999, "base": "focal", "gamma": 1.5}


def test_class_balanced_defaults():
    loss = build_loss("class_balanced", COUNTS)
    assert loss.describe() == {"name": "class_balanced", "beta": 0.9999, "base": "ce"}
    assert build_loss("class_balanced", COUNTS, base="focal").describe()["gamma"] == 2.0


@pytest.mark.parametrize("beta", [0.0, 1e-12])
def test_class_balanced_beta0_is_ce(beta):
    loss = build_loss("class_balanced", COUNTS, beta=beta)
    assert torch.allclose(loss.weights, torch.ones(3))
    assert float(loss(t(LOGITS), y())) == approx(mean(ce_terms(LOGITS, TARGET)))


def test_balanced_softmax_hand():
    loss = build_loss("balanced_softmax", COUNTS)
    total = sum(COUNTS)
    logp = [math.log(n / total) for n in COUNTS]
    expected = mean(ce_terms(shift(LOGITS, logp), TARGET))
    assert float(loss(t(LOGITS), y())) == approx(expected)
    assert torch.equal(loss.adjust_logits(t(LOGITS)), t(LOGITS))


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_logit_adjust_loss_hand(tau):
    loss = build_loss("logit_adjust", COUNTS, tau=tau)
    total = sum(COUNTS)
    off = [tau * math.log(n / total) for n in COUNTS]
    assert float(loss(t(LOGITS), y())) == approx(mean(ce_terms(shift(LOGITS, off), TARGET)))
    assert torch.equal(loss.adjust_logits(t(LOGITS)), t(LOGITS))


def test_logit_adjust_posthoc_hand():
    tau = 1.5
    loss = build_loss("logit_adjust", COUNTS, tau=tau, mode="posthoc")
    # training: plain CE
    assert float(loss(t(LOGITS), y())) == approx(mean(ce_terms(LOGITS, TARGET)))
    # prediction: logits - tau * log(prior)
    total = sum(COUNTS)
    expected = shift(LOGITS, [-tau * math.log(n / total) for n in COUNTS])
    assert torch.allclose(loss.adjust_logits(t(LOGITS)), t(expected), atol=1e-5)
    # the adjustment favours the tail: sample 0 is class 0 by raw argmax, class 2 after adjustment
    assert int(t(LOGITS)[0].argmax()) == 0 and int(loss.adjust_logits(t(LOGITS))[0].argmax()) == 2
    assert loss.describe() == {"name": "logit_adjust", "tau": 1.5, "mode": "posthoc"}


def test_logit_adjust_defaults():
    assert build_loss("logit_adjust", COUNTS).describe() == {"name": "logit_adjust", "tau": 1.0, "mode": "loss"}


def test_uniform_prior_reduces_to_ce():
    ce = mean(ce_terms(LOGITS, TARGET))
    for name, kw in [("balanced_softmax", {}), ("logit_adjust", {}), ("logit_adjust", {"tau": 2.0})]:
        loss = build_loss(name, BALANCED, **kw)
        assert float(loss(t(LOGITS), y())) == approx(ce), (name, kw)
    post = build_loss("logit_adjust", BALANCED, tau=2.0, mode="posthoc")
    x = t(LOGITS)
    diff = post.adjust_logits(x) - x
    assert torch.allclose(diff, torch.full_like(x, 2.0 * math.log(3)), atol=1e-5)
    assert torch.equal(post.adjust_logits(x).argmax(1), x.argmax(1))


# ---------------------------------------------------------------------------------------------------------------
# LDAM / DRW
# ---------------------------------------------------------------------------------------------------------------
COS = [
    [0.6, 0.2, -0.1],
    [-0.3, 0.4, 0.1],
    [0.2, 0.1, 0.5],
    [0.0, 0.3, 0.3],
]


def test_ldam_margins_hand():
    loss = build_loss("ldam_drw", COUNTS)
    # 1/n^(1/4): 100 -> 1/sqrt(10), 10 -> 1/10^(1/4), 1 -> 1; max is 1 -> rescale by 0.5
    expected = [0.5 / math.sqrt(10), 0.5 / 10**0.25, 0.5]
    assert torch.allclose(loss.margins, t(expected))
    assert max(expected) == 0.5
    loss2 = build_loss("ldam", [16, 81], max_m=0.3)
    # 16^(-1/4) = 1/2, 81^(-1/4) = 1/3 -> scaled by 0.3 / (1/2)
    assert torch.allclose(loss2.margins, t([0.3, 0.2]))
    assert type(loss).requires_normed_head is True and loss.requires_normed_head is True
    assert build_loss("ce", COUNTS).requires_normed_head is False
    assert LongTailLoss.requires_normed_head is False


def ldam_terms(cos, target, margins, s):
    out = []
    for row, c in zip(cos, target):
        z = [s * (v - (margins[c] if j == c else 0.0)) for j, v in enumerate(row)]
        out.append(-math.log(softmax(z)[c]))
    return out


def test_ldam_drw_schedule_and_weighted_mean():
    s, beta, drw = 30.0, 0.9999, 3
    loss = build_loss("ldam_drw", COUNTS, drw_epoch=drw)
    margins = [0.5 / math.sqrt(10), 0.5 / 10**0.25, 0.5]
    terms = ldam_terms(COS, TARGET, margins, s)
    w = eff_weights(COUNTS, beta)

    # off before drw_epoch (also off at construction)
    assert loss.weight is None
    assert float(loss(t(COS), y())) == approx(mean(terms))
    for epoch in range(drw):
        loss.set_epoch(epoch)
        assert loss.weight is None
        assert float(loss(t(COS), y())) == approx(mean(terms))

    # on from drw_epoch on: PyTorch weighted mean sum w l / sum w
    loss.set_epoch(drw)
    assert loss.weight is not None
    assert torch.allclose(loss.weight, t(w))
    assert loss.weight.sum().item() == pytest.approx(3.0)
    expected = sum(w[c] * l for c, l in zip(TARGET, terms)) / sum(w[c] for c in TARGET)
    got = float(loss(t(COS), y()))
    assert got == approx(expected)
    assert abs(got - mean([w[c] * l for c, l in zip(TARGET, terms)])) > 1e-3  # not the plain mean
    loss.set_epoch(drw + 100)
    assert float(loss(t(COS), y())) == approx(expected)
    # setting an earlier epoch (e.g. resume/restart) switches it back off
    loss.set_epoch(0)
    assert loss.weight is None


def test_ldam_defaults_and_no_drw():
    loss = build_loss("ldam_drw", COUNTS)
    assert loss.describe() == {"name": "ldam_drw", "max_m": 0.5, "s": 30.0, "drw_epoch": 160, "beta": 0.9999}
    loss.set_epoch(159)
    assert loss.weight is None
    loss.set_epoch(160)
    assert loss.weight is not None

    plain = build_loss("ldam", COUNTS, s=10.0)
    assert plain.describe() == {"name": "ldam", "max_m": 0.5, "s": 10.0}
    plain.set_epoch(10_000)
    assert plain.weight is None
    margins = [0.5 / math.sqrt(10), 0.5 / 10**0.25, 0.5]
    assert float(plain(t(COS), y())) == approx(mean(ldam_terms(COS, TARGET, margins, 10.0)))
    assert torch.equal(plain.adjust_logits(t(COS)), t(COS))


def test_describe_is_json_serialisable():
    for name in list_losses():
        d = build_loss(name, COUNTS).describe()
        assert d["name"] == name
        json.dumps(d)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError) as exc:
        build_loss("softmax_xyz", COUNTS)
    for name in ("ce", "focal", "class_balanced", "balanced_softmax", "logit_adjust", "ldam_drw", "ldam"):
        assert name in str(exc.value)


def test_unknown_kwarg_names_allowed():
    with pytest.raises(ValueError) as exc:
        build_loss("focal", COUNTS, gama=2.0)
    assert "gama" in str(exc.value) and "gamma" in str(exc.value)
    with pytest.raises(ValueError) as exc:
        build_loss("ldam", COUNTS, drw_epoch=10)
    assert "max_m" in str(exc.value) and "s" in str(exc.value)
    with pytest.raises(ValueError):
        build_loss("ce", COUNTS, tau=1.0)
    with pytest.raises(ValueError):
        build_loss("logit_adjust", COUNTS, beta=0.9)


@pytest.mark.parametrize("counts", [[10, 0, 3], [10, -1, 3], [], [1.5, 2, 3]])
@pytest.mark.parametrize("name", list_losses())
def test_bad_counts(name, counts):
    with pytest.raises(ValueError):
        build_loss(name, counts)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("focal", {"gamma": -1.0}),
        ("class_balanced", {"beta": 1.0}),
        ("class_balanced", {"beta": -0.1}),
        ("class_balanced", {"base": "sigmoid"}),
        ("class_balanced", {"gamma": 2.0}),  # gamma without base='focal' would be silently ignored
        ("logit_adjust", {"mode": "both"}),
        ("ldam_drw", {"drw_epoch": -1}),
        ("ldam_drw", {"s": 0.0}),
        ("ldam_drw", {"max_m": float("nan")}),
    ],
)
def test_bad_hparams(name, kw):
    with pytest.raises(ValueError):
        build_loss(name, COUNTS, **kw)


def test_bad_logit_shape():
    loss = build_loss("ce", COUNTS)
    with pytest.raises(ValueError):
        loss(torch.zeros(4, 5), y())
    with pytest.raises(ValueError):
        loss(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# Autograd, devices/dtypes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_losses())
def test_backward(name):
    kw = {"drw_epoch": 0} if name == "ldam_drw" else {}
    loss = build_loss(name, COUNTS, **kw)
    loss.set_epoch(0)
    x = t(COS).requires_grad_(True)
    out = loss(x, y())
    assert out.dim() == 0
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_losses())
def test_buffers_move_with_to(name):
    kw = {"drw_epoch": 0} if name == "ldam_drw" else {}
    loss = build_loss(name, COUNTS, **kw)
    loss.set_epoch(0)
    ref = float(loss(t(COS), y()))
    loss = loss.to(torch.float64)
    for buf_name, buf in loss.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float64, buf_name
    out = loss(t(COS, torch.float64), y())
    assert out.dtype == torch.float64
    assert float(out) == pytest.approx(ref, rel=1e-5)
    # derived constants stay out of the state dict
    assert loss.state_dict() == {}
