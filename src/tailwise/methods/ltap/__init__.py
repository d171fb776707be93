"""LTAP (Long-Tailed Adaptive Pruner): five importance criteria per structured channel (:mod:`.criteria`), mixed
with weights from LT-Vote's per-class validation feedback (:mod:`.vote`, trial masks in :mod:`.trial`), pruned in
stages by the standalone :class:`LTAP` (:mod:`.pruner`), which the trainer drives through :class:`LTAPMethod`
(:mod:`.method`, ``method: ltap``)."""
from .criteria import CRITERIA, ChannelLayout, CriteriaAccumulator, mix, normalise
from .method import LTAPMethod
from .pruner import LTAP, PUBLIC_CODE_WEIGHTS, LTAPOptions
from .vote import LTVote, class_weights

__all__ = ["CRITERIA", "ChannelLayout", "CriteriaAccumulator", "mix", "normalise", "PUBLIC_CODE_WEIGHTS",
           "LTAP", "LTAPMethod", "LTAPOptions", "LTVote", "class_weights"]
