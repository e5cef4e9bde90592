"""Dense weights on the device: plain tensors, or kept quantized there (`convert --dense-bits`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import quant


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T for a weight tensor, or for a weight kept quantized on the device."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else quant.linear(x, w)


def parts(w) -> tuple[torch.Tensor, ...]:
    """The tensors that hold a weight: itself, or a quantized weight's codes, scales and zeros."""
    return (w,) if isinstance(w, torch.Tensor) else tuple(w.parts.values())
