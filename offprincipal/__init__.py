"""OffPrincipal: keep RLVR fine-tuning updates off the principal singular directions of pretrained weights."""

from .projection import principal_leak, project, project_list
from .subspace import Subspace, captured_energy, compute_subspaces, resolve_top_k, top_k_subspace

__all__ = [
    "Subspace",
    "captured_energy",
    "compute_subspaces",
    "principal_leak",
    "project",
    "project_list",
    "resolve_top_k",
    "top_k_subspace",
]
__version__ = "0.1.0"
