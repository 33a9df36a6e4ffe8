"""Helpers that tracker plugins share, re-exported by :mod:`hookloop.tracking`: secret
masking (configuration keys, environment values, command lines), flattening a nested
configuration, converting images, and checking that an SDK is installed."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["MASK", "SECRET_ENV_VARS", "flatten_config", "image_to_hwc_uint8", "mask_argv",
           "mask_secrets", "mask_text", "sdk_installed"]

MASK = "***"
SECRET_ENV_VARS = (
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_USERNAME",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "GITHUB_TOKEN",
    "OPENAI_API_KEY",
    "AZURE_STORAGE_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
_SECRET_KEY = re.compile(
    r"passw(or)?d|secret|credential|^key$|"
    r"(^|[_\-./])(api[_\-]?key|apikey|access[_\-]?key|private[_\-]?key|token|auth|auth[_\-]?token)$",
    re.IGNORECASE,
)


def _secret_values() -> list[str]:
    values = []
    for name, value in os.environ.items():
        if (name in SECRET_ENV_VARS or _SECRET_KEY.search(name)) and len(value) >= 4:
            values.append(value)
    return sorted(set(values), key=len, reverse=True)


def mask_text(text: str, secrets: list[str] | None = None) -> str:
    """Replace every value of a secret environment variable found in ``text``."""
    for value in _secret_values() if secrets is None else secrets:
        text = text.replace(value, MASK)
    return text


def mask_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with secret values masked, and the value after (or in) a secret-looking
    option (``--api-key X``, ``--token=X``) too."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        name, eq, _value = arg.partition("=")
        secret_opt = name.startswith("-") and bool(_SECRET_KEY.search(name.lstrip("-")))
        if secret_opt and eq:
            out.append(f"{name}={MASK}")
        else:
            out.append(mask_text(arg))
            hide_next = secret_opt
    return out


def mask_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` (nested dicts too) with secret-looking keys and the values
    of secret environment variables replaced by ``"***"``."""
    secrets = _secret_values()

    def clean(key: str, value: Any) -> Any:
        if _SECRET_KEY.search(str(key)):
            return MASK
        if isinstance(value, Mapping):
            return {str(k): clean(str(k), v) for k, v in value.items()}
        if isinstance(value, str):
            return mask_text(value, secrets)
        return value

    return {str(k): clean(str(k), v) for k, v in config.items()}


def flatten_config(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened to ``"outer/inner"`` keys (for backends with flat
    parameter namespaces)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{name}/"))
        else:
            out[name] = value
    return out


def image_to_hwc_uint8(image: torch.Tensor) -> Any:
    """A CHW (or HW) tensor with values in [0, 1] as an HWC (or HW, for one channel)
    uint8 numpy array, the layout image SDKs take."""
    img = image.detach().float().cpu()
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.ndim != 3:
        raise ValueError(f"expected an image tensor (C, H, W); got shape {tuple(img.shape)}")
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    if img.shape[2] == 1:
        img = img[:, :, 0]
    return img.numpy()


def sdk_installed(module: str) -> bool:
    """Whether a tracker SDK can be imported, without importing it."""

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError, AttributeError):  # a None or broken sys.modules entry
        return False
