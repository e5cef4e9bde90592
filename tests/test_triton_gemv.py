"""quant/triton_gemv.py beyond tests/test_quant.py's checks: split-K (partial sums over slices of K, added in
a fixed order) and groups that do not hold whole units of packed codes, run by Triton's CPU interpreter;
the split count chosen for the device."""

from __future__ import annotations


import pytest

from conftest import run_in_triton_interpreter

triton = pytest.importorskip("triton")

SPLIT_K_CHECK = """
import torch, quant
from quant import triton_gemv as g
torch.manual_seed(0)
# (bits, group, rows, K): rows not a multiple of BLOCK_N; K of several steps (so splits have work); groups
# that hold whole units and groups that do not (6 codes: 3 units of 2 at 4 bits, 1.5 of 4 at 2 bits, 3/4 of
# 8 at 3 bits); K not a multiple of a 3-bit unit's 8 codes (30).
cases = [(8, 64, 40, 1024), (4, 64, 37, 1024), (3, 64, 19, 1536), (2, 16, 33, 768),
         (4, 6, 9, 48), (3, 6, 7, 30), (2, 6, 5, 30)]
for bits, group, n, k in cases:
    q = quant.quantize(torch.randn(n, k), bits, group)
    x = torch.randn(k)
    ref = quant.linear(x[None], q, fused=False)[0]
    for splits in (1, 3, None):
        y = g.dequant_gemv(q.q, q.scale, q.zero, x, bits, group, splits)
        assert y.shape == (n,) and torch.allclose(y, ref, atol=1e-5 * float(ref.abs().max())), (bits, group, splits)
    assert g.splits_for(n, k, bits, x.device) > 1 or k <= g.BLOCK_K  # the default splits what has room to
print("ok")
"""


def test_split_k_and_groups_across_units_match_the_torch_path_in_the_interpreter():
    run_in_triton_interpreter(SPLIT_K_CHECK, timeout=600)


def test_split_k_fills_the_device_only_where_rows_do_not(monkeypatch):
    """An H100 (132 SMs) wants 528 programs: Mixtral's w2 (4096 rows of 14336) gets 4 splits of K, a 1024-row
    k/v projection 16 (its K allows 16 steps), a matrix of 14336 rows none."""
    import torch

    from quant import triton_gemv as g

    monkeypatch.setattr(g, "_programs_wanted", lambda device: g.PROGRAMS_PER_SM * 132)
    cuda = torch.device("cuda")
    assert g.splits_for(4096, 14336, 4, cuda) == 4
    assert g.splits_for(1024, 4096, 4, cuda) == 16
    assert g.splits_for(14336, 4096, 4, cuda) == 1
    assert g.splits_for(4096, 200, 4, cuda) == 1  # shorter than one step: nothing to split
