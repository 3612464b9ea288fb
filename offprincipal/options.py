"""The projection options: one frozen, validated spec shared by every form of off-principal training.

:class:`ProjectionOptions` holds the settings that choose and apply the bases — ``top_k``, ``top_k_pattern``,
``sides``, ``exclude``, ``svd_method``, ``cache_dir``, ``backend``, ``precision``, ``progress`` — and this module
is the only home of their defaults (:data:`DEFAULT_TOP_K`, :data:`DEFAULT_EXCLUDE`, …). It is taken by
:class:`~offprincipal.optim.OffPrincipalAdamW`, :class:`~offprincipal.optim.OffPrincipalOptimizer`,
:class:`~offprincipal.trainer.OffPrincipalCallback`, :class:`~offprincipal.trainer.OffPrincipalTrainerMixin` (as
``options=``, or as the same keywords, which build one), and :class:`~offprincipal.tuner.OffPrincipalConfig`
validates its shared fields by building one.

Contract: a ``ProjectionOptions`` that exists is valid. Every field is checked once, in ``__post_init__``, with
an error naming the field and what it accepts; the checks need no weight and no process group, so a bad value
raises on every rank at construction, before any collective. Fields that depend on a weight's shape (k < min(m, n))
are checked per weight by :func:`offprincipal.subspace.resolve_top_k`. The object is frozen and hashable:
``top_k_pattern`` is stored as a tuple of ``(regex, k)`` pairs (in the order given: the first match wins) and
``exclude`` as a tuple of regexes; both accept a dict / list.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

from ._sides import DEFAULT_PRECISION, PRECISIONS, SIDES
from .projection import BACKENDS
from .subspace import SVD_METHODS, TopK

DEFAULT_TOP_K = 32
"""k of the protected principal subspace per weight when none is given."""

DEFAULT_EXCLUDE: tuple[str, ...] = ("embed", "lm_head", "wte", "wpe")
"""Regexes searched in parameter names; matches step as plain AdamW. Covers ``embed_tokens``, ``embed_positions``,
``word_embeddings``, ``embed_in/out``, GPT-2's ``wte``/``wpe`` and ``lm_head`` (tied heads appear once, under
the embedding's name)."""

DEFAULT_SIDES = "both"
DEFAULT_SVD_METHOD = "exact"
DEFAULT_BACKEND = "auto"

CacheDir = Union[None, bool, str, "os.PathLike[str]"]


class OptionError(ValueError):
    """A projection option with a value it does not accept. ``field`` names it, ``problem`` says what is wrong."""

    def __init__(self, field: str, problem: str, owner: str = "ProjectionOptions"):
        self.field, self.problem, self.owner = field, problem, owner
        super().__init__(f"{owner}.{field} {problem}")

    def renamed(self, owner: str, aliases: Mapping[str, str]) -> "OptionError":
        """The same error as reported by ``owner``, whose field for ``field`` is ``aliases.get(field, field)``."""
        head = self.field.split("[", 1)
        field = aliases.get(head[0], head[0]) + ("[" + head[1] if len(head) > 1 else "")
        return type(self)(field, self.problem, owner)


class OptionTypeError(OptionError, TypeError):
    """A projection option of a type it does not accept."""


