"""OffPrincipal: keep RLVR fine-tuning updates off the principal singular directions of pretrained weights.

The root namespace is the library: the PEFT adapter, the optimizers and their options, the Trainer callbacks, the
projection, the subspace API and the paper's metrics (:mod:`offprincipal.metrics`; live ones in
:mod:`offprincipal.diagnostics`).
Importing it registers the PEFT method (PEFT requires that) and nothing else: no ``torch.optim`` hook (the adapter
registers its own when its first layer is created). Experiment helpers live in their modules:
:mod:`offprincipal.experiment.models` (``load_model``, ``ensure_default_model``), :mod:`offprincipal.experiment.tasks` (``get_task``,
``evaluate_accuracy``).
"""

from . import metrics
from .optim import OffPrincipalAdamW, OffPrincipalOptimizer
from .options import DEFAULT_EXCLUDE, ProjectionOptions
from .projection import principal_leak, project, project_, project_list
from .subspace import Subspace, captured_energy, certify_subspace, compute_subspaces, resolve_top_k, top_k_subspace
from .trainer import (
    OffPrincipalCallback,
    OffPrincipalDiagnosticsCallback,
    OffPrincipalTrainerMixin,
    offprincipal_trainer,
)
from .tuner import OffPrincipalConfig, OffPrincipalModel, max_principal_leak, save_as_lora, to_lora

__all__ = [
    # adapter (PEFT method)
    "OffPrincipalConfig",
    "OffPrincipalModel",
    "max_principal_leak",
    "save_as_lora",
    "to_lora",
    # optimizers
    "DEFAULT_EXCLUDE",
    "OffPrincipalAdamW",
    "OffPrincipalOptimizer",
    "ProjectionOptions",
    # Trainer glue
    "OffPrincipalCallback",
    "OffPrincipalDiagnosticsCallback",
    "OffPrincipalTrainerMixin",
    "offprincipal_trainer",
    # projection
    "principal_leak",
    "project",
    "project_",
    "project_list",
    # subspaces
    "Subspace",
    "captured_energy",
    "certify_subspace",
    "compute_subspaces",
    "resolve_top_k",
    "top_k_subspace",
    # the paper's metrics
    "metrics",
]
__version__ = "0.1.0"
