"""Recovery after conversion: train a converted model's projections back towards the source model.

layerwise  per layer, fit the chosen projections so the converted attention layer's output matches
           the source layer's on calibration inputs (no end-to-end pass; fits cached per layer)
finetune   end-to-end causal-LM training on the train split with transformers' `Trainer`,
           optionally distilling the source model's logits, optionally through merged LoRA
Importing this package registers both; a new method is one module with `@register_recovery`.
"""

from objectives.recovery.base import (
    PROJECTIONS,
    RECOVERIES,
    RecoveryDivergedError,
    RecoveryMethod,
    RecoveryResult,
    get_recovery,
    recover,
    recovery_config,
    register_recovery,
)
from objectives.recovery.finetune import FinetuneConfig, finetune
from objectives.recovery.layerwise import (
    LayerFit,
    LayerFitCache,
    LayerwiseConfig,
    fit_layer,
    layerwise,
)

__all__ = [
    "PROJECTIONS",
    "RECOVERIES",
    "FinetuneConfig",
    "LayerFit",
    "LayerFitCache",
    "LayerwiseConfig",
    "RecoveryDivergedError",
    "RecoveryMethod",
    "RecoveryResult",
    "finetune",
    "fit_layer",
    "get_recovery",
    "layerwise",
    "recover",
    "recovery_config",
    "register_recovery",
]
