"""Device choice, right for CUDA as well as the CPU (timing lives with the benchmark)."""

from __future__ import annotations

import torch

from lmpress.errors import LmpressError


def resolve_device(spec: str, field: str = "device") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA on a machine without it is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LmpressError(f"{field}: '{spec}' asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LmpressError(
                f"{field}: '{spec}' asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return device


def describe(device: torch.device) -> dict:
    info = {"device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info
