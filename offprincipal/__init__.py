"""OffPrincipal: keep RLVR fine-tuning updates off the principal singular directions of pretrained weights."""

from .projection import principal_leak, project, project_list
from .tuner import OffPrincipalConfig, OffPrincipalModel, max_principal_leak, save_as_lora, to_lora
from .subspace import Subspace, captured_energy, compute_subspaces, resolve_top_k, top_k_subspace

__all__ = [
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
