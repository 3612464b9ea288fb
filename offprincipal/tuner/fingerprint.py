"""Which base an adapter was trained on.

An OffPrincipal adapter's ΔW depends on its base twice: through the base output it adds to, and through the
principal bases U, V, which are not saved with the adapter but recomputed from the base weights on load. The
same factors on another base (even a bf16 copy of the same one) give another ΔW. So the adapter records, in
``adapter_config.json``, ``base_fingerprint``: one BLAKE2b-128 digest over the per-weight fingerprints
(:func:`offprincipal.subspace.fingerprint`: dtype, shape and bytes) of every weight it targets, taken when the
adapter is created. Injecting it again (``PeftModel.from_pretrained``, ``load_adapter``) compares the digest with
the live weights: a mismatch warns, or raises ``ValueError`` when strict (see :func:`strict_base`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Mapping, Optional

from torch import nn

from ..subspace import fingerprint

STRICT_ENV = "OFFPRINCIPAL_STRICT_BASE"


def stored_weight(module: nn.Module):
    """The base weight of a targeted layer as stored (the unmerged one for a merged OffPrincipal layer)."""
    from .layer import OffPrincipalLayer

    if isinstance(module, OffPrincipalLayer):
        return module.unmerged_base_weight()
    return module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight


def combine_fingerprints(fingerprints: Mapping[str, str]) -> str:
    """BLAKE2b-128 (32 hex digits) over the lines ``"{name}\t{fingerprint}\n"`` in name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(fingerprints):
        digest.update(f"{name}\t{fingerprints[name]}\n".encode())
    return digest.hexdigest()


def base_fingerprint(layers: Mapping[str, nn.Module]) -> Optional[str]:
    """:func:`combine_fingerprints` of :func:`~offprincipal.subspace.fingerprint` of each targeted layer's
    :func:`stored_weight`; ``None`` when a weight is on the meta device (nothing to fingerprint). With several
    ranks or ZeRO-3 partitioned weights the tuner takes rank 0's digest of the whole weights instead
    (:func:`offprincipal.distributed.bases_on_rank0`)."""
    weights = {name: stored_weight(module) for name, module in layers.items()}
    if any(w.device.type == "meta" for w in weights.values()):
        return None
    return combine_fingerprints({name: fingerprint(w) for name, w in weights.items()})


def strict_base(config) -> bool:
    """Refuse (True) or warn (False) on a base mismatch: ``$OFFPRINCIPAL_STRICT_BASE`` = ``1`` / ``0`` when set,
    else the config's ``strict_base`` (saved with the adapter; ``PeftModel.from_pretrained(..., strict_base=True)``
    overrides the saved value)."""
    env = os.environ.get(STRICT_ENV, "").strip()
    if env not in ("", "0", "1"):
        raise ValueError(f"{STRICT_ENV} must be 1 (refuse a different base) or 0 (warn), got {env!r}")
    return env == "1" if env else bool(config.strict_base)


def check_base_fingerprint(current: Optional[str], n_layers: int, config, adapter_name: str) -> None:
    """Record the base digest ``current`` (:func:`base_fingerprint` of the ``n_layers`` targeted layers) on a new
    adapter (``config.base_fingerprint`` is None); check it on one that has it."""
    if config.base_fingerprint is None:
        config.base_fingerprint = current
        return
    if current == config.base_fingerprint:
        return
    strict = strict_base(config)
    how = (
        f"strict_base=True or {STRICT_ENV}=1: refusing it. Load it onto the base it was trained on, or set "
        f"{STRICT_ENV}=0 to load it anyway"
        if strict
        else f"pass strict_base=True to PeftModel.from_pretrained (or set {STRICT_ENV}=1) to refuse this"
    )
    if current is None:
        message = (
            f"OffPrincipal adapter {adapter_name!r}: the base weights are on the meta device, so they cannot be "
            f"checked against the base the adapter was trained on ({how})"
        )
    else:
        message = (
            f"OffPrincipal adapter {adapter_name!r} was trained on a different base: the {n_layers} weights it "
            f"targets have base_fingerprint {current}, the adapter records {config.base_fingerprint}. Its principal "
            "bases are recomputed from these weights, so ΔW differs from the trained one (a copy of the same base "
            f"in another dtype counts as different) ({how})"
        )
    if strict:
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)
