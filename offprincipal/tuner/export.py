"""Export an OffPrincipal adapter as a plain PEFT LoRA adapter with exactly the same ΔW.

The effective factors are a LoRA: ΔW = s·B̃Ã, so ``lora_A = Ã`` (r×n) and ``lora_B = s·B̃`` (m×r) with
``LoraConfig(r=r, lora_alpha=r)`` (LoRA scaling 1). No SVD, no approximation; the result loads with
``PeftModel.from_pretrained(base, path)`` without importing offprincipal.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

import torch
from peft import LoraConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import save_file

from .layer import OffPrincipalLayer

_PEFT_PREFIX = "base_model.model."


@torch.no_grad()
def to_lora(model: torch.nn.Module, adapter_name: str = "default") -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, state_dict) of a LoRA adapter equal to ``adapter_name`` of an OffPrincipal ``PeftModel``."""
    config = model.peft_config[adapter_name]
    state_dict: dict[str, torch.Tensor] = {}
    targets, ranks = set(), {}
    for name, module in model.named_modules():
        if not isinstance(module, OffPrincipalLayer) or adapter_name not in module.offprincipal_A:
            continue
        A, B = module.effective_factors(adapter_name)
        state_dict[f"{name}.lora_A.weight"] = A.detach().contiguous().clone()
        state_dict[f"{name}.lora_B.weight"] = (B.detach() * module.scaling[adapter_name]).contiguous()
        short = name.removeprefix(_PEFT_PREFIX)
        targets.add(short)
        ranks[short] = module.r[adapter_name]
    if not state_dict:
        raise ValueError(f"no OffPrincipal layer carries adapter {adapter_name!r}; nothing to export")
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for pname, p in module.modules_to_save[adapter_name].named_parameters():
                state_dict[f"{name}.{pname}"] = p.detach().clone()
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.r,
        target_modules=targets,
        rank_pattern={k: v for k, v in ranks.items() if v != config.r},
        alpha_pattern={k: v for k, v in ranks.items() if v != config.r},
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        base_model_name_or_path=config.base_model_name_or_path,
        task_type=config.task_type,
        fan_in_fan_out=config.fan_in_fan_out,
    )
    return lora_config, state_dict


def save_as_lora(model: torch.nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default") -> LoraConfig:
    """Write :func:`to_lora`'s adapter to ``path`` (``adapter_config.json`` + ``adapter_model.safetensors``),
    atomically: the folder appears complete or not at all."""
    lora_config, state_dict = to_lora(model, adapter_name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        lora_config.save_pretrained(str(tmp))
        save_file({k: v.cpu() for k, v in state_dict.items()}, str(tmp / SAFETENSORS_WEIGHTS_NAME))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lora_config
