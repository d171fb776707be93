"""Neuron growth and removal during training (Sakai & Hotta 2025, arXiv 2507.09940; ``002_…``).

- :mod:`.options`: :class:`PlasticityOptions` and the event schedule;
- :mod:`.growth`: the standalone :class:`Plasticity` (``observe`` / ``event``), usable in any training loop;
- :mod:`.surgery`: one event's in-place edit of a channel group (copy, fresh BN, split, scaling, momentum);
- :mod:`.twins`: the twin diagnostic (channels that duplicate another, effective width);
- :mod:`.method`: :class:`PlasticityMethod`, the trainer's ``method: plasticity`` adapter.
"""
from .growth import Plasticity, class_weights
from .method import PlasticityMethod
from .options import PlasticityOptions
from .twins import twin_report

__all__ = ["Plasticity", "PlasticityMethod", "PlasticityOptions", "class_weights", "twin_report"]
