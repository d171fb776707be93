"""DO (Decoupled Optimisation, Cong et al. AAAI 2024, ``seeds/003_…``): the standalone pieces and the trainer
adapter ``method: do`` (:class:`DOMethod`, registered on import).

- :mod:`.plan`: the stages, their epochs, learning rates, ratios and samplers;
- :mod:`.loss`: the compensation loss (Eqs. 2-3);
- :mod:`.schedule`: the gradual pruning schedule (Eq. 4) and γ_best;
- :mod:`.masks`: which entries are decoupled, free, frozen or being pruned;
- :mod:`.decoupler`: :class:`Decoupler` (score, prune, freeze, sub-model state);
- :mod:`tailwise.methods.batchnorm`: a sub-model's BatchNorm statistics recomputed;
- :mod:`.batches`: the batches drawn outside the training loop (scores, evaluation; the training batches of the
  retraining and the statistics: :mod:`tailwise.methods.batches`);
- :mod:`tailwise.models.ensemble`: :class:`SubModelEnsemble` and its aggregations; :mod:`.report`: the deployed
  ensembles and the end-of-run report;
- :mod:`.adapter`: :class:`DOMethod` and :class:`DOOptions`.
"""
from ...models.ensemble import SubModelEnsemble
from .adapter import DOMethod, DOOptions
from ..batchnorm import recompute_batchnorm
from .decoupler import Decoupler
from .schedule import pruning_ratios

__all__ = ["Decoupler", "DOMethod", "DOOptions", "SubModelEnsemble", "pruning_ratios", "recompute_batchnorm"]
