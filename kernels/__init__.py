"""Fused Triton kernels of OffPrincipal (installed as ``offprincipal.kernels``).

- :func:`project_`: in-place off-principal projection of a 2-D tensor, two passes.
- :func:`projected_adamw_step_`: one projected-AdamW step, two passes.

They run on CUDA tensors, or on CPU tensors under Triton's interpreter when ``TRITON_INTERPRET=1`` was set
before this package was first imported (:data:`INTERPRETED`). Callers normally go through
:func:`offprincipal.projection.project_` and :class:`offprincipal.optim.OffPrincipalAdamW`, which dispatch here
for CUDA tensors and to the torch reference otherwise.
"""

if __name__ != "offprincipal.kernels":
    # This folder is installed as offprincipal.kernels. Imported as a top-level ``kernels`` (the repo root is on
    # sys.path, e.g. ``python -m ...`` inside a checkout) it would shadow Hugging Face's ``kernels`` package, which
    # transformers probes on import; so it poses as an empty namespace module and the probe reports "not installed".
    __file__ = None
else:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the platform
        raise ImportError(
            "offprincipal.kernels needs Triton (Linux x86_64 with a CUDA GPU); the torch backend works without it"
        ) from exc

    from ._tiles import DEFAULT_PRECISION, INTERPRETED, MAX_K, PRECISIONS
    from .adamw import projected_adamw_step_, wd_terms
    from .project import project_

    __all__ = ["DEFAULT_PRECISION", "INTERPRETED", "MAX_K", "PRECISIONS", "project_", "projected_adamw_step_", "wd_terms"]
