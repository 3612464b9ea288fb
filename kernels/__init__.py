"""Fused Triton kernels of OffPrincipal (installed as ``offprincipal.kernels``).

- :func:`project_`: in-place off-principal projection of a 2-D tensor, two passes.
- :func:`projected_adamw_step_`: one projected-AdamW step, two passes.

They run on CUDA tensors, or on CPU tensors under Triton's interpreter when ``TRITON_INTERPRET=1`` was set
before this package was first imported (:data:`INTERPRETED`). Callers normally go through
:func:`offprincipal.projection.project_` and :class:`offprincipal.optim.OffPrincipalAdamW`, which dispatch here
for CUDA tensors and to the torch reference otherwise.
"""

from importlib import import_module

# name → submodule; imported on first use (PEP 562), so importing this package runs nothing: neither Triton nor a
# kernel module. That also keeps the folder harmless when the repo root is on sys.path (``python -m pytest``): there
# transformers probes a top-level ``kernels`` (Hugging Face's package of that name), imports this folder instead,
# finds no ``__version__`` and reports it unavailable, without side effects.
_EXPORTS = {
    "DEFAULT_PRECISION": "_tiles", "INTERPRETED": "_tiles", "MAX_K": "_tiles", "PRECISIONS": "_tiles",
    "project_": "project", "projected_adamw_step_": "adamw", "wd_terms": "adamw",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
