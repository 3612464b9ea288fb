"""``OffPrincipalAdamW``: torch AdamW whose whole update of each projected weight is kept off-principal."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import _get_scalar_dtype

from ..integrations.deepspeed import flattened_error
from ..options import ProjectionOptions
from ..projection import resolve_backend
from .bases import BasesInput, PrincipalBases, check_unique_names
from .common import _ProjectionOptionsView, _finite_device_flags, _named_group, _named_params, _warn_nonfinite, check_state_fits
from .update import _local, adamw_update_


# ---------------------------------------------------------------------------------------------------------------
# OffPrincipalAdamW


class OffPrincipalAdamW(_ProjectionOptionsView, torch.optim.AdamW):
    r"""AdamW whose whole update of each projected 2-D weight stays off the weight's top-k singular subspace.

    Constructed like ``torch.optim.AdamW`` but from *named* parameters — ``model.named_parameters()``, or param
    groups whose ``"params"`` are ``(name, tensor)`` pairs — because bases are found again by name.

    Args (beyond AdamW's ``lr, betas, eps, weight_decay, maximize, foreach, fused``; ``amsgrad`` is refused):
        options: a :class:`~offprincipal.options.ProjectionOptions` (default: its defaults): ``top_k``,
            ``top_k_pattern`` (k per weight, see :func:`offprincipal.subspace.resolve_top_k`), ``sides`` (in the
            parameter's stored (out, in) layout), ``exclude`` (regexes of parameter names that step as plain
            AdamW, default :data:`DEFAULT_EXCLUDE`), ``svd_method``, ``cache_dir``, ``backend`` (``"auto"``: fused
            Triton step for CUDA params, torch elsewhere), ``precision`` (fp32 product precision of the
            projection, see ``offprincipal._sides``) and ``progress``.
        **projection_kwargs: the same fields as keywords (``top_k=8, sides="left"``); with ``options`` they
            replace its fields. An unknown keyword raises ``TypeError``; every value is validated before any
            parameter is touched (with several ranks, on every rank, before any collective).
        subspaces: precomputed bases ``{name: Subspace or (U, V)}``; exactly these weights are projected. They
            are certified against the parameters' current values (a ``(U, V)`` pair gets S = diag(Uᵀ W V));
            bases that are not a top-k singular basis of the weight are refused. Otherwise bases are computed from the parameters' current values (the pretrained weights) with the
            subspace bank (``svd_method``, ``cache_dir``); with several ranks, on rank 0 and broadcast.
        master_weights: keep an fp32 copy (``state["master_param"]``) and fp32 moments for every bf16/fp16
            parameter; the step runs on the copy, which stays exactly off-principal, and the stored parameter is
            its rounding. Without it, the rounding of the bf16/fp16 parameter at each step leaks into the
            principal subspace; the rounding of the stored copy still does with it, the fp32 copy only at fp32
            rounding (figures: benchmarks/results/design_figures.md).

    Projected params cost two fused passes per step on CUDA (≈36 bytes/param without weight decay, 40 with,
    against fused AdamW's 28). Under FSDP2 (DTensor ``Shard(0)``) the step is shard-local plus one all-reduce of
    a k×n matrix per projected weight (left side). DeepSpeed ZeRO is refused
    (:data:`~offprincipal.integrations.deepspeed.ZERO_REFUSAL`: the adapter under ZeRO, FSDP2 for full-parameter training).

    Non-finite policy: a projected weight whose gradient has a NaN or inf entry skips its step (weight, moments
    and step count unchanged) with a ``RuntimeWarning`` naming it. The check and the skip run on the device,
    without a host synchronisation: one batched max-|g| reduction per param group (``torch._foreach_norm`` with
    ord ∞: one extra read of the projected gradients; under FSDP2 one small all-reduce of the flags, a device
    tensor, so every rank skips the same weights) gives a flag per weight, and the update keeps the old values
    where the flag is 0 (the fused kernels mask their stores; the torch code selects the old values; the step
    count adds the flag). The projected weights' step counts therefore live on the parameter's device.

    When the warning appears: for CPU parameters, during the step that skipped. For CUDA parameters the flags
    are copied asynchronously to pinned host memory behind a CUDA event, and the warning is emitted at the
    beginning of a later ``step()`` once that event has completed (pending otherwise), or by
    :meth:`report_nonfinite`, which waits for the copies. Unprojected parameters follow torch AdamW.

    ``capturable=True`` (torch AdamW's flag, per param group): ``step()`` can be captured in a CUDA graph
    (``torch.cuda.graph``) and replayed. Every step count lives on its parameter's device, unprojected parameters
    step through torch's capturable AdamW code, and ``step()`` reads nothing back to the host and allocates no host
    memory: the non-finite flags are added into a device counter per projected weight, and the warnings come only
    from :meth:`report_nonfinite` (call it outside the graph, e.g. at logging steps). Capture needs what torch's
    capturable AdamW needs: the state made by one or more eager steps first (warm-up, which also compiles the
    kernels), the same parameters with gradients at every replay, and ``lr`` a number fixed at capture or a
    device tensor updated in place. As in torch, ``capturable=True`` needs parameters on a CUDA (or other
    capturable) device. :class:`OffPrincipalOptimizer` is not capturable (it reads a flag per weight to restore
    non-finite updates).
    """

    def __init__(
        self,
        params: Iterable,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        options: Optional[ProjectionOptions] = None,
        subspaces: Optional[BasesInput] = None,
        master_weights: bool = False,
        **projection_kwargs,
    ):
        options = ProjectionOptions.resolve("OffPrincipalAdamW", options, projection_kwargs)
        if amsgrad:
            raise ValueError("OffPrincipalAdamW does not implement amsgrad; use amsgrad=False")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         foreach=foreach, fused=fused, capturable=capturable)
        named = _named_params(self.param_groups, "OffPrincipalAdamW")
        self.options = options
        self._wd_cache: dict = {}
        self.master_weights = master_weights
        self.bases = PrincipalBases.build("OffPrincipalAdamW", named, options, subspaces)
        self._nonfinite_pending: list = []  # (CUDA event or None, host flags, names), oldest first
        self._nonfinite_counts: dict = {}  # capturable groups: names → device int32 counts of skipped steps
        self._defer_nonfinite: Optional[bool] = None  # None: defer on CUDA only; True: also on CPU (tests)

    def _init_state(self, p: torch.Tensor, group: dict, step_on_device: bool = False) -> dict:
        """torch AdamW's lazy state (same keys, dtypes and devices), plus the fp32 master copy when enabled.
        ``step_on_device``: the step count lives on the parameter's device (projected weights: it is advanced by
        a device-side flag), as in torch's capturable AdamW; a count loaded elsewhere is moved there once. Groups with
        ``capturable`` or ``fused`` keep every count there, as torch does."""
        state = self.state[p]
        step_on_device = step_on_device or group["capturable"] or group["fused"]
        if not state:
            state["step"] = (
                torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device)
                if step_on_device else torch.tensor(0.0, dtype=_get_scalar_dtype())
            )
            target = p
            if self.master_weights and p.dtype in (torch.bfloat16, torch.float16):
                target = state["master_param"] = p.detach().to(torch.float32, copy=True)
            state["exp_avg"] = torch.zeros_like(target, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(target, memory_format=torch.preserve_format)
        elif step_on_device and state["step"].device != p.device:
            state["step"] = state["step"].to(p.device)
        return state

    def report_nonfinite(self) -> list[str]:
        """Wait for the pending non-finite flags (a host synchronisation on CUDA), emit one ``RuntimeWarning`` per
        skipped weight and step not reported yet, and return those weights' names (oldest step first). Capturable
        groups: their device counters are read (a host synchronisation) and reset, one warning per weight that
        skipped since the last report (saying how many steps), its name once in the list, after the others."""
        skipped = self._report_nonfinite(wait=True)
        for names, counts in self._nonfinite_counts.items():
            for name, count in zip(names, counts.tolist()):
                if count:
                    skipped.append(name)
                    _warn_nonfinite("OffPrincipalAdamW", name, f"{count} step(s) skipped since the last report: "
                                    "weight, moments and step count unchanged by them")
            counts.zero_()
        return skipped

    def _report_nonfinite(self, wait: bool) -> list[str]:
        """Warn for the pending flags whose copy has completed (all of them with ``wait``), in step order."""
        skipped = []
        while self._nonfinite_pending:
            event, host, names = self._nonfinite_pending[0]
            if event is not None:
                if not wait and not event.query():
                    break
                event.synchronize()
            self._nonfinite_pending.pop(0)
            for name, flag in zip(names, host.numpy().tolist()):  # host memory: no device read
                if not flag:
                    skipped.append(name)
                    _warn_nonfinite("OffPrincipalAdamW", name,
                                    "its step is skipped: weight, moments and step count unchanged")
        return skipped

    def _record_nonfinite(self, flags: torch.Tensor, names: list[str], capturable: bool) -> None:
        """Queue the device flags of one group's step for reporting (capturable: added into a device counter of
        skipped steps, in place; CUDA: asynchronous copy to pinned memory behind an event; CPU: reported now unless
        deferral is forced)."""
        if capturable:
            key = tuple(names)
            counts = self._nonfinite_counts.get(key)
            if counts is None:  # the first step with this set of weights (a warm-up step, before any capture)
                counts = self._nonfinite_counts[key] = torch.zeros_like(flags)
            counts.sub_(flags).add_(1)
        elif flags.is_cuda:
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._nonfinite_pending.append((event, host, names))
        else:
            self._nonfinite_pending.append((None, flags.clone(), names))
            if not self._defer_nonfinite:
                self._report_nonfinite(wait=True)

    @torch.no_grad()
    def step(self, closure=None):
        """One step over every parameter with a gradient (parameters whose ``grad`` is None are skipped)."""
        loss = None
        health_check = getattr(self, "_accelerator_graph_capture_health_check", None)  # torch < 2.12: the cuda one
        (health_check or self._cuda_graph_capture_health_check)()  # capture with capturable=False: torch's error
        if self._nonfinite_pending:
            self._report_nonfinite(wait=False)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            names = group.get("param_names")
            if names is None or len(names) != len(group["params"]):
                raise flattened_error("OffPrincipalAdamW")
            plain: tuple[list, ...] = ([], [], [], [], [])
            projected = []
            mastered = []
            for p, name in zip(group["params"], names):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"OffPrincipalAdamW does not support sparse gradients ({name!r})")
                state = self._init_state(p, group, step_on_device=name in self.bases)
                target = state.get("master_param", p)
                grad = p.grad if p.grad.dtype == target.dtype else p.grad.to(target.dtype)
                if "master_param" in state:
                    mastered.append((p, target))
                if name in self.bases:
                    projected.append((name, target, grad, state))
                else:
                    for lst, t in zip(plain, (target, grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                        lst.append(t)
            beta1, beta2 = group["betas"]
            if plain[0]:
                _torch_adam(
                    *plain[:4], [], plain[4], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                    foreach=group["foreach"], fused=group["fused"], capturable=group["capturable"],
                    differentiable=False, has_complex=any(torch.is_complex(t) for t in plain[0]),
                    decoupled_weight_decay=True,
                )
            if not projected:
                continue
            finite = _finite_device_flags([grad for _, _, grad, _ in projected])  # int32, 1 = finite
            for i, (name, target, grad, state) in enumerate(projected):
                ok = finite[i]  # a 0-d view on the device: the skip is decided there
                step = state["step"]
                step.add_(ok)
                shard, U, V = self.bases.local(name, target)
                lr = group["lr"]  # tensors stay tensors: no host synchronisation
                adamw_update_(
                    shard.local, _local(grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                    step if step.is_cuda else step.double(), U, V, self.sides,
                    lr=lr, beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                    weight_decay=group["weight_decay"], maximize=group["maximize"], all_reduce=shard.all_reduce,
                    backend=self.backend, precision=self.precision,
                    wd_terms=self._wd_terms(name, shard, U, V, group["weight_decay"]), ok=ok,
                )
            self._record_nonfinite(finite, [name for name, *_ in projected], group["capturable"])
            for p, master in mastered:
                p.copy_(master)
        return loss

    def _wd_terms(self, name, shard, U, V, weight_decay):
        """(UᵀW, WV) of a projected weight for the fused step (computed at its first step, kept while the bases
        are the same): fixed under off-principal updates, they spare the fused step a read of W."""
        if not weight_decay or resolve_backend(self.backend, shard.local, "param") != "triton":
            return None
        key = (id(U), id(V), shard.start, shard.stop)
        cached = self._wd_cache.get(name)
        if cached is None or cached[0] != key:
            from ..kernels import wd_terms

            cached = self._wd_cache[name] = (key, wd_terms(shard.local, U, V, self.sides, shard.all_reduce))
        return cached[1]

    def state_dict(self) -> dict:
        """torch AdamW's state dict plus ``"offprincipal"``: plain metadata (no tensors) naming the bases."""
        sd = super().state_dict()
        sd["offprincipal"] = {"sides": self.sides, "bases": self.bases.metadata()}
        return sd

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of *named* parameters (``(name, tensor)`` pairs): its eligible weights get bases by the
        construction's rules (``top_k``, ``top_k_pattern``, ``exclude``, ``svd_method``, cache), computed now
        (with several ranks every rank must call it). Unnamed parameters and names already present are refused."""
        if "bases" not in self.__dict__:  # torch's __init__ adds the constructor's groups
            return super().add_param_group(param_group)
        param_group, named = _named_group(param_group, "OffPrincipalAdamW")
        check_unique_names("OffPrincipalAdamW", list(self.bases.params) + list(named))
        super().add_param_group(param_group)
        try:
            self.bases.extend(named)
        except Exception:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by this class (or a plain AdamW state, whose bases are then not checked).

        Checked before anything is loaded: the same number of groups and parameters, the same parameter names
        (when both sides have names), moments and master copies of each parameter's shape, the metadata's
        weights and shapes; then the saved bases are certified against the live weights
        (:meth:`PrincipalBases.reconcile`). A state from another model is refused with an error naming the
        first mismatch. fp32 master copies and moments of bf16/fp16 params stay fp32 (torch would cast them to
        the param dtype).
        """
        meta = state_dict.get("offprincipal")
        self._wd_cache.clear()  # (UᵀW, WV) are recomputed from the loaded weights at the next step
        check_state_fits("OffPrincipalAdamW", self.param_groups, state_dict)
        if meta is not None:
            if meta.get("sides", self.sides) != self.sides:
                raise ValueError(f"the saved state used sides={meta['sides']!r}, this optimizer sides={self.sides!r}")
            self.bases.reconcile(meta.get("bases"), _named_params(self.param_groups, "OffPrincipalAdamW"))
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "offprincipal"})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            if "master_param" in saved:
                p = params[index]
                for key in ("master_param", "exp_avg", "exp_avg_sq"):
                    self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32)
