"""OffPrincipal: keep RLVR fine-tuning updates off the principal singular directions of pretrained weights."""

from . import metrics
from .metrics import compare_weights, linear_weights
from .models import ensure_default_model, load_model
from .tasks import evaluate_accuracy, get_task

from .optim import DEFAULT_EXCLUDE, OffPrincipalAdamW, OffPrincipalOptimizer
from .projection import principal_leak, project, project_, project_list
from .tuner import OffPrincipalConfig, OffPrincipalModel, max_principal_leak, save_as_lora, to_lora
from .trainer import (
    OffPrincipalCallback,
    OffPrincipalDiagnosticsCallback,
    OffPrincipalTrainerMixin,
    offprincipal_trainer,
)
from .subspace import Subspace, captured_energy, compute_subspaces, resolve_top_k, top_k_subspace

__all__ = [
    "compare_weights",
    "ensure_default_model",
    "evaluate_accuracy",
    "get_task",
    "linear_weights",
    "load_model",
    "metrics",
    "OffPrincipalCallback",
    "OffPrincipalDiagnosticsCallback",
    "OffPrincipalTrainerMixin",
    "offprincipal_trainer",
    "DEFAULT_EXCLUDE",
    "OffPrincipalAdamW",
    "OffPrincipalOptimizer",
    "project_",
    "OffPrincipalConfig",
    "OffPrincipalModel",
    "save_as_lora",
    "to_lora",
    "Subspace",
    "captured_energy",
    "compute_subspaces",
    "max_principal_leak",
    "principal_leak",
    "project",
    "project_list",
    "resolve_top_k",
    "top_k_subspace",
]
__version__ = "0.1.0"
