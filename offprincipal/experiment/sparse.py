"""Sparse fine-tuning with a fixed mask built once from the base weights: the paper's sparse-FT contrast.

For every linear weight W0 (m×n) and mask density α (default ½), with Π_α the principal-weight mask (top-α entries
of |rank-k reconstruction of W0|, :func:`offprincipal.metrics.principal_weight_mask`) and Λ_α the low-magnitude mask
(bottom-α of |W0|, :func:`offprincipal.metrics.low_magnitude_mask`):

- ``principal``: Π_α — the principal weights only (what SFT-era methods target);
- ``safe``: Λ_α ∪ ¬Π_α — low-magnitude or non-principal weights (≈ 74% of the entries in the paper);
- ``random``: a uniformly random mask with, per weight, the same number of entries as the safe mask.

:class:`SparseMaskCallback` applies the masks in a transformers Trainer through gradient hooks, g ← g ⊙ M, so
gradient clipping sees the masked gradient and Adam's moments of a masked entry stay exactly zero (its update is
0 / (0 + ε) = 0). Decoupled weight decay would still move masked entries, so it must be 0. Parameters outside the
masks (embeddings, norms, the output head) train freely, as in full fine-tuning.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from transformers import TrainerCallback

from ..metrics import linear_weights, low_magnitude_mask, principal_weight_mask
from ..subspace import compute_subspaces

MASK_KINDS = ("principal", "safe", "random")


def sparse_masks(
    weights: Mapping[str, torch.Tensor], kind: str, top_k: int, alpha: float = 0.5, seed: int = 0, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Boolean masks (True = trainable), one per weight of ``weights`` (name → (m, n)), of the given ``kind``."""
    if kind not in MASK_KINDS:
        raise ValueError(f"sparse mask kind must be one of {MASK_KINDS}, got {kind!r}")
    subspaces = compute_subspaces(weights, top_k, progress=progress)
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, w0 in weights.items():
        principal = principal_weight_mask(subspaces[name], alpha).cpu()
        if kind == "principal":
            masks[name] = principal
            continue
        safe = low_magnitude_mask(w0, alpha).cpu() | ~principal
        if kind == "safe":
            masks[name] = safe
            continue
        flat = torch.zeros(safe.numel(), dtype=torch.bool)
        flat[torch.randperm(safe.numel(), generator=generator)[: int(safe.sum())]] = True
        masks[name] = flat.view(safe.shape)
    return masks


def mask_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of True entries over all masks."""
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def _masked_parameters(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]):
    """(module name, weight parameter) of every module that has a mask."""
    for name in masks:
        yield name, model.get_submodule(name).weight


class SparseMaskCallback(TrainerCallback):
    """Restricts full fine-tuning to a fixed :func:`sparse_masks` mask of the linear weights (built at train begin
    from the model's weights, which are then the base weights). ``masks`` holds them afterwards, on CPU."""

    def __init__(self, kind: str, top_k: int, alpha: float = 0.5, seed: int = 0):
        if kind not in MASK_KINDS:
            raise ValueError(f"SparseMaskCallback: kind must be one of {MASK_KINDS}, got {kind!r}")
        self.kind, self.top_k, self.alpha, self.seed = kind, top_k, alpha, seed
        self.masks: Optional[dict[str, torch.Tensor]] = None
        self._handles: list = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.weight_decay:
            raise ValueError(
                f"SparseMaskCallback: weight_decay={args.weight_decay} would move masked weights (decoupled decay "
                "ignores the gradient); set weight_decay=0"
            )
        if self.masks is not None:  # a second train() call keeps the masks of the base weights
            return
        self.masks = sparse_masks(linear_weights(model), self.kind, self.top_k, self.alpha, self.seed)
        for name, param in _masked_parameters(model, self.masks):
            # the parameter's own layout: GPT-2's Conv1D stores the (out, in) matrix transposed
            mask = self.masks[name] if param.shape == self.masks[name].shape else self.masks[name].T
            keep = mask.to(param.device)
            self._handles.append(param.register_hook(lambda grad, keep=keep: grad.masked_fill(~keep, 0)))

    def trainable_entries(self, model: torch.nn.Module) -> int:
        """Parameters the optimizer can change: the masks' True entries plus every trainable parameter outside them."""
        masked = {id(p) for _, p in _masked_parameters(model, self.masks or {})}
        free = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in masked)
        return free + sum(int(m.sum()) for m in (self.masks or {}).values())

    def remove(self) -> None:
        """Detach the gradient hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
