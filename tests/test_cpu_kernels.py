"""The fused CPU kernels (quant/cpu_kernels.c) against dequantize-then-matmul, for every quantized kind.

Tolerance: the kernels sum in float32 in another order than the reference (per group, then scaled), so
outputs differ by float rounding, bounded here by 1e-5 x sum_k |x_k W_nk| (float32 activations) and, for
half-precision activations whose result is rounded to their dtype, by one rounding of the output (bfloat16
2^-8, float16 2^-10 relative) on top. Both the AVX-512 build (when this CPU has it) and the portable build are checked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import quant
from quant import cpu_kernels
from quant.pack import pack
from quant.quantize import QuantizedTensor, dequantize

pytestmark = pytest.mark.skipif(cpu_kernels.path() == "torch",
                                reason="no C compiler here: the torch path runs, tested in test_quant.py")

KINDS = [(8, 64), (8, 16), (4, 64), (4, 32), (4, 16), (4, 128), (3, 64), (3, 16), (2, 16), (2, 32)]


@pytest.fixture(scope="module", params=["native", "portable"])
def lib(request):
    if request.param == "native":
        return cpu_kernels.load()
    portable = cpu_kernels.load("x86-64")  # no AVX-512: the portable C loops
    assert portable is not None and portable.moe_isa() == 0
    return portable


def random_quantized(n: int, k: int, bits: int, group_size: int, seed: int) -> QuantizedTensor:
    """Random codes, scales and zero points (not fitted to a weight: every code value occurs)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g)
    scale = (torch.rand(n, k // group_size, generator=g) * 0.02 + 1e-3).half()
    zero = (torch.rand(n, k // group_size, generator=g) * (2 ** bits - 1)).half()
    return QuantizedTensor(pack(codes, bits), scale, zero, (n, k), bits, group_size)


def assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y ~ x @ w.T (x, w float32) within the tolerance of the module docstring."""
    ref = x @ w.T
    bound = 1e-5 * (x.abs() @ w.abs().T)
    if y.dtype in (torch.bfloat16, torch.float16):  # one rounding of the output (bf16 2^-8, fp16 2^-10 relative)
        bound = bound + ref.abs() * torch.finfo(y.dtype).eps
    err = (y.float() - ref).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g} (max |ref| {ref.abs().max().item():.3g})"


@pytest.mark.parametrize("bits,group_size", KINDS)
@pytest.mark.parametrize("n,groups", [(37, 3), (64, 17), (1, 1)])
def test_matmul_equals_dequantize_then_matmul(lib, bits, group_size, n, groups):
    """Odd and even row counts (the kernel takes rows in pairs), group counts on either side of 16 (scales
    are read 16 groups at a time), and every token count 1..16 (tokens go in tiles of 4)."""
    k = group_size * groups
    qt = random_quantized(n, k, bits, group_size, seed=bits * 1000 + n + k)
    w = dequantize(qt, torch.float32)
    for t in range(1, 17):
        x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
        assert_close(cpu_kernels.qmatmul(x, qt.q, qt.scale, qt.zero, bits, group_size, lib=lib), x, w)
    xb = torch.randn(5, k).bfloat16()
    y = cpu_kernels.qmatmul(xb, qt.q, qt.scale, qt.zero, bits, group_size, lib=lib)
    assert y.dtype == torch.bfloat16
    assert_close(y, xb.float(), w)


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 64), (4, 16), (3, 32), (2, 16)])
def test_expert_equals_the_dequantized_expert(lib, bits, group_size):
    D, F_ = 192, 320  # multiples of every group size here, 3 and 5 groups of 64
    gen = torch.Generator().manual_seed(bits)
    weights = [torch.randn(*shape, generator=gen) * 0.05 for shape in ((F_, D), (D, F_), (F_, D))]
    layout = quant.expert_layout(D, F_, bits, group_size)
    blob = quant.pack_expert(*weights, bits, group_size)
    w = quant.unpack_expert(layout, blob)
    for t in (1, 3, 16):
        x = torch.randn(t, D, generator=gen)
        h = F.silu(x @ w["w1"].T) * (x @ w["w3"].T)
        y = cpu_kernels.qexpert(x, layout.views(blob), bits, group_size, lib=lib)
        assert_close(y, h, w["w2"])
        # and what the runtime calls: quant.expert_forward routes CPU tokens through the kernels
        if lib is cpu_kernels.load():
            assert torch.equal(quant.expert_forward(layout, layout.views(blob), x), y)


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 64), (4, 16), (3, 32), (2, 16)])
def test_a_group_of_experts_equals_each_expert_alone(lib, bits, group_size):
    """One call for several experts of a layer (the fine-grained decode path) sums every row as each expert's
    own call does: bit-identical outputs, whatever each expert's token count."""
    D, F_ = 128, 192
    gen = torch.Generator().manual_seed(bits + group_size)
    layout = quant.expert_layout(D, F_, bits, group_size)
    views = [layout.views(quant.pack_expert(*(torch.randn(*shape, generator=gen) * 0.05
                                               for shape in ((F_, D), (D, F_), (F_, D))), bits, group_size))
             for _ in range(5)]
    xs = [torch.randn(t, D, generator=gen) for t in (1, 4, 1, 16, 3)]
    ys = cpu_kernels.qexperts(xs, views, bits, group_size, lib=lib)
    for x, v, y in zip(xs, views, ys):
        assert torch.equal(y, cpu_kernels.qexpert(x, v, bits, group_size, lib=lib))
    assert cpu_kernels.qexperts(xs[:1], views[:1], bits, group_size, lib=lib)[0].shape == (1, D)
    with pytest.raises(ValueError, match="1 to 64 experts"):
        cpu_kernels.qexperts(xs[:2], views[:1], bits, group_size, lib=lib)


@pytest.mark.parametrize("n,blocks", [(37, 3), (64, 17), (1, 1)])
def test_mxfp4_matmul_equals_dequantize_then_matmul(lib, n, blocks):
    """MXFP4 as gpt-oss ships it (quant/mxfp4.py): every E2M1 code, scales from 2^-127 (E8M0 0) up."""
    from quant import mxfp4

    k = 32 * blocks
    gen = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 256, (n, blocks, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 135, (n, blocks), dtype=torch.uint8, generator=gen)
    scales[0, 0] = 0
    w = mxfp4.dequantize(codes, scales, torch.float32)
    for t in range(1, 17):
        x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
        assert_close(cpu_kernels.mxfp4_matmul(x, codes.view(n, -1), scales, lib=lib), x, w)
    xb = torch.randn(3, k).bfloat16()
    y = cpu_kernels.mxfp4_matmul(xb, codes.view(n, -1), scales, lib=lib)
    assert y.dtype == torch.bfloat16
    assert_close(y, xb.float(), w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,F_", [(64, 96), (40, 72)])  # the second: rows not a multiple of 16 or 32 weights
def test_half_precision_expert_equals_torch_in_float32(lib, dtype, D, F_):
    gen = torch.Generator().manual_seed(5)
    w1, w2, w3 = ((torch.randn(*s, generator=gen) * 0.1).to(dtype) for s in ((F_, D), (D, F_), (F_, D)))
    for t in (1, 2, 5, 16):
        x = torch.randn(t, D, generator=gen)
        h = F.silu(x @ w1.float().T) * (x @ w3.float().T)
        assert_close(cpu_kernels.hexpert(x, w1, w2, w3, lib=lib), h, w2.float())
        y = cpu_kernels.hexpert(x.to(dtype), w1, w2, w3, lib=lib)
        assert y.dtype == dtype
        xr = x.to(dtype).float()
        assert_close(y, F.silu(xr @ w1.float().T) * (xr @ w3.float().T), w2.float())


def test_the_kernels_are_deterministic_and_independent_of_the_thread_count():
    qt = random_quantized(300, 512, 4, 64, seed=7)
    x = torch.randn(4, 512)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(cpu_kernels.qmatmul(x, qt.q, qt.scale, qt.zero, 4, 64))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_more_tokens_than_the_kernels_take_go_the_torch_way():
    qt = random_quantized(32, 64, 4, 64, seed=3)
    x = torch.randn(cpu_kernels.MAX_TOKENS + 1, 64)
    assert not cpu_kernels.supports(x, 4, 64) and cpu_kernels.supports(x[:16], 4, 64)
    assert torch.allclose(quant.linear(x, qt), x @ dequantize(qt, torch.float32).T, atol=1e-5)


def test_without_a_compiler_the_torch_path_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert cpu_kernels.load() is None
    with cpu_kernels.torch_path():
        assert cpu_kernels._library() is None
        assert not cpu_kernels.supports(torch.zeros(1, 64), 4, 64)
    assert cpu_kernels._library() is not None


def test_a_failing_build_is_not_cached(monkeypatch, tmp_path):
    """A compiler that fails leaves nothing in the cache folder, so a later working one builds."""
    monkeypatch.setenv("MOE_OFFLOAD_KERNEL_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake-cc 1.0 && exit 0\necho broken >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert cpu_kernels.load() is None
    assert list((tmp_path / "cache").iterdir()) == []
