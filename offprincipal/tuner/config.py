"""`OffPrincipalConfig`: the PEFT configuration of the OffPrincipal adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..options import DEFAULT_SIDES, DEFAULT_SVD_METHOD, DEFAULT_TOP_K, ProjectionOptions
from ..subspace import BASIS_KINDS, FINGERPRINT_RE

PEFT_TYPE_NAME = "OFFPRINCIPAL"
INIT_CHOICES = ("random", "minor")


@dataclass
class OffPrincipalConfig(PeftConfig):
    """Configuration of an OffPrincipal adapter.

    Each targeted weight W0 (m×n, out×in) with top-k singular bases U (m×k), V (n×k) gets trainable factors
    A (r×n) and B (m×r) and the update

        ΔW = (alpha / r) · (B − U(UᵀB)) · (A − (AV)Vᵀ)          (sides="both")

    which lies exactly in the complement of W0's principal subspace for any values of A, B, whatever the
    optimizer. ``sides="left"`` keeps only the U factor, ``"right"`` only the V factor.

    Args:
        r: rank of the trainable factors.
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter's input.
        top_k: size of the protected principal subspace per weight: an int, or a float in (0, 1) meaning a
            fraction of min(m, n).
        top_k_pattern: per-module overrides of ``top_k``, ``{regex: k}`` matched like LoRA's ``rank_pattern``.
        sides: ``"both"`` (default), ``"left"`` or ``"right"``.
        init: ``"random"`` (LoRA-style: A Kaiming-uniform, B = 0) or ``"minor"`` (rows of A are the r right
            singular directions of smallest singular value outside the top-k, B = 0). Both start at ΔW = 0.
        basis: ``"top"`` (default): U, V are the top-k singular bases of each weight — the method. ``"random"``: U, V
            are seeded random orthonormal k-column bases of the same shapes
            (:func:`offprincipal.subspace.random_subspace`), with the same k, sides and init: the control that tells
            whether keeping updates off the *principal* directions matters or any k-dimensional constraint would do.
            Random bases depend only on ``basis_seed``, the module's name, its shape and k; they are rebuilt
            identically on reload and never touch the bases cache (which holds certified top-k bases only).
        basis_seed: the seed of ``basis="random"`` (ignored for ``"top"``).
        svd_method: ``"exact"`` (full fp32 SVD) or ``"randomized"`` (64 extra columns, 16 QR-stabilised power
            iterations).
        subspace_cache_dir: where the bases are cached (safetensors, keyed by a fingerprint of the weight);
            ``None``: ``$OFFPRINCIPAL_CACHE_DIR/subspaces`` or ``~/.cache/offprincipal/subspaces``. The bases are
            NOT saved with the adapter: on load they are found again in this cache (or recomputed from the base
            weight, deterministically) — the base model must be the same one the adapter was trained on, which
            ``base_fingerprint`` checks.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in LoRA;
            ``target_modules="all-linear"`` targets every linear layer but the output head.
        bias: only ``"none"`` is supported.
        fan_in_fan_out: as in LoRA; the orientation follows the layer type: GPT-2's ``Conv1D`` (weight stored
            (in, out)) is detected without it, and on ``nn.Linear`` a True is reset to False with LoRA's warning.
        base_fingerprint: set when the adapter is created: one digest of the base weights it targets
            (:mod:`offprincipal.tuner.fingerprint`), saved in ``adapter_config.json``. Leave it ``None``.
        strict_base: what loading the adapter onto a base whose weights do not match ``base_fingerprint`` does:
            ``False`` (default) warns, ``True`` raises ``ValueError``. Set it on load with
            ``PeftModel.from_pretrained(model, path, strict_base=True)``; ``OFFPRINCIPAL_STRICT_BASE=1`` / ``0``
            overrides it.
    """

    r: int = field(default=16, metadata={"help": "Rank of the trainable factors A (r×n), B (m×r)."})
    alpha: float = field(default=16.0, metadata={"help": "The update is scaled by alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    top_k: Union[int, float] = field(
        default=DEFAULT_TOP_K, metadata={"help": "Protected principal subspace size: int, or float in (0, 1) of min(m, n)."}
    )
    top_k_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Per-module top_k overrides {regex: k}, matched like rank_pattern."}
    )
    sides: Literal["both", "left", "right"] = field(
        default=DEFAULT_SIDES, metadata={"help": "Which side(s) of ΔW are kept off the principal subspace."}
    )
    init: Literal["random", "minor"] = field(default="random", metadata={"help": "Initialisation of A (B = 0)."})
    basis: Literal["top", "random"] = field(
        default="top", metadata={"help": "'top': the top-k singular bases; 'random': seeded random orthonormal bases."}
    )
    basis_seed: int = field(default=0, metadata={"help": "Seed of the random bases (basis='random')."})
    svd_method: Literal["exact", "randomized"] = field(
        default=DEFAULT_SVD_METHOD, metadata={"help": "How bases are computed."}
    )
    subspace_cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache folder for the bases."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex to adapt; 'all-linear' for every linear layer."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex to exclude."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt (with layers_pattern)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, e.g. 'layers' or 'h'."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    bias: str = field(default="none", metadata={"help": "Only 'none' is supported."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Weights stored as (in, out), e.g. GPT-2 Conv1D."})
    base_fingerprint: Optional[str] = field(
        default=None, metadata={"help": "Digest of the base weights the adapter was created on (set automatically)."}
    )
    strict_base: bool = field(
        default=False, metadata={"help": "Refuse (True) or warn (False) when loaded onto a different base."}
    )

    def __post_init__(self):
        super().__post_init__()
        from peft.utils import PeftType

        self.peft_type = PeftType[PEFT_TYPE_NAME]  # the member is added when offprincipal.tuner is imported
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"OffPrincipalConfig.r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"OffPrincipalConfig.dropout must lie in [0, 1), got {self.dropout}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"OffPrincipalConfig.init must be one of {INIT_CHOICES}, got {self.init!r}")
        if self.basis not in BASIS_KINDS:
            raise ValueError(f"OffPrincipalConfig.basis must be one of {BASIS_KINDS}, got {self.basis!r}")
        if isinstance(self.basis_seed, bool) or not isinstance(self.basis_seed, int) or self.basis_seed < 0:
            raise ValueError(f"OffPrincipalConfig.basis_seed must be an int ≥ 0, got {self.basis_seed!r}")
        if self.bias != "none":
            raise ValueError(f"OffPrincipalConfig.bias={self.bias!r} is not supported; use bias='none'")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("OffPrincipalConfig.layers_pattern only takes effect with layers_to_transform")
        self.projection_options()  # validates top_k, top_k_pattern, sides, svd_method, subspace_cache_dir
        self.top_k_pattern = dict(self.top_k_pattern or {})
        if self.base_fingerprint is not None and not (
            isinstance(self.base_fingerprint, str) and FINGERPRINT_RE.fullmatch(self.base_fingerprint)
        ):
            raise ValueError(
                f"OffPrincipalConfig.base_fingerprint must be None or 32 lowercase hex digits, got "
                f"{self.base_fingerprint!r}; it is set when the adapter is created: leave it None"
            )
        if not isinstance(self.strict_base, bool):
            raise TypeError(f"OffPrincipalConfig.strict_base must be True or False, got {self.strict_base!r}")

    def projection_options(self) -> ProjectionOptions:
        """The fields this config shares with the optimizers, as a validated
        :class:`~offprincipal.options.ProjectionOptions` (``subspace_cache_dir`` is its ``cache_dir``); an invalid
        value raises naming the field of this config."""
        return ProjectionOptions.resolve(
            "OffPrincipalConfig", None,
            dict(top_k=self.top_k, top_k_pattern=self.top_k_pattern, sides=self.sides, svd_method=self.svd_method,
                 cache_dir=self.subspace_cache_dir),
            aliases={"cache_dir": "subspace_cache_dir"},
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's loader; a ``strict_base=`` keyword (e.g. from ``PeftModel.from_pretrained``) overrides the saved
        value (PEFT would let the saved config win)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if "strict_base" in kwargs:
            if not isinstance(kwargs["strict_base"], bool):
                raise TypeError(f"strict_base must be True or False, got {kwargs['strict_base']!r}")
            config.strict_base = kwargs["strict_base"]
        return config
