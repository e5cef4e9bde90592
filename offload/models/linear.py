"""Dense weights on the device: plain tensors, or kept quantized there (`convert --dense-bits`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import quant


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) for a weight tensor, or for a weight kept quantized on the device."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = quant.linear(x, w)
    return y if bias is None else y + bias


def parts(w) -> tuple[torch.Tensor, ...]:
    """The tensors that hold a weight: itself, or a quantized weight's codes, scales and zeros."""
    return (w,) if isinstance(w, torch.Tensor) else tuple(w.parts.values())
