"""`OffPrincipalModel`: the PEFT tuner that injects OffPrincipal layers."""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, _maybe_include_all_linear_layers
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ..distributed import bases_on_rank0, is_distributed
from ..integrations.deepspeed import full_shape, is_partitioned
from ..subspace import Subspace, compute_subspaces, random_subspaces, resolve_top_k, weight_matrix
from .config import OffPrincipalConfig
from .fingerprint import base_fingerprint, check_base_fingerprint, combine_fingerprints, stored_weight
from .layer import Linear, OffPrincipalLayer, decode_settings, resolve_fan_in_fan_out


def max_principal_leak(model: nn.Module, adapter_name: str = "default") -> float:
    """Worst relative leak of any OffPrincipal layer's ΔW into its principal subspace (both sides, fp64)."""
    leaks = [
        max(layer.principal_leak(adapter_name))
        for layer in model.modules()
        if isinstance(layer, OffPrincipalLayer) and adapter_name in layer.offprincipal_A
    ]
    if not leaks:
        raise ValueError(f"no OffPrincipal layer carries adapter {adapter_name!r}")
    return max(leaks)


def _linear_base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _base_matrix(module: nn.Module) -> torch.Tensor:
    """The (out, in) base weight a new adapter's bases come from: the unmerged one for an OffPrincipal layer."""
    return module.base_weight_matrix() if isinstance(module, OffPrincipalLayer) else weight_matrix(_linear_base(module))


