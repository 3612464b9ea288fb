"""The OffPrincipal PEFT method (config, layer, model), registered with PEFT on import.

PEFT 0.21's ``register_peft_method`` only accepts names of its closed ``PeftType`` enum, so the enum is
extended first (``aenum.extend_enum``); both steps are guarded against running twice.
"""

from aenum import extend_enum
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType, register_peft_method

from .config import PEFT_TYPE_NAME, OffPrincipalConfig
from .export import save_as_lora, to_lora
from .layer import Linear, OffPrincipalLayer
from .model import OffPrincipalModel, max_principal_leak

if not hasattr(PeftType, PEFT_TYPE_NAME):
    extend_enum(PeftType, PEFT_TYPE_NAME, PEFT_TYPE_NAME)
if PeftType[PEFT_TYPE_NAME] not in PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=OffPrincipalConfig, model_cls=OffPrincipalModel)

__all__ = ["Linear", "OffPrincipalConfig", "OffPrincipalLayer", "OffPrincipalModel", "max_principal_leak", "save_as_lora", "to_lora"]
