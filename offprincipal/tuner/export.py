"""Export an OffPrincipal adapter as a plain PEFT LoRA adapter with exactly the same ΔW.

The effective factors are a LoRA: ΔW = s·B̃Ã, so ``lora_A = Ã`` (r×n) and ``lora_B = s·B̃`` (m×r) with
``LoraConfig(r=r, lora_alpha=r)`` (LoRA scaling 1). No SVD, no approximation; the result loads with
``PeftModel.from_pretrained(base, path)`` without importing offprincipal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from peft import LoraConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import save_file

from ..distributed import full_weight, is_distributed
from ..files import atomic_file
from .layer import OffPrincipalLayer

_PEFT_PREFIX = "base_model.model."


@torch.no_grad()
def to_lora(model: torch.nn.Module, adapter_name: str = "default") -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, state_dict) of a LoRA adapter equal to ``adapter_name`` of an OffPrincipal ``PeftModel``.

    Under FSDP2 the factors are gathered (collectives: call it on every rank); every rank gets the whole adapter."""
    config = model.peft_config[adapter_name]
    state_dict: dict[str, torch.Tensor] = {}
    targets, ranks, transposed = set(), {}, False
    for name, module in model.named_modules():
        if not isinstance(module, OffPrincipalLayer) or adapter_name not in module.offprincipal_A:
            continue
        A, B = (full_weight(t) for t in module.effective_factors(adapter_name))  # gathered under FSDP2
        state_dict[f"{name}.lora_A.weight"] = A.contiguous().clone()
        state_dict[f"{name}.lora_B.weight"] = (B * module.scaling[adapter_name]).contiguous()
        short = name.removeprefix(_PEFT_PREFIX)
        targets.add(short)
        ranks[short] = module.r[adapter_name]
        transposed |= module.fan_in_fan_out
    if not state_dict:
        raise ValueError(f"no OffPrincipal layer carries adapter {adapter_name!r}; nothing to export")
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for pname, p in module.modules_to_save[adapter_name].named_parameters():
                state_dict[f"{name}.{pname}"] = full_weight(p).clone()
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.r,
        target_modules=targets,
        rank_pattern={k: v for k, v in ranks.items() if v != config.r},
        alpha_pattern={k: v for k, v in ranks.items() if v != config.r},
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        base_model_name_or_path=config.base_model_name_or_path,
        task_type=config.task_type,
        fan_in_fan_out=transposed,  # GPT-2 Conv1D; LoRA resolves it per layer on load
    )
    return lora_config, state_dict


# What a PEFT adapter folder holds (PeftModel.save_pretrained writes the first three): save_as_lora writes into a
# folder holding nothing else, and replaces only the files it writes itself.
ADAPTER_FILES = frozenset({CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, "README.md", WEIGHTS_NAME})
_TMP_PREFIX = ".save_as_lora-"


def save_as_lora(
    model: torch.nn.Module,
    path: Union[str, os.PathLike],
    adapter_name: str = "default",
    is_main_process: Optional[bool] = None,
) -> LoraConfig:
    """Write :func:`to_lora`'s adapter to the folder ``path``: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (see :func:`write_lora` for which folders are accepted and how files are written).

    With a default process group (e.g. FSDP2), every rank must call it (the factors are gathered); only the main
    process writes (``is_main_process``, default: rank 0; without a process group: True, as in PEFT's
    ``save_pretrained``). Every rank returns the config."""
    lora_config, state_dict = to_lora(model, adapter_name)
    if is_main_process is None:
        is_main_process = not is_distributed() or torch.distributed.get_rank() == 0
    if is_main_process:
        write_lora(path, lora_config, state_dict)
    return lora_config


def write_lora(path: Union[str, os.PathLike], lora_config: LoraConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a LoRA adapter (``lora_config``; ``state_dict`` in PEFT's saved key format) to the folder ``path``.

    ``path`` must be missing (it is created), empty, or an adapter folder: one holding only files of a PEFT adapter
    (``adapter_config.json``, ``adapter_model.safetensors``, ``adapter_model.bin``, ``README.md``). Anything else
    there raises ``FileExistsError`` naming the folder and the files, and nothing is written or removed. Each of the
    two files is written to a temporary file in the same folder and moved into place with ``os.replace``, so it is
    either the old file or the complete new one; other files of the folder are left untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"save_as_lora: {str(path)!r} exists and is not a folder; pass a folder path")
    if path.is_dir():
        foreign = sorted(e for e in os.listdir(path) if e not in ADAPTER_FILES and not e.startswith(_TMP_PREFIX))
        if foreign:
            shown = ", ".join(foreign[:10]) + (f", … ({len(foreign)} entries)" if len(foreign) > 10 else "")
            raise FileExistsError(
                f"save_as_lora: folder {str(path)!r} holds files that are not a PEFT adapter's ({shown}); it only "
                "writes into a new, empty or adapter-only folder, and never removes what it did not write. "
                "Choose another folder."
            )
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    writers = {
        SAFETENSORS_WEIGHTS_NAME: lambda tmp: save_file(tensors, str(tmp)),  # the weights first, the config last
        CONFIG_NAME: lambda tmp: tmp.write_text(json.dumps(_config_dict(lora_config), indent=2, sort_keys=True)),
    }
    try:
        for name, write in writers.items():
            with atomic_file(path / name, prefix=f"{_TMP_PREFIX}{name}.") as tmp:
                write(tmp)
    except BaseException:
        if created and not any(path.iterdir()):
            path.rmdir()  # the empty folder this call created
        raise


def _config_dict(config: LoraConfig) -> dict:
    """``config`` as ``PeftConfig.save_pretrained`` writes it (sets as lists)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
