"""PEFT LoRA on a module's linear layers: what every backbone's shared part is made of."""

from __future__ import annotations

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn

from common.config import Config
from common.errors import ModelError


def add_lora(module: nn.Module, cfg: Config) -> nn.Module:
    """``module`` wrapped by PEFT LoRA on ``lora.target-modules`` (a clear error if a target is missing)."""
    names = {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in cfg.lora.targets if t not in names]
    if missing or not cfg.lora.targets:
        raise ModelError(
            f"lora.target-modules {cfg.lora.target_modules!r}: {missing or 'empty'} not found; "
            f"linear layers of this model: {', '.join(sorted(names))}"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # PEFT accepts floats
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.targets),
        bias="none",
    )
    return get_peft_model(module, peft_cfg)  # type: ignore[arg-type]