def _refuse_inside_multihead_attention(model: nn.Module, key: str) -> None:
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` directly (``F.multi_head_attention_forward``), never calling
    ``out_proj``: an adapter there would be ignored in forward and backward, yet merged into the weight."""
    parent_key = key.rpartition(".")[0]
    parent = model.get_submodule(parent_key) if parent_key else None
    if isinstance(parent, nn.MultiheadAttention):
        raise TypeError(
            f"OffPrincipal cannot adapt {key!r}: it is the out_proj of an nn.MultiheadAttention, which reads "
            "out_proj.weight directly instead of calling out_proj, so the adapter would be ignored in forward and "
            "backward but merged into the weight (PEFT's LoRA has the same limit). Remove it from target_modules "
            f"(with 'all-linear', add exclude_modules=[{key!r}])."
        )


def _from_rank0(layers: dict[str, nn.Module]) -> bool:
    """Whether the bases come from rank 0: a process group with several ranks exists (other ranks may hold meta or
    placeholder weights), or a weight is a ZeRO-3 partition (its whole value exists only while gathered)."""
    return is_distributed() or any(is_partitioned(stored_weight(m)) for m in layers.values())


class OffPrincipalModel(BaseTuner):
    """Creates an OffPrincipal adapter model from a pretrained model (use ``peft.get_peft_model``).

    Before injecting an adapter, the principal bases of every targeted weight are computed in one pass
    through :func:`offprincipal.subspace.compute_subspaces` (disk cache, progress bar, total time), or with
    ``basis="random"`` drawn by :func:`offprincipal.subspace.random_subspaces` (no cache). When a default process
    group with several ranks exists, or the weights are ZeRO-3 partitions, rank 0 computes them from the whole
    weights (ZeRO-3 partitions gathered one at a time) and broadcasts them; other ranks may hold ``meta`` or
    placeholder weights (FSDP's CPU-RAM-efficient loading). The base fingerprint and the cache are rank 0's, so
    every rank must create or load the adapter (as accelerate and TRL do).
    """

    prefix: str = "offprincipal_"
    tuner_layer_cls = OffPrincipalLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        layers = self._targeted_layers(model, config)
        if _from_rank0(layers):  # one SVD pass and one digest, on rank 0, where the real weights are
            current, self._prefetched = self._subspaces_from_rank0(layers, config, progress=True)
            check_base_fingerprint(current, len(layers), config, adapter_name)
        else:
            check_base_fingerprint(base_fingerprint(layers), len(layers), config, adapter_name)
            self._prefetched = self._prefetch_subspaces(layers, config)
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        finally:
            self._prefetched = {}

    def _targeted_layers(self, model: nn.Module, config: OffPrincipalConfig) -> dict[str, nn.Module]:
        """The linear base layers (``nn.Linear``, ``Conv1D``) the config targets, matched with PEFT's own rules."""
        config = _maybe_include_all_linear_layers(
            self._prepare_adapter_config(copy.deepcopy(config), self.get_model_config(model)), model
        )
        tuner_prefixes = [k + "." for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        layers = {}
        for key, module in model.named_modules():
            if not key or any(key.startswith(p) for p in tuner_prefixes):
                continue
            match = self._check_target_module_exists(config, key)
            if not match or isinstance(match, _ExcludedModule):
                continue
            base = _linear_base(module)
            if isinstance(base, (nn.Linear, Conv1D)):
                _refuse_inside_multihead_attention(model, key)
                layers[key] = module
        return layers

    def _prefetch_subspaces(self, layers: dict[str, nn.Module], config: OffPrincipalConfig) -> dict[str, Subspace]:
        weights = {
            key: _base_matrix(m) for key, m in layers.items() if _linear_base(m).weight.device.type != "meta"
        }
        return self._compute_subspaces(weights, config, progress=True)

    def _subspaces_from_rank0(self, layers: dict[str, nn.Module], config: OffPrincipalConfig, progress: bool):
        """(base digest, ``{key: Subspace}``) when :func:`_from_rank0`: rank 0 fingerprints the whole weights and
        computes (or finds in its cache) every basis, and broadcasts them (:func:`~offprincipal.distributed.
        bases_on_rank0`); other ranks may hold placeholder or ``meta`` weights and never touch the cache. U, S, V
        fp32. A collective: every rank calls it with the same layers."""
        for m in layers.values():
            _base_matrix(m)  # refuses a layer merged without its unmerged base, as the single-process path does
        stored = {key: stored_weight(m) for key, m in layers.items()}  # fingerprinted as stored, as base_fingerprint
        transposed = {  # the SVD's (out, in) orientation, as _base_matrix
            key: m._transposed if isinstance(m, OffPrincipalLayer) else isinstance(_linear_base(m), Conv1D)
            for key, m in layers.items()
        }
        pattern = config.top_k_pattern
        shapes = {}
        for key, W in stored.items():
            shape = full_shape(W)[::-1] if transposed[key] else full_shape(W)  # ZeRO-3 partitions have shape (0,)
            shapes[key] = (shape, resolve_top_k(config.top_k, shape, key, pattern))

        def compute(key, W):
            W = W.T if transposed[key] else W
            return self._compute_subspaces({key: W}, config, progress=False)[key]

        subs, fingerprints = bases_on_rank0(stored, shapes, compute, progress=progress)
        return combine_fingerprints(fingerprints), subs

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        """PEFT's replacement, which moves every adapter submodule to the base weight's device, except the
        non-persistent buffers (bases, settings): they stay where :meth:`OffPrincipalLayer.update_layer` put them, real
        tensors even beside a weight on the meta device (PEFT's move would make them meta tensors, which accelerate's
        FSDP2 preparation cannot re-register)."""
        kept = [
            (getattr(new_module, n), adapter, basis)
            for n in (OffPrincipalLayer._buffer_names if isinstance(new_module, OffPrincipalLayer) else ())
            for adapter, basis in getattr(new_module, n).items()
        ]
        super()._replace_module(parent, child_name, new_module, child)
        for buffers, adapter, basis in kept:
            buffers[adapter] = basis

    @staticmethod
    def _compute_subspaces(weights, config: OffPrincipalConfig, progress: bool) -> dict[str, Subspace]:
        """The bases of ``weights`` (module name → (out, in) weight) that ``config`` asks for: the only place an
        adapter's bases are chosen."""
        if config.basis == "random":
            return random_subspaces(weights, config.top_k, config.basis_seed, top_k_pattern=config.top_k_pattern)
        return compute_subspaces(
            weights,
            config.top_k,
            top_k_pattern=config.top_k_pattern,
            method=config.svd_method,
            cache_dir=config.subspace_cache_dir,
            progress=progress,
        )

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection of the adapter's entries, plus each layer's ``offprincipal_settings`` under the key a
        persistent buffer would have (``<layer>.offprincipal_settings.<adapter>``); the buffer is non-persistent so
        that it stays out of the model's ``state_dict()`` (see :class:`OffPrincipalLayer`)."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, module in model.named_modules():
            if isinstance(module, OffPrincipalLayer) and adapter_name in module.offprincipal_settings:
                name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
                selected[f"{name}.offprincipal_settings.{adapter_name}"] = module.offprincipal_settings[adapter_name]
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's remapping of a checkpoint's keys, then the check that the adapter's saved settings
        (``offprincipal_settings``: k and sides per layer) are the ones its config gives here, before anything is
        loaded: the factors alone do not fix ΔW, and another top_k, top_k_pattern or sides (from ``config=``, or an
        edited adapter_config.json) would change it silently. A mismatch raises ``ValueError`` naming the layers
        (and removes the adapter that ``load_adapter`` had added); an adapter saved without the settings loads
        with a warning that they cannot be checked."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        mismatched, unchecked = [], 0
        for name, module in model.named_modules():
            if not isinstance(module, OffPrincipalLayer) or adapter_name not in module.offprincipal_settings:
                continue
            key = f"{name}.offprincipal_settings.{adapter_name}"  # non-persistent: PEFT's remap leaves the saved key
            saved = remapped.pop(key, remapped.pop(cls._remove_adapter_name_from_key(key, adapter_name), None))
            if saved is None:
                unchecked += 1
                continue
            saved_settings, live_settings = decode_settings(saved.tolist()), module.settings(adapter_name)
            if saved_settings != live_settings:
                mismatched.append(f"{name}: saved {_describe_settings(*saved_settings)}; here "
                                  f"{_describe_settings(*live_settings)}")
        if mismatched:
            peft_config = getattr(model, "peft_config", {})
            if isinstance(peft_config, dict) and len(peft_config) > 1 and hasattr(model, "delete_adapter"):
                model.delete_adapter(adapter_name)  # load_adapter added it next to others: take it out again
            more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
            raise ValueError(
                f"OffPrincipal adapter {adapter_name!r}: its config gives other top_k, sides or basis than the adapter "
                f"was saved with, which would change ΔW — {'; '.join(mismatched[:3])}{more}. Load it with the "
                "adapter_config.json it was saved with (unedited, no config= with other top_k, top_k_pattern, sides, "
                "basis or basis_seed)."
            )
        if unchecked:
            warnings.warn(
                f"OffPrincipal adapter {adapter_name!r} was saved without its settings (k, sides) for {unchecked} "
                "layers (saved by an older version), so they cannot be checked against its config"
            )
        return remapped

    def _create_and_replace(
        self,
        config: OffPrincipalConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        base = _linear_base(target)
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"OffPrincipal can only adapt linear layers (nn.Linear, GPT-2 Conv1D); target module "
                f"{current_key!r} is a {type(base).__name__}. Remove it from target_modules (or use exclude_modules)."
            )
        if isinstance(base, nn.Linear) and config.fan_in_fan_out:
            config.fan_in_fan_out = resolve_fan_in_fan_out(base, True)  # LoRA's warning; reset to False as LoRA does
        subspace = self._prefetched.get(current_key)
        if subspace is None:  # e.g. matched from a state_dict, or a weight that was on the meta device
            if _from_rank0({current_key: target}):
                subspace = self._subspaces_from_rank0({current_key: target}, config, progress=False)[1][current_key]
            else:
                W = _base_matrix(target)
                if W.device.type == "meta":
                    raise ValueError(
                        f"OffPrincipal: the base weight of {current_key!r} is on the meta device, so its principal "
                        "bases cannot be computed in this process. Load the real weights here, or create the adapter "
                        "with a torch.distributed process group initialised on every rank: rank 0 then computes the "
                        "bases from its real weights and broadcasts them."
                    )
                subspace = self._compute_subspaces({current_key: W}, config, progress=False)[current_key]
        kwargs = dict(
            r=config.r,
            alpha=config.alpha,
            dropout=config.dropout,
            sides=config.sides,
            init=config.init,
            subspace=subspace,
            basis=config.basis,
            basis_seed=config.basis_seed,
        )
        if isinstance(target, OffPrincipalLayer):
            target.update_layer(adapter_name, inference_mode=config.inference_mode, **kwargs)
            return
        new_module = Linear(target, adapter_name, fan_in_fan_out=config.fan_in_fan_out, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an additional adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)


def _describe_settings(k: int, sides: str, basis: str, basis_seed: int) -> str:
    seed = f", basis_seed={basis_seed}" if basis == "random" else ""
    return f"top_k={k}, sides={sides!r}, basis={basis!r}{seed}"
