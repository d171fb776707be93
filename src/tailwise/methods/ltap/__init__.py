"""LTAP (Long-Tailed Adaptive Pruner): five importance criteria per structured channel (:mod:`.criteria`),
mixed with weights from LT-Vote's per-class validation feedback (:mod:`.vote`), pruned on the shared multi-stage
schedule (:mod:`.pruner`, ``method: ltap``)."""
from .criteria import CRITERIA, ChannelLayout, CriteriaAccumulator, mix, normalise
from .pruner import PUBLIC_CODE_WEIGHTS, LTAPOptions, LTAPPruning
from .vote import LTVote, class_weights

__all__ = ["CRITERIA", "ChannelLayout", "CriteriaAccumulator", "mix", "normalise", "PUBLIC_CODE_WEIGHTS",
           "LTAPOptions", "LTAPPruning", "LTVote", "class_weights"]
