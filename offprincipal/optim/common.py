"""Step plumbing both optimizers share: named parameter groups, state-dict shape checks, non-finite flags
(host and device) and their warnings, read-only views of the projection options."""

from __future__ import annotations

import warnings
from typing import Mapping, Optional

import torch

from ..distributed import comm_device
from ..options import ProjectionOptions
from .bases import check_unique_names
from .update import _local


class _ProjectionOptionsView:
    """Read-only shortcuts to the fields of ``self.options`` (a :class:`ProjectionOptions`) the step uses."""

    options: ProjectionOptions

    sides = property(lambda self: self.options.sides, doc="Which factors the projection keeps (``options.sides``).")
    backend = property(lambda self: self.options.backend, doc="``options.backend``.")
    precision = property(lambda self: self.options.precision, doc="``options.precision``.")



_NAMES_NEEDED = (
    "{owner} needs parameter names to find each weight's bases: pass model.named_parameters(), or param groups "
    "whose 'params' are (name, parameter) pairs"
)


def _named_params(param_groups: list[dict], owner: str) -> dict[str, torch.Tensor]:
    """{name: parameter} over all groups; refuses unnamed groups and repeated names."""
    for group in param_groups:
        if "param_names" not in group:
            raise ValueError(_NAMES_NEEDED.format(owner=owner))
    names = [name for group in param_groups for name in group["param_names"]]
    check_unique_names(owner, names)
    return dict(zip(names, (p for group in param_groups for p in group["params"])))


def _named_group(param_group: dict, owner: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A param group for ``add_param_group`` with its ``params`` as a list, and its {name: parameter}; refuses
    a group without names (its weights could not get bases)."""
    if not isinstance(param_group, Mapping):
        raise TypeError(f"{owner}.add_param_group takes a dict, got {type(param_group).__name__}")
    group = dict(param_group)
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    group["params"] = params
    if "param_names" in group:
        names = list(group["param_names"])
    elif params and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
        names = [name for name, _ in params]
    else:
        raise ValueError(
            _NAMES_NEEDED.format(owner=f"{owner}.add_param_group") + "; unnamed parameters would train without projection"
        )
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    check_unique_names(owner, names)
    return group, dict(zip(names, tensors))


_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param", "momentum_buffer", "square_avg",
                 "acc_delta", "sum", "grad_avg")


def check_state_fits(owner: str, param_groups: list[dict], state_dict: Mapping) -> None:
    """Refuse (``ValueError`` naming the first mismatch) a state dict whose groups, parameter counts, parameter
    names or per-parameter state shapes do not fit ``param_groups``. Runs before anything is loaded."""
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
        raise ValueError(f"{owner}: not an optimizer state dict (it needs 'state' and 'param_groups')")
    if len(groups) != len(param_groups):
        raise ValueError(f"{owner}: the saved state has {len(groups)} param groups, this optimizer {len(param_groups)}")
    by_index: dict = {}
    for g, (saved, live) in enumerate(zip(groups, param_groups)):
        if len(saved["params"]) != len(live["params"]):
            raise ValueError(
                f"{owner}: param group {g} of the saved state has {len(saved['params'])} parameters, this optimizer's "
                f"{len(live['params'])}: the state is from a different model or parameter selection"
            )
        names = live.get("param_names") or [f"parameter {i} of group {g}" for i in range(len(live["params"]))]
        saved_names = saved.get("param_names")
        if saved_names is not None and live.get("param_names") is not None and list(saved_names) != list(names):
            first = next(i for i, (a, b) in enumerate(zip(saved_names, names)) if a != b)
            raise ValueError(
                f"{owner}: param group {g} of the saved state names parameter {first} {saved_names[first]!r}, this "
                f"optimizer {names[first]!r}: the state is from a different model or parameter order"
            )
        by_index.update({index: (name, p) for index, name, p in zip(saved["params"], names, live["params"])})
    for index, entry in state.items():
        if index not in by_index or not isinstance(entry, Mapping):
            continue
        name, p = by_index[index]
        for key in _PARAM_SHAPED:
            t = entry.get(key)
            if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"{owner}: the saved {key!r} of {name!r} has shape {tuple(t.shape)}, the parameter here has shape "
                    f"{tuple(p.shape)}: the state is from a different model"
                )


def _finite_flags(tensors: list[torch.Tensor], sharded: Optional[bool] = None) -> list[bool]:
    """For each tensor, whether every entry is finite. Row shards (DTensors, or ``sharded=True``) are agreed over
    the ranks with one all-reduce. One host synchronisation for the whole list."""
    if not tensors:
        return []
    locals_ = [_local(t) for t in tensors]
    if sharded is None:
        sharded = any(loc is not t for loc, t in zip(locals_, tensors))
    device = comm_device() if sharded else locals_[0].device
    flags = torch.stack([torch.isfinite(loc).all().to(device) for loc in locals_]).to(torch.int32)
    if sharded:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    return [bool(f) for f in flags.tolist()]


def _finite_device_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    """For each tensor, 1 (int32) if every entry is finite, else 0: one batched max-|x| reduction
    (``torch._foreach_norm``, ord ∞, which propagates NaN and inf) on the tensors' device, no host
    synchronisation. Row shards (DTensors) are agreed over the ranks with one all-reduce (MIN) of the flags as
    a device tensor. An empty shard counts as finite."""
    locals_ = [_local(t) for t in tensors]
    sharded = any(loc is not t for loc, t in zip(locals_, tensors))
    device = locals_[0].device
    nonempty = [loc for loc in locals_ if loc.numel()]
    if len(nonempty) == len(locals_):
        flags = torch.isfinite(torch.stack(torch._foreach_norm(locals_, float("inf"), dtype=torch.float32)))
    else:
        norms = iter(torch._foreach_norm(nonempty, float("inf"), dtype=torch.float32) if nonempty else [])
        zero = torch.zeros((), device=device)
        flags = torch.isfinite(torch.stack([next(norms) if loc.numel() else zero for loc in locals_]))
    flags = flags.to(torch.int32)
    if sharded:
        comm = comm_device()
        flags = flags.to(comm)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        flags = flags.to(device)
    return flags


def _warn_nonfinite(owner: str, name: str, what: str) -> None:
    warnings.warn(
        f"{owner}: the update of {name!r} has non-finite entries (NaN or inf in its gradient); {what}. Projecting "
        "it would spread the NaN over the whole matrix. Lower the learning rate or clip gradients if it repeats.",
        RuntimeWarning, stacklevel=3,
    )
