"""GeoRA (Zhang et al., "GeoRA: Geometry-Aware Low-Rank Adaptation for RLVR", arXiv 2601.09361, ACL 2026) built on
PEFT's LoRA: a peer of OffPrincipal in the method registry (``--method geora``).

The paper publishes no code; this is the method as its text describes it, with every choice it leaves open stated.
For each targeted linear weight W0 (m×n, (out, in)), rank r, LoRA scaling s = lora_alpha / r:

1. **Spectral prior** (non-principal weights): M_spec = ¬Π_α, where Π_α marks the top-α fraction of the entries of
   |U_k S_k V_kᵀ| (the rank-k reconstruction of W0, k = ``top_k``; :func:`offprincipal.metrics.principal_weight_mask`,
   the principal-weight mask of "The Path Not Taken", arXiv 2511.08567, that GeoRA builds on).
2. **Euclidean prior** (low-magnitude weights): M_euc = Λ_α, the bottom-α fraction of |W0|
   (:func:`offprincipal.metrics.low_magnitude_mask`).
3. **Combined**: M = M_spec ∪ M_euc (an entry is kept when either prior admits it) — the "safe" mask of the sparse
   baselines (:func:`offprincipal.experiment.sparse.sparse_masks` with ``kind="safe"``; ≈ 74% of the entries in the
   paper that defines it). Choice: the paper says the two priors are *fused*; the union is the RLVR-safe set of the
   paper it cites, so we take it rather than the intersection.
4. **Initialisation**: W_geo = W0 ⊙ M, its top-r SVD W_geo ≈ P_r Σ_r Q_rᵀ (exact fp32 SVD), split symmetrically as
   PiSSA does: B0 = P_r Σ_r^{1/2} / √s (m×r), A0 = Σ_r^{1/2} Q_rᵀ / √s (r×n), so that s·B0A0 = P_r Σ_r Q_rᵀ.
5. **Residual frozen**: the base weight is replaced by W_res = W0 − s·B0A0 (fp32 arithmetic, stored in the base
   weight's dtype), so the model at initialisation equals the base to that rounding; A and B are trained, W_res is not.
   Under bf16 autocast the two terms W_res·x and s·B0(A0·x) are each computed in bf16, so the model at init differs
   from the base by bf16 rounding of a term as large as the top-r part of W_geo (as with PiSSA). Because A0, B0 are
   large (‖row i of A0‖ = √(σ_i/s)), an optimizer step moves ΔW = s·BA much more than it moves a LoRA that starts at
   B = 0: the rate that suits LoRA is not necessarily GeoRA's (the registry gives it LoRA's rate family).

Choices where the paper is vague: α = ½ for both masks (the sparse baselines' density), k = the run's ``--top-k``
(32 in the suites), union for the fusion, the symmetric √Σ split and the SVD of the *masked* weight (not of
W0 restricted afterwards); the LoRA rate family (GeoRA trains LoRA factors). Like PiSSA, the adapter is relative to a
rewritten base, so a run saves the merged model (``Method.merges_base``); TRL's reference policy under
``disable_adapter()`` would be W_res, not W0 (the suites run GRPO with β = 0, which has no reference policy).

Use: ``geora_init(get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear")), top_k=32)``
before training, or :class:`GeoRACallback` inside a Trainer (it runs :func:`geora_init` at ``on_train_begin``,
before the first step; the optimizer's parameters are rewritten in place).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from transformers import TrainerCallback

from ..subspace import weight_matrix
from .sparse import sparse_masks

GEORA_ALPHA = 0.5  # density of each prior's mask


def _lora_layers(model, adapter_name: str) -> dict:
    from peft.tuners.lora import LoraLayer

    root = model.get_base_model() if hasattr(model, "get_base_model") else model  # names as in the base model
    layers = {name: m for name, m in root.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    if not layers:
        raise ValueError(f"geora_init: the model has no LoRA layer with adapter {adapter_name!r}; wrap it with "
                         "peft.get_peft_model(model, LoraConfig(...)) first")
    return layers


def geora_masks(weights: Mapping[str, torch.Tensor], top_k: int, alpha: float = GEORA_ALPHA,
                progress: bool = False) -> dict[str, torch.Tensor]:
    """M = ¬Π_α ∪ Λ_α per weight (name → (out, in) weight): True where GeoRA's geometry-constrained matrix keeps W0."""
    return sparse_masks(weights, "safe", top_k, alpha=alpha, progress=progress)


@torch.no_grad()
def geora_factors(weight: torch.Tensor, mask: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r×n), B0 (m×r)) in fp32 with scaling·B0A0 = the best rank-r approximation of ``weight ⊙ mask``."""
    masked = weight.detach().float() * mask.to(weight.device)
    P, sigma, Qh = torch.linalg.svd(masked, full_matrices=False)
    root = (sigma[:r] / scaling).sqrt()
    return root[:, None] * Qh[:r], P[:, :r] * root[None, :]


@torch.no_grad()
def geora_init(model, top_k: int, alpha: float = GEORA_ALPHA, adapter_name: str = "default",
               progress: bool = True) -> dict[str, torch.Tensor]:
    """Initialise every LoRA layer of ``model`` (a PEFT model) as GeoRA (module docstring): A, B from the top-r SVD of
    the masked weight, the base weight replaced by the residual. Returns the masks (module name in the base model → bool (out, in))."""
    layers = _lora_layers(model, adapter_name)
    weights = {name: weight_matrix(layer.get_base_layer()).detach() for name, layer in layers.items()}
    masks = geora_masks(weights, top_k, alpha, progress)
    for name, layer in layers.items():
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        scaling = layer.scaling[adapter_name]
        A0, B0 = geora_factors(weights[name], masks[name], A.shape[0], scaling)
        A.copy_(A0.to(A))
        B.copy_(B0.to(B))
        base = layer.get_base_layer().weight
        residual = weights[name].float() - scaling * (B0 @ A0)
        base.copy_((residual if base.shape == residual.shape else residual.T).to(base.dtype))
    return masks


class GeoRACallback(TrainerCallback):
    """Runs :func:`geora_init` on the Trainer's (LoRA) model at the start of training, once."""

    def __init__(self, top_k: int, alpha: float = GEORA_ALPHA):
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"GeoRACallback: top_k must be an int ≥ 1, got {top_k!r}")
        if not 0.0 < alpha < 1.0 or math.isnan(alpha):
            raise ValueError(f"GeoRACallback: alpha must lie in (0, 1), got {alpha!r}")
        self.top_k, self.alpha, self.masks = top_k, alpha, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.masks is None:
            self.masks = geora_init(model, self.top_k, self.alpha)