def _check_k(field: str, value: Any) -> TopK:
    """The global rule of :func:`offprincipal.subspace.resolve_top_k`: an int ≥ 1, or a float in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionTypeError(field, f"must be an int ≥ 1 or a float in (0, 1) (a fraction of min(m, n)), got "
                                     f"{value!r}")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise OptionError(field, f"is a float, so it is a fraction of min(m, n) and must lie in (0, 1); got {value!r}. "
                                 "Pass an int for an absolute k")
    if isinstance(value, int) and value < 1:
        raise OptionError(field, f"must be ≥ 1, got {value!r}")
    return value


def _check_regex(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise OptionTypeError(field, f"must be a regex (a str), got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        raise OptionError(field, f"is not a valid regex: {value!r} ({exc})") from None
    return value


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise OptionError(field, f"must be one of {choices}, got {value!r}")
    return value


def _pattern_pairs(value: Any) -> tuple[tuple[str, TopK], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items: Iterable = value.items()
    elif isinstance(value, (list, tuple)) and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in value):
        items = value
    else:
        raise OptionTypeError("top_k_pattern", f"must be a dict {{regex: k}} (or (regex, k) pairs), got {value!r}")
    pairs = dict((_check_regex("top_k_pattern", key), k) for key, k in items)
    return tuple((key, _check_k(f"top_k_pattern[{key!r}]", k)) for key, k in pairs.items())


def _exclude_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise OptionTypeError("exclude", f"must be a tuple or list of regexes, got the str {value!r}; write "
                                         f"({value!r},) for one regex")
    if not isinstance(value, (list, tuple)):
        raise OptionTypeError("exclude", f"must be a tuple or list of regexes (() excludes nothing), got {value!r}")
    return tuple(_check_regex("exclude", pattern) for pattern in value)


@dataclass(frozen=True)
class ProjectionOptions:
    """How the bases of the projected weights are chosen, computed and applied.

    Args:
        top_k: k per weight: an int ≥ 1, or a float in (0, 1) meaning ``max(1, floor(top_k · min(m, n)))``; each
            weight needs 1 ≤ k < min(m, n) (:func:`offprincipal.subspace.resolve_top_k`).
        top_k_pattern: per-weight overrides ``{regex: k}`` matched like PEFT's ``rank_pattern``; stored as a tuple
            of ``(regex, k)`` pairs (``dict(options.top_k_pattern)`` gives the mapping back).
        sides: ``"both"``, ``"left"`` (keep U only) or ``"right"`` (keep V only), in the stored (out, in) layout.
        exclude: regexes searched in parameter names; matching parameters step unprojected.
        svd_method: ``"exact"`` (full fp32 SVD) or ``"randomized"``.
        cache_dir: folder of the subspace cache; ``None``: the default folder, ``False``: no cache.
        backend: ``"auto"`` (Triton for CUDA tensors, torch elsewhere), ``"torch"`` or ``"triton"``.
        precision: fp32 product precision of the projection: ``"tf32x3"``, ``"ieee"`` or ``"tf32"``
            (see :mod:`offprincipal._sides`).
        progress: show a progress bar while bases are computed.
    """

    top_k: TopK = DEFAULT_TOP_K
    top_k_pattern: tuple[tuple[str, TopK], ...] = ()
    sides: str = DEFAULT_SIDES
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    svd_method: str = DEFAULT_SVD_METHOD
    cache_dir: CacheDir = None
    backend: str = DEFAULT_BACKEND
    precision: str = DEFAULT_PRECISION
    progress: bool = True

    def __post_init__(self):
        checked = dict(
            top_k=_check_k("top_k", self.top_k),
            top_k_pattern=_pattern_pairs(self.top_k_pattern),
            sides=_check_choice("sides", self.sides, SIDES),
            exclude=_exclude_tuple(self.exclude),
            svd_method=_check_choice("svd_method", self.svd_method, SVD_METHODS),
            backend=_check_choice("backend", self.backend, BACKENDS),
            precision=_check_choice("precision", self.precision, PRECISIONS),
        )
        if not (self.cache_dir is None or isinstance(self.cache_dir, (bool, str, os.PathLike))):
            raise OptionTypeError(
                "cache_dir", f"must be a folder (str or path), None (the default folder) or False (no cache), got "
                             f"{self.cache_dir!r}"
            )
        if not isinstance(self.progress, bool):
            raise OptionTypeError("progress", f"must be True or False, got {self.progress!r}")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option fields, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def resolve(
        cls,
        owner: str,
        options: Optional["ProjectionOptions"] = None,
        values: Optional[Mapping[str, Any]] = None,
        aliases: Optional[Mapping[str, str]] = None,
    ) -> "ProjectionOptions":
        """The options an ``owner`` (a class taking ``options=`` and option keywords) runs with: ``options`` (default
        :class:`ProjectionOptions`\\ ()) with ``values`` replacing its fields (``dataclasses.replace``).

        A key of ``values`` that is not a field raises ``TypeError`` naming it; an invalid value raises
        :class:`OptionError` / :class:`OptionTypeError` (a ``ValueError`` / ``TypeError``) naming ``owner`` and the
        field, under the owner's name for it (``aliases``: field → the owner's name).
        """
        values = dict(values or {})
        aliases = dict(aliases or {})
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            known = ", ".join(aliases.get(name, name) for name in cls.names())
            raise TypeError(f"{owner} got unexpected keyword argument(s) {unknown}; its projection options are: "
                            f"{known}")
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"{owner}: options must be a ProjectionOptions (or None), got {type(options).__name__}")
        try:
            return dataclasses.replace(options, **values) if options is not None else cls(**values)
        except OptionError as exc:
            raise exc.renamed(owner, aliases) from None
