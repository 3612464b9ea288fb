"""Off-principal optimizers for full-parameter training.

Every update of a projected weight W (m×n, a 2-D parameter with top-k bases U (m×k), V (n×k) of its value at
construction) is kept off W's principal subspace:

    W ← W − P(Δ),   P(Δ) = (I − UUᵀ) Δ (I − VVᵀ)   (sides="both"; "left"/"right" keep one factor)

The *update* Δ is projected, not the gradient: Adam's elementwise scaling would move a projected gradient back
into the principal subspace.

- :class:`OffPrincipalAdamW`: torch AdamW's arithmetic with Δ = lr·(m̂/(√v̂+ε) + wd·W), the whole AdamW update
  including the decoupled weight decay. Parameters that are not projected (not 2-D, not floating point, frozen
  at construction, excluded by name — embeddings and the LM head by default, see :data:`DEFAULT_EXCLUDE`) step
  exactly as ``torch.optim.AdamW`` (its own functional code is called for them).
- :class:`OffPrincipalOptimizer`: wraps any torch optimizer; Δ = W_before − W_after of the base step.
- :func:`adamw_update_`: the one projected-AdamW update function (torch reference and Triton dispatch).

State dicts keep torch's layout (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) plus one
top-level ``"offprincipal"`` entry of plain metadata (sides, and per projected weight the fingerprint of the
weight the bases came from, k and the SVD method). Loading it into an optimizer constructed from *trained*
weights fetches the original bases from the subspace cache, so a resumed run follows the same trajectory.

What is checked (nothing is trusted because of its name or key):

- bases given by the user (``subspaces=``) and bases named by a saved state are certified against the live
  weights (:func:`offprincipal.subspace.certify_subspace`, top-k tolerance :data:`TRAINED_TOPK_TOL`) and
  refused with :class:`~offprincipal.subspace.SubspaceMismatch` when they do not fit; fingerprints in a saved
  state are validated as data (32 hex digits), so no file outside the cache folder is ever read;
- ``load_state_dict`` checks param groups, parameter counts, names and per-parameter state shapes before
  anything is loaded; a refused state leaves the optimizer as it was;
- parameter names are unique; ``add_param_group`` takes named parameters only and gives them bases;
- non-finite updates: a projected matrix whose gradient has a NaN or inf entry does not step (a
  ``RuntimeWarning`` names it; weight, moments and step count stay as they were), since projecting a NaN
  update would spread it over the whole matrix. The check and the skip run on the device (no host
  synchronisation in ``step()``); on CUDA the warning comes at a later step or from ``report_nonfinite()``.
  ``OffPrincipalAdamW(capturable=True)``: the step can be captured in a CUDA graph (device step counts, torch's
  capturable AdamW for unprojected parameters, no host read or host allocation; skips are counted on the device and
  reported by ``report_nonfinite()`` only).
  Unprojected parameters follow torch AdamW (entrywise).

Modules: :mod:`.update` (the update function), :mod:`.bases` (:class:`PrincipalBases`, shared by both optimizers),
:mod:`.common` (step plumbing both share), :mod:`.adamw`, :mod:`.wrapper`.
"""

from ..options import DEFAULT_EXCLUDE
from .adamw import OffPrincipalAdamW
from .bases import TRAINED_TOPK_TOL, PrincipalBases
from .update import adam_scalars, adamw_update_
from .wrapper import OffPrincipalOptimizer

__all__ = [
    "DEFAULT_EXCLUDE",
    "OffPrincipalAdamW",
    "OffPrincipalOptimizer",
    "PrincipalBases",
    "TRAINED_TOPK_TOL",
    "adam_scalars",
    "adamw_update_",
]
