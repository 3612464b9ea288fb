"""The training methods that ``offprincipal train`` and the benchmarks know: the only list of them.

Each :class:`Method` says what it is (an adapter or full-parameter training), its learning-rate family and default
rate, and how it is built: a PEFT config for the adapters, a Trainer callback for the full-parameter variants, the
TRL trainer it runs under. The CLI's ``--method`` choices, the benchmark's arms and the report's arm order all
come from :data:`METHODS`.

Default rates: adapters take about 10× the full-parameter rate ("LoRA without regret"; notes/paper.md). OSF trains
full-rank blocks and sparse fine-tuning is full fine-tuning on fewer entries, so both take the full-parameter rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

ADAPTER_LR = 2e-4
FULL_LR = 2e-5


@dataclass(frozen=True)
class Method:
    """One training method.

    ``name``: how it is spelled everywhere (``--method``, run records, reports). ``family``: the method whose
    learning rate a benchmark sweep chooses for it. ``adapter``: trains a PEFT adapter (saved as ``adapter/``) rather
    than the full model (``model/``). ``trainer``: ``"grpo"`` or ``"sft"``. ``peft_config(rank, top_k, seed)`` builds
    the adapter config (``seed``: the run's seed, for what the method draws at random, e.g. random bases);
    ``callback(top_k)`` the method's Trainer callback, if any (the adapter's live diagnostics, the projected
    optimizer or a sparse mask of a full-parameter variant, GeoRA's initialisation).
    ``merges_base``: its adapter is relative to rewritten base weights (PiSSA), so the merged model is saved.
    """

    name: str
    description: str
    family: str
    adapter: bool
    default_lr: float
    trainer: str = "grpo"
    peft_config: Optional[Callable[[int, int, int], Any]] = field(default=None, compare=False, repr=False)
    callback: Optional[Callable[[int], Any]] = field(default=None, compare=False, repr=False)
    merges_base: bool = False
    aliases: tuple = ()

    @property
    def has_rank(self) -> bool:
        """Whether ``--rank`` applies (the low-rank adapters; OSF's size is its top-k)."""
        return self.adapter and self.name != "osf"


def _offprincipal_config(**variant) -> Callable[[int, int, int], Any]:
    """``basis="random"`` variants draw their bases with the run's seed."""

    def build(rank: int, top_k: int, seed: int = 0):
        from ..tuner import OffPrincipalConfig

        seeded = {"basis_seed": seed} if variant.get("basis") == "random" else {}
        return OffPrincipalConfig(r=rank, alpha=rank, top_k=top_k, target_modules="all-linear", **variant, **seeded)

    return build


def _lora_config(**variant) -> Callable[[int, int, int], Any]:
    def build(rank: int, top_k: int, seed: int = 0):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", task_type="CAUSAL_LM", **variant)

    return build


def _osf_config(rank: int, top_k: int, seed: int = 0):
    from peft import OSFConfig

    return OSFConfig(effective_rank=top_k, target_modules="all-linear", task_type="CAUSAL_LM")


def _adapter_diagnostics(top_k: int):
    from ..trainer import OffPrincipalDiagnosticsCallback

    return OffPrincipalDiagnosticsCallback(log_every=1)


def _geora_callback(top_k: int):
    from .geora import GeoRACallback

    return GeoRACallback(top_k=top_k)


def _offprincipal_callback(top_k: int):
    from ..trainer import OffPrincipalCallback

    return OffPrincipalCallback(top_k=top_k, log_every=1)


def _sparse_callback(kind: str) -> Callable[[int], Any]:
    def build(top_k: int):
        from .sparse import SparseMaskCallback

        return SparseMaskCallback(kind, top_k=top_k)

    return build


def _method_list() -> list[Method]:
    adapter = dict(adapter=True, default_lr=ADAPTER_LR)
    full = dict(adapter=False, default_lr=FULL_LR, family="full")
    return [
        Method("offprincipal", "OffPrincipal adapter (PEFT): low-rank update kept off the top-k principal directions",
               family="offprincipal", peft_config=_offprincipal_config(), callback=_adapter_diagnostics, **adapter),
        Method("offprincipal-random", "the OffPrincipal adapter with seeded random orthonormal k-column bases instead "
               "of the top-k (same k, sides, init; basis seed = run seed): the control for the principal geometry",
               family="offprincipal", peft_config=_offprincipal_config(basis="random"), callback=_adapter_diagnostics,
               **adapter),
        Method("offprincipal-full", "full-parameter training with OffPrincipalAdamW (the OffPrincipalCallback)",
               callback=_offprincipal_callback, aliases=("full-offprincipal",), **full),
        Method("lora", "PEFT LoRA with the same rank and target modules (baseline)", family="lora",
               peft_config=_lora_config(), **adapter),
        Method("dora", "PEFT LoRA with use_dora=True (weight-decomposed LoRA; baseline)", family="lora",
               peft_config=_lora_config(use_dora=True), **adapter),
        Method("pissa", "PEFT LoRA with init_lora_weights='pissa' (trains the top-r principal directions; baseline)",
               family="lora", peft_config=_lora_config(init_lora_weights="pissa"), merges_base=True, **adapter),
        Method("mica", "PEFT LoRA with init_lora_weights='mica' (B on minor left singular vectors; baseline)",
               family="lora", peft_config=_lora_config(init_lora_weights="mica"), **adapter),
        Method("geora", "GeoRA (arXiv 2601.09361): LoRA initialised from the top-r SVD of the weight masked to its "
               "non-principal ∪ low-magnitude entries, the residual frozen as the base (experiment/geora.py)",
               family="lora", peft_config=_lora_config(), callback=_geora_callback, merges_base=True, **adapter),
        Method("osf", "PEFT OSF: the top-k singular directions frozen, the rest trained at full rank (baseline)",
               family="full", adapter=True, default_lr=FULL_LR, peft_config=_osf_config),
        Method("full", "plain full-parameter training with AdamW (baseline)", **full),
        Method("sparse-principal", "full-parameter training restricted to the top-50% principal weights (|rank-k W0|)",
               callback=_sparse_callback("principal"), **full),
        Method("sparse-safe", "full-parameter training restricted to the 'safe' mask: low-magnitude ∪ non-principal "
               "weights", callback=_sparse_callback("safe"), **full),
        Method("sparse-random", "full-parameter training restricted to a random mask of the safe mask's density",
               callback=_sparse_callback("random"), **full),
        Method("sft", "full-parameter supervised fine-tuning on the task's correct answers (TRL SFTTrainer; no RL)",
               trainer="sft", **full),
    ]


METHODS: dict[str, Method] = {method.name: method for method in _method_list()}
_ALIASES = {alias: method.name for method in METHODS.values() for alias in method.aliases}


def get_method(name: str) -> Method:
    """The method called ``name`` (or a former spelling of it); KeyError naming the choices."""
    key = _ALIASES.get(name, name)
    if key not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key]


def canonical_name(name: str) -> str:
    """``name`` as spelled in :data:`METHODS` (run records written before the spelling was fixed use aliases)."""
    return _ALIASES.get(name, name)
