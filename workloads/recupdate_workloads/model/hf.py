"""What running any Hugging Face causal LM needs beyond ``from_pretrained``: the device and dtype to load it
with, and the names of the layers LoRA adapts (they differ by architecture).

- Device: CUDA when this process sees a GPU (a Ray Train worker with ``gpusPerWorker``, a Serve replica with
  ``serving.resources.gpus``), else the CPU. ``RECUPDATE_DEVICE`` overrides it (``cpu``, ``cuda``, ``cuda:1``).
- Dtype: bfloat16 on a GPU that supports it, float32 elsewhere. Transformers loads a checkpoint in the dtype it
  was saved in, which for released models is bfloat16; on a CPU that is slow and gives scores that differ from
  a float32 run, so CPUs get float32 whatever the checkpoint says.
- LoRA targets: Llama, Qwen2 and Mistral name their projections ``q_proj`` ... ``down_proj``; GPT-2 has
  ``c_attn``, ``c_proj`` and ``c_fc`` (``Conv1D``, not ``nn.Linear``). Without an explicit list every linear
  layer but the output head is adapted (PEFT's ``all-linear``), resolved here to the module names so the run
  records what it trained; an explicit name that matches no layer is an error that lists the model's layers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

DEVICE_ENV = "RECUPDATE_DEVICE"
#: Spellings of "every linear layer but the output head".
AUTO_TARGETS = ("auto", "all-linear")


def default_device() -> str:
    """``$RECUPDATE_DEVICE`` when set, else ``cuda`` when a GPU is visible, else ``cpu``."""
    env = os.environ.get(DEVICE_ENV, "").strip()
    if env:
        return env
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on a GPU that supports it (float16 on one that does not), float32 on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_dtype(spec: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """A dtype from a config value: None or ``auto`` -> ``default_dtype(device)``; else a torch dtype name
    (``bfloat16``, ``float16``, ``float32``)."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec is None or spec == "auto":
        return default_dtype(device)
    dtype = getattr(torch, str(spec), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown dtype {spec!r}: use auto, bfloat16, float16 or float32")
    return dtype


def _linear_classes() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def _linear_modules(model: Any) -> list[str]:
    """Full names of the model's linear layers (``nn.Linear`` and GPT-2's ``Conv1D``), the output head
    excluded."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    classes = _linear_classes()
    return [full for full, m in base.named_modules() if isinstance(m, classes) and m is not head]


def linear_module_names(model: Any) -> list[str]:
    """The distinct leaf names of the model's linear layers, the output head excluded, sorted: what PEFT's
    ``all-linear`` adapts."""
    return sorted({full.rsplit(".", 1)[-1] for full in _linear_modules(model)})


def lora_target_modules(model: Any, requested: str | Sequence[str] | None) -> list[str]:
    """The LoRA ``target_modules`` for ``model``: every linear layer but the head when ``requested`` is
    empty, None, ``auto`` or ``all-linear``; else ``requested``, checked: each name must be the leaf name of
    at least one linear layer, or a dotted suffix of one's full name (as PEFT matches names), or a ValueError
    lists the model's linear layers."""
    modules = _linear_modules(model)
    available = sorted({full.rsplit(".", 1)[-1] for full in modules})
    if requested is None or (isinstance(requested, str) and requested in AUTO_TARGETS):
        names: list[str] = []
    elif isinstance(requested, str):
        names = [requested]
    else:
        names = [str(n) for n in requested]
    if not names or any(n in AUTO_TARGETS for n in names):
        if not available:
            raise ValueError(f"{type(model).__name__} has no linear layers for LoRA to adapt")
        return available
    missing = [n for n in names if not any(full == n or full.endswith("." + n) for full in modules)]
    if missing:
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"LoRA target modules {missing} are not linear layers of this {arch} model; "
            f"its linear layers are {available} (leave lora.targetModules empty to adapt them all)"
        )
    return names


def fan_in_fan_out(model: Any, targets: Sequence[str]) -> bool:
    """Whether the targeted layers store their weight transposed (GPT-2's ``Conv1D``), which PEFT's LoRA must
    be told (``LoraConfig.fan_in_fan_out``)."""
    from transformers.pytorch_utils import Conv1D

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(
        isinstance(m, Conv1D) and any(full == t or full.endswith("." + t) for t in targets)
        for full, m in base.named_modules()
    )
