"""TRL's weight sync to vLLM with an OffPrincipal adapter.

Two paths, both through TRL's own code:

- **Merged weights** (``GRPOTrainer`` with ``use_vllm=True``, colocate or server; ``AsyncGRPOTrainer`` against a
  server without ``--enable-lora``): TRL calls ``merge_adapter()``, sends every base weight, ``unmerge_adapter()``.
  Nothing to subclass: the adapter's merge is exact and keeps a compact correction instead of a copy of each weight
  (:mod:`offprincipal.tuner.merge`). :func:`trl_weight_stream` runs that very generator without a vLLM engine
  (benchmarks/sync_memory.py measures it).
- **Adapter only** (``AsyncGRPOTrainer`` against ``vllm serve --enable-lora``): ΔW = s·B̃Ã is exactly a rank-r LoRA
  with lora_A = Ã (r×n), lora_B = s·B̃ (m×r), lora_alpha = r (scaling 1): :func:`offprincipal.tuner.to_lora`.
  :class:`OffPrincipalAsyncGRPOTrainer` publishes that LoRA through TRL's own ``select_adapter_sync`` and
  ``_sync_weight_lora`` (via :class:`LoraSyncView`), so vLLM serves the same policy without any base weight moving.

Importing this module needs ``trl``; ``import offprincipal`` does not import it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..tuner.export import to_lora, write_lora
from ..tuner.layer import OffPrincipalLayer


def trl_weight_stream(model: nn.Module, accelerator) -> Iterator[tuple[str, torch.Tensor]]:
    """``(vLLM name, tensor)`` pairs exactly as TRL's vLLM sync produces them: TRL's own
    ``VLLMGeneration._iter_named_params`` (gather under ZeRO-3, ``merge_adapter()``, every base parameter,
    ``unmerge_adapter()`` when exhausted), run on an instance that starts no vLLM engine (vLLM is not needed to
    produce the stream; ``sync_weights`` hands each pair to ``load_weights`` or the server client)."""
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    generation = VLLMGeneration.__new__(VLLMGeneration)  # __init__ would start vLLM; the stream needs only these
    generation.model, generation.accelerator, generation._dist = model, accelerator, DistributedBackend(accelerator)
    return generation._iter_named_params()


def _is_offprincipal(model: nn.Module, adapter_name: str) -> bool:
    return any(isinstance(m, OffPrincipalLayer) and adapter_name in m.offprincipal_A for m in model.modules())


class LoraSyncView(nn.Module):
    """An OffPrincipal ``PeftModel`` seen as the LoRA it equals, for TRL's adapter-only sync.

    TRL's ``select_adapter_sync`` reads ``active_adapters`` and ``peft_config`` (it accepts only a ``LoraConfig`` and
    checks it with ``validate_lora_for_vllm_sync``: no ``modules_to_save``, no head/embedding targets, rank ≤ the
    server's ``--max-lora-rank``); ``save_lora_adapter`` reads ``state_dict()`` (keys with ``lora_`` and
    ``.{adapter}.``), gathers them, and calls ``save_pretrained``. The view answers those with :func:`to_lora`'s
    adapter: per targeted layer ``lora_A`` = Ã (r×n) and ``lora_B`` = s·B̃ (m×r), ``lora_alpha = r`` (vLLM's
    scaling lora_alpha/r = 1), so the served ΔW = lora_B·lora_A equals the adapter's ΔW up to fp32 rounding of the
    product s·B̃. The wrapped model is not registered as a submodule (accelerate's unwrapping walks submodules).
    """

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        super().__init__()
        if not _is_offprincipal(model, adapter_name):
            raise ValueError(f"LoraSyncView: no OffPrincipal layer carries adapter {adapter_name!r}")
        self._wrapped = (model,)
        self.adapter_name = adapter_name
        self.lora_config, self._state = to_lora(model, adapter_name)

    @property
    def active_adapters(self) -> list[str]:
        return [self.adapter_name]

    @property
    def peft_config(self) -> dict:
        return {self.adapter_name: self.lora_config}

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """PEFT's in-memory key format: ``{module}.lora_A.{adapter}.weight``."""
        return {
            key.replace(".lora_A.", f".lora_A.{self.adapter_name}.").replace(".lora_B.", f".lora_B.{self.adapter_name}."): t
            for key, t in self._state.items()
        }

    def save_pretrained(self, save_directory, selected_adapters=None, state_dict=None, **kwargs) -> None:
        """Write the LoRA as ``PeftModel.save_pretrained`` lays it out: at the root for ``"default"``, else in a
        sub-folder named after the adapter; ``state_dict`` (the gathered tensors TRL passes) in PEFT's key format."""
        import os

        if selected_adapters not in (None, [self.adapter_name]):
            raise ValueError(f"LoraSyncView holds adapter {self.adapter_name!r} only, not {selected_adapters}")
        state = state_dict if state_dict is not None else self.state_dict()
        saved = {k.replace(f".{self.adapter_name}.", "."): v for k, v in state.items()}
        folder = save_directory if self.adapter_name == "default" else os.path.join(save_directory, self.adapter_name)
        write_lora(folder, self.lora_config, saved)


try:
    from trl.experimental.async_grpo import AsyncGRPOTrainer as _AsyncGRPOTrainer
except ImportError:  # trl missing or without the experimental trainer: the merged path still works with any trainer
    _AsyncGRPOTrainer = None

if _AsyncGRPOTrainer is not None:

    class OffPrincipalAsyncGRPOTrainer(_AsyncGRPOTrainer):
        """TRL's ``AsyncGRPOTrainer`` whose adapter-only vLLM sync also serves an OffPrincipal adapter.

        Use it as the stock class (same arguments) with ``peft_config=OffPrincipalConfig(...)`` against
        ``vllm serve MODEL --enable-lora --max-lora-rank R --max-loras N`` (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``).
        Two methods are overridden and both hand over to TRL's own code:

        - ``_init_lora_sync``: TRL's probe and decision (``select_adapter_sync``) see the adapter as its
          :class:`LoraSyncView`, so they apply TRL's LoRA rules (rank ≤ ``--max-lora-rank``, one of vLLM's ranks
          1/8/16/32/64/128/256/320/512 or below it; ranks above 512 are refused by TRL's ``round_lora_rank`` with
          its own message; ``modules_to_save`` and head/embedding targets fall back to merged sync with TRL's
          warning);
        - ``_sync_weight_lora``: TRL's sync runs on the view, so ``save_lora_adapter`` writes the exported LoRA and
          the server loads it as ``trl-policy-v{N}``.

        Anything else (a LoRA adapter, a server without ``--enable-lora``) behaves exactly as the stock class; the
        merged fallback uses the adapter's exact, copy-free merge.
        """

        def _lora_view(self, model: nn.Module):
            name = self._adapter_name
            return LoraSyncView(model, name) if name is not None and _is_offprincipal(model, name) else model

        def _init_lora_sync(self, model: nn.Module) -> bool:
            return super()._init_lora_sync(self._lora_view(model))

        def _sync_weight_lora(self, t0: float):
            with self._serving(self._lora_view(self.accelerator.unwrap_model(self.model))):
                return super()._sync_weight_lora(t0)

        @contextmanager
        def _serving(self, view: nn.Module):
            """``self.model`` is the view while TRL's sync reads it (that method reads the model only through
            ``accelerator.unwrap_model(self.model)``), and the trained model again afterwards, even on error."""
            model = self.model
            self.model = view
            try:
                yield
            finally:
                self.model = model

    __all__ = ["LoraSyncView", "OffPrincipalAsyncGRPOTrainer", "trl_weight_stream"]
else:
    __all__ = ["LoraSyncView", "trl_weight_stream"]
