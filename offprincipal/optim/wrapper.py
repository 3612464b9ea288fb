"""``OffPrincipalOptimizer``: any torch optimizer, its update of each projected weight kept off-principal."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..integrations.deepspeed import flattened_error
from ..options import ProjectionOptions
from ..projection import project_
from .bases import BasesInput, PrincipalBases, check_unique_names
from .common import _ProjectionOptionsView, _finite_flags, _named_group, _warn_nonfinite, check_state_fits


# ---------------------------------------------------------------------------------------------------------------
# OffPrincipalOptimizer: any base optimizer


def _delegated(attr: str) -> property:
    """A property read from and written to the wrapped optimizer's attribute of the same name."""
    return property(lambda self: getattr(self.optimizer, attr), lambda self, value: setattr(self.optimizer, attr, value))


class OffPrincipalOptimizer(_ProjectionOptionsView, torch.optim.Optimizer):
    """Makes the update of any torch optimizer exact off-principal: after the base step,
    ``W ← W_before − P(W_before − W_after)`` for every projected weight.

    It installs a step pre-hook (snapshot of the projected weights) and post-hook (projection) on
    ``base_optimizer``, so the projection happens whoever calls ``base_optimizer.step()`` (a Trainer, accelerate,
    an LR scheduler's wrapper); this object also behaves as the optimizer itself (``step``, ``zero_grad``,
    ``param_groups``, ``state_dict`` … delegate to the base). :meth:`remove` detaches the hooks.

    Memory: the snapshot holds one copy of every projected weight that has a gradient, in its dtype, during
    the step (1× those weights: e.g. 2 bytes/param for bf16), plus one fp32 matrix at a time for Δ. Parameters
    whose ``grad`` is None are assumed unchanged by the base step (true for torch's optimizers).
    For bf16/fp16 weights the base optimizer has already rounded W_after; Δ is exact in fp32 and the result is
    rounded once more, so the stored weights leak by their rounding, as in :class:`OffPrincipalAdamW`.

    Names: taken from ``named_parameters`` (matched by identity at construction), else from the base optimizer's
    ``param_names`` (when it was built from named parameters); each name once. ``add_param_group`` takes named
    parameters and gives them bases. A projected weight whose update Δ has a non-finite entry is restored to
    its value before the step, with a ``RuntimeWarning`` (the base optimizer's own state has already stepped).
    That check reads one flag per weight back to the host, so the wrapped step cannot be captured in a CUDA graph
    (``OffPrincipalAdamW(capturable=True)`` can).

    ``options`` / ``**projection_kwargs`` and ``subspaces``: as in :class:`OffPrincipalAdamW` (validated before the
    base optimizer is touched).
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        named_parameters: Optional[Iterable[tuple[str, torch.Tensor]]] = None,
        *,
        options: Optional[ProjectionOptions] = None,
        subspaces: Optional[BasesInput] = None,
        **projection_kwargs,
    ):
        options = ProjectionOptions.resolve("OffPrincipalOptimizer", options, projection_kwargs)
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"OffPrincipalOptimizer wraps a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        self.optimizer = base_optimizer
        self.options = options
        self._positions = self._names_by_position(base_optimizer, named_parameters)
        named = {name: base_optimizer.param_groups[g]["params"][i] for (g, i), name in self._positions.items()}
        self.bases = PrincipalBases.build("OffPrincipalOptimizer", named, options, subspaces)
        self._before: dict[tuple[int, int], torch.Tensor] = {}
        self._handles = [
            base_optimizer.register_step_pre_hook(self._snapshot),
            base_optimizer.register_step_post_hook(self._project),
        ]

    @staticmethod
    def _names_by_position(base, named_parameters) -> dict[tuple[int, int], str]:
        if named_parameters is not None:
            pairs = list(named_parameters)
            check_unique_names("OffPrincipalOptimizer", [name for name, _ in pairs])
            by_id = {id(p): name for name, p in pairs}
            return {
                (g, i): by_id[id(p)]
                for g, group in enumerate(base.param_groups) for i, p in enumerate(group["params"]) if id(p) in by_id
            }
        if all("param_names" in group for group in base.param_groups):
            positions = {
                (g, i): name for g, group in enumerate(base.param_groups) for i, name in enumerate(group["param_names"])
            }
            check_unique_names("OffPrincipalOptimizer", list(positions.values()))
            return positions
        raise ValueError(
            "OffPrincipalOptimizer needs the parameter names: pass named_parameters=model.named_parameters(), or "
            "build the base optimizer from model.named_parameters()"
        )

    def _projected(self):
        for (g, i), name in self._positions.items():
            if name in self.bases:
                params = self.optimizer.param_groups[g]["params"]
                if i >= len(params):
                    raise flattened_error("OffPrincipalOptimizer", name)
                yield (g, i), name, params[i]

    @torch.no_grad()
    def _snapshot(self, optimizer, args, kwargs) -> None:
        self._before = {
            pos: self.bases.local(name, p)[0].local.clone() for pos, name, p in self._projected() if p.grad is not None
        }

    @torch.no_grad()
    def _project(self, optimizer, args, kwargs) -> None:
        before, self._before = self._before, {}
        for pos, name, p in self._projected():
            if pos not in before:
                continue
            shard, U, V = self.bases.local(name, p)
            old = before.pop(pos).float()
            delta = old - shard.local.float()
            if not _finite_flags([delta], sharded=shard.all_reduce is not None)[0]:
                _warn_nonfinite("OffPrincipalOptimizer", name, "the weight is restored (the base optimizer's own state "
                                "has taken the step)")
                shard.local.copy_(old)
                continue
            project_(delta, U, V, self.sides, backend=self.backend, all_reduce=shard.all_reduce, precision=self.precision)
            shard.local.copy_(old.sub_(delta))

    def remove(self) -> None:
        """Detach the hooks: the base optimizer steps unprojected again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # delegation to the base optimizer
    param_groups = _delegated("param_groups")
    state = _delegated("state")
    defaults = _delegated("defaults")

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of *named* parameters (``(name, tensor)`` pairs) to the base optimizer; its eligible
        weights get bases by the construction's rules, computed now. Unnamed parameters and names already
        present are refused."""
        param_group, named = _named_group(param_group, "OffPrincipalOptimizer")
        check_unique_names("OffPrincipalOptimizer", list(self.bases.params) + list(named))
        if not all("param_names" in group for group in self.optimizer.param_groups):  # torch: all named or none
            param_group = {k: v for k, v in param_group.items() if k != "param_names"}
            param_group["params"] = list(named.values())
        self.optimizer.add_param_group(param_group)
        g = len(self.optimizer.param_groups) - 1
        try:
            self.bases.extend(named)
        except Exception:
            self.optimizer.param_groups.pop()
            raise
        self._positions.update({(g, i): name for i, name in enumerate(named)})

    def register_step_pre_hook(self, hook):
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        return self.optimizer.register_step_post_hook(hook)

    def state_dict(self) -> dict:
        """The base optimizer's state dict plus the ``"offprincipal"`` metadata entry."""
        sd = self.optimizer.state_dict()
        sd["offprincipal"] = {"sides": self.sides, "bases": self.bases.metadata()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """The base optimizer's state plus the bases it was trained with, checked first as in
        :meth:`OffPrincipalAdamW.load_state_dict` (groups, parameter counts, names, state shapes, certified bases)."""
        meta = state_dict.get("offprincipal")
        check_state_fits("OffPrincipalOptimizer", self.optimizer.param_groups, state_dict)
        if meta is not None:
            if meta.get("sides", self.sides) != self.sides:
                raise ValueError(f"the saved state used sides={meta['sides']!r}, this optimizer sides={self.sides!r}")
            live = {name: self.optimizer.param_groups[g]["params"][i] for (g, i), name in self._positions.items()}
            self.bases.reconcile(meta.get("bases"), live)
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "offprincipal"})

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"OffPrincipalOptimizer(sides={self.sides!r}, projected={len(self.bases)}, base={self.optimizer!r})"
