"""Trainer glue: off-principal full-parameter training and live diagnostics inside any HF / TRL Trainer.

Two ways to make full-parameter training off-principal:

- :class:`OffPrincipalCallback` — add it to ``callbacks=[...]`` of any ``transformers.Trainer`` (``GRPOTrainer``
  included). At ``on_train_begin`` (after the Trainer built its optimizer and, when resuming, loaded the
  optimizer state) it replaces a torch ``AdamW`` by :class:`~offprincipal.optim.OffPrincipalAdamW` with the same
  param groups, hyperparameters and state, or wraps any other optimizer in
  :class:`~offprincipal.optim.OffPrincipalOptimizer`. When resuming, the bases are those the run started with
  (fingerprints in the checkpoint's ``optimizer.pt``, bases from the subspace cache), so a resumed run follows
  the uninterrupted trajectory. Gradient accumulation and clipping need nothing: the Trainer steps the optimizer
  only at sync steps, after clipping, and the LR scheduler is re-pointed at the new optimizer.
- :class:`OffPrincipalTrainerMixin` — overrides ``create_optimizer`` (``class T(OffPrincipalTrainerMixin,
  GRPOTrainer)``, or :func:`offprincipal_trainer`). Use it under FSDP/accelerate-prepared optimizers, where a
  callback cannot swap the prepared optimizer, and when the diagnostics must reach ``report_to`` loggers.

Diagnostics (every ``log_every`` optimizer steps; 0 = off; computed by :mod:`offprincipal.diagnostics`) go into
the Trainer's logs under ``offprincipal/``:

- adapter form (any OffPrincipal ``PeftModel``): ``leak_max`` (worst ‖UᵀΔW‖/‖ΔW‖ or ‖ΔW V‖/‖ΔW‖ over layers,
  low-rank path) and ``update_rel_mean`` (mean ‖ΔW‖_F/‖W0‖_F);
- full form: ``principal_shift_max``, the worst of ‖Uᵀ(W_t − W_0)‖/‖UᵀW_0‖ and ‖(W_t − W_0)V‖/‖W_0V‖ from the
  k×n and m×k blocks UᵀW_0, W_0V kept at install time (no copy of W_0), and ``update_rel_mean`` is not
  available there (it would need W_0).

A callback's additions to ``logs`` reach ``trainer.state.log_history`` and the callbacks after it (the console
printer); integrations such as wandb/tensorboard run before user callbacks, so to send the diagnostics there
use the mixin, or put the callback first with ``trainer.callback_handler.callbacks.insert(0, cb)``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Mapping, Optional, Union

import torch
from transformers import TrainerCallback

from .diagnostics import PREFIX, AdapterDiagnostics, PrincipalBlocks
from .integrations.deepspeed import flattened_error
from .optim import OffPrincipalAdamW, OffPrincipalOptimizer
from .options import ProjectionOptions
from .subspace import TopK


# --------------------------------------------------------------------------------------------------------------
# diagnostics in the Trainer's logs (the computations are in offprincipal.diagnostics)


class PeriodicLogsCallback(TrainerCallback):
    """Base of callbacks that compute values every ``log_every`` optimizer steps (``diagnostics(model)``, to
    override) and add them to the next log (``logs`` and ``state.log_history``)."""

    def __init__(self, log_every: int):
        if log_every < 0:
            raise ValueError(f"log_every must be ≥ 0 (0 = off), got {log_every}")
        self.log_every = log_every
        self._pending: dict[str, float] = {}

    def diagnostics(self, model) -> dict[str, float]:
        raise NotImplementedError

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.log_every and state.global_step % self.log_every == 0:
            self._pending = self.diagnostics(model)
            control.should_log = control.should_log or bool(self._pending)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history:
                state.log_history[-1].update(self._pending)
            self._pending = {}


class OffPrincipalDiagnosticsCallback(PeriodicLogsCallback):
    """Live diagnostics of an OffPrincipal adapter (``GRPOTrainer(peft_config=OffPrincipalConfig(...))``)."""

    def __init__(self, log_every: int = 10, adapter_name: str = "default"):
        super().__init__(log_every)
        self.diagnostics = AdapterDiagnostics(adapter_name)


# --------------------------------------------------------------------------------------------------------------
# full-parameter training


def _inner(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _saved_optimizer_metadata(args, state) -> Optional[dict]:
    """The ``offprincipal`` entry of ``<output_dir>/checkpoint-<step>/optimizer.pt`` when resuming, else None."""
    if not state.global_step:
        return None
    path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "optimizer.pt")
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True).get("offprincipal")


class OffPrincipalCallback(PeriodicLogsCallback):
    """Turns full-parameter training in any Trainer into off-principal training (see the module doc).

    Args: ``options`` (a :class:`~offprincipal.options.ProjectionOptions`) and/or its fields as keywords
    (``top_k`` may also come first, positionally), merged and validated at construction as in
    :class:`~offprincipal.optim.OffPrincipalAdamW`; ``master_weights`` as there; ``log_every``: diagnostics period
    in optimizer steps (0 = off). ``self.options`` holds the resolved :class:`ProjectionOptions`.
    """

    def __init__(
        self,
        top_k: Optional[TopK] = None,
        *,
        options: Optional[ProjectionOptions] = None,
        master_weights: bool = False,
        log_every: int = 10,
        **projection_kwargs,
    ):
        if top_k is not None:
            projection_kwargs["top_k"] = top_k
        self.options = ProjectionOptions.resolve("OffPrincipalCallback", options, projection_kwargs)
        super().__init__(log_every)
        self.master_weights = master_weights
        self.optimizer = None
        self._blocks: Optional[PrincipalBlocks] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if optimizer is None or model is None:
            raise RuntimeError("OffPrincipalCallback needs the Trainer's model and optimizer at on_train_begin")
        if getattr(args, "deepspeed", None):
            raise flattened_error("OffPrincipalCallback")
        inner = _inner(optimizer)
        if isinstance(inner, (OffPrincipalAdamW, OffPrincipalOptimizer)):
            self.optimizer = inner  # already installed (the mixin, or a second train() call)
        else:
            self.optimizer = self._replacement(inner, model, _saved_optimizer_metadata(args, state))
            if inner is not optimizer:
                optimizer.optimizer = self.optimizer
            scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
            if scheduler is not None and getattr(scheduler, "optimizer", None) is inner:
                scheduler.optimizer = self.optimizer
        named = dict(model.named_parameters())
        self._blocks = PrincipalBlocks(self.optimizer, named) if self.log_every else None

    def _replacement(self, inner, model, saved_meta):
        names = {id(p): n for n, p in model.named_parameters()}
        if type(inner) is torch.optim.AdamW:
            groups = [
                {**{k: v for k, v in g.items() if k not in ("params", "param_names")},
                 "params": [(names[id(p)], p) for p in g["params"]]}
                for g in inner.param_groups
            ]
            new = OffPrincipalAdamW(groups, master_weights=self.master_weights, options=self.options)
            state = inner.state_dict()
            if saved_meta is not None:
                state["offprincipal"] = saved_meta
            new.load_state_dict(state)
            return new
        new = OffPrincipalOptimizer(inner, model.named_parameters(), options=self.options)
        if saved_meta is not None:
            new.bases.reconcile(saved_meta["bases"])
        return new

    def diagnostics(self, model) -> dict[str, float]:
        if self._blocks is None:
            return {}
        return {PREFIX + "principal_shift_max": self._blocks.shift(dict(model.named_parameters()))}


class OffPrincipalTrainerMixin:
    """``create_optimizer`` builds :class:`~offprincipal.optim.OffPrincipalAdamW` directly (works under FSDP,
    where the Trainer refuses pre-built optimizers and a callback cannot swap a prepared one).

    Set ``offprincipal_options`` on the class or instance: a :class:`~offprincipal.options.ProjectionOptions`, or
    a dict of OffPrincipalAdamW keyword arguments (projection fields such as ``top_k``, an ``options`` entry,
    ``master_weights``, ``subspaces``). The Trainer's ``weight_decay`` grouping (no decay for biases and norms),
    ``learning_rate``, ``adam_beta1/2`` and ``adam_epsilon`` are kept.
    """

    offprincipal_options: Union[ProjectionOptions, Mapping[str, Any]] = {}

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [(n, p) for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        args = self.args
        self.optimizer = OffPrincipalAdamW(
            [g for g in groups if g["params"]],
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            **_adamw_keywords(type(self).__name__, self.offprincipal_options),
        )
        return self.optimizer


_ADAMW_KEYWORDS = frozenset(
    name for name, p in inspect.signature(OffPrincipalAdamW.__init__).parameters.items()
    if name not in ("self", "params") and p.kind is not inspect.Parameter.VAR_KEYWORD
)


def _adamw_keywords(owner: str, given: Union[ProjectionOptions, Mapping[str, Any]]) -> dict[str, Any]:
    """``given`` (see :class:`OffPrincipalTrainerMixin`) as OffPrincipalAdamW keywords with the projection fields
    merged into one validated ``options`` entry; an unknown keyword raises ``TypeError`` naming it."""
    if isinstance(given, ProjectionOptions):
        return {"options": given}
    if not isinstance(given, Mapping):
        raise TypeError(f"{owner}.offprincipal_options must be a ProjectionOptions or a dict, got "
                        f"{type(given).__name__}")
    fields = set(ProjectionOptions.names())
    projection = {k: v for k, v in given.items() if k in fields}
    rest = {k: v for k, v in given.items() if k not in fields}
    unknown = sorted(set(rest) - _ADAMW_KEYWORDS)
    if unknown:
        raise TypeError(f"{owner}: unknown OffPrincipalAdamW option(s) {unknown}; the keywords are "
                        f"{sorted(_ADAMW_KEYWORDS | fields)}")
    return {**rest, "options": ProjectionOptions.resolve(owner, rest.get("options"), projection)}


def offprincipal_trainer(trainer_cls, **options):
    """A subclass of ``trainer_cls`` with :class:`OffPrincipalTrainerMixin` and these OffPrincipalAdamW keywords
    (projection fields, ``options=``, ``master_weights``, …), validated now: a bad value raises here, not when
    the Trainer builds its optimizer."""
    name = f"OffPrincipal{trainer_cls.__name__}"
    return type(name, (OffPrincipalTrainerMixin, trainer_cls), {"offprincipal_options": _adamw_keywords(name, options)})
