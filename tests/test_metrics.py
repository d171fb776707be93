import json
import math

import numpy as np
import pytest
import torch

from tailwise.data.longtail import ShotGroups, shot_groups
from tailwise.eval.metrics import confusion_matrix, group_accuracy, per_class_accuracy, summarize

# 4 classes, 10 test samples; class 3 never occurs in the test labels.
#   class 0: 5 samples, 4 correct (one predicted as 1)      -> 80 %
#   class 1: 3 samples, 2 correct (one predicted as 2)      -> 66.6667 %
#   class 2: 2 samples, 0 correct (predicted as 0 and 3)    -> 0 %
#   class 3: 0 samples                                      -> nan
TARGETS = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
PREDS = [0, 0, 0, 0, 1, 1, 2, 1, 0, 3]
TRAIN_COUNTS = [500, 50, 30, 5]  # many = {0}, medium = {1, 2}, few = {3}


def groups():
    g = shot_groups(TRAIN_COUNTS)
    assert g.membership == ("many", "medium", "medium", "few") and g.rule == "thresholds"
    return g


def test_confusion_matrix_entries():
    cm = confusion_matrix(torch.tensor(PREDS), torch.tensor(TARGETS), 4)
    assert cm.dtype == torch.int64
    expected = torch.tensor([[4, 1, 0, 0],
                             [0, 2, 1, 0],
                             [1, 0, 0, 1],
                             [0, 0, 0, 0]])
    assert torch.equal(cm, expected)
    assert int(cm.sum()) == len(TARGETS)


def test_per_class_accuracy_with_absent_class():
    acc = per_class_accuracy(PREDS, TARGETS, 4)
    assert acc.dtype == torch.float64
    assert acc[:3].tolist() == pytest.approx([80.0, 200 / 3, 0.0])
    assert math.isnan(acc[3].item())


def test_group_accuracy():
    acc = per_class_accuracy(PREDS, TARGETS, 4)
    g = group_accuracy(acc, groups())
    assert g["many"] == pytest.approx(80.0)
    assert g["medium"] == pytest.approx((200 / 3 + 0.0) / 2)
    assert g["few"] is None  # its only class has no test samples
    empty = group_accuracy(acc, ShotGroups(("many", "many", "medium", "medium")))
    assert empty["few"] is None
    assert empty["many"] == pytest.approx((80 + 200 / 3) / 2)
    assert empty["medium"] == pytest.approx(0.0)  # nan of class 3 ignored


def test_summarize_values_and_json():
    s = summarize(np.array(PREDS), np.array(TARGETS), groups())
    assert s["all"] == 60.0  # 6 / 10 samples
    assert s["balanced"] == round((80 + 200 / 3 + 0) / 3, 4) == 48.8889  # differs from overall accuracy
    assert s["many"] == 80.0 and s["medium"] == 33.3333 and s["few"] is None
    assert s["per_class"] == [80.0, 66.6667, 0.0, None]
    assert s["group_sizes"] == {"many": 1, "medium": 2, "few": 1}
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text) == s
    assert all(type(s[k]) is float for k in ("all", "many", "medium", "balanced"))


def test_torch_and_numpy_inputs_agree():
    g = groups()
    a = summarize(torch.tensor(PREDS), torch.tensor(TARGETS), g)
    b = summarize(np.array(PREDS, dtype=np.int32), np.array(TARGETS, dtype=np.int64), g)
    assert a == b


def test_perfect_predictions():
    t = torch.arange(4).repeat(3)
    s = summarize(t, t, groups())
    assert s["all"] == s["balanced"] == s["many"] == s["medium"] == s["few"] == 100.0


def test_validation_errors():
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0, 1, 2], 4)  # length mismatch
    with pytest.raises(ValueError):
        confusion_matrix([0, 4], [0, 1], 4)  # pred out of range
    with pytest.raises(ValueError):
        per_class_accuracy([0, 1], [-1, 1], 4)  # target out of range
    with pytest.raises(ValueError):
        summarize([0, 1, 2, 5], [0, 1, 2, 3], groups())
    with pytest.raises(ValueError):
        group_accuracy(torch.zeros(3), groups())  # wrong number of classes
