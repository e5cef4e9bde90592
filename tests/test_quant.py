"""Quantized expert blobs (quant/): bit packing, group-wise quantization against HQQ, blobs, the forward.

The HQQ reference is hqq 0.2.8's own quantizer on the CPU with its optimizer on:
`Quantizer.quantize(W, nbits, group_size, optimize=True, round_zero=False, axis=1, device="cpu")`,
scale and zero rounded to float16 as stored (see tests/hqq_ref.py, which benchmarks import too).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import quant
from conftest import run_in_triton_interpreter
from hqq_ref import hqq_bits_per_param, hqq_dequantize, hqq_folder, hqq_linear_dequantize, relative_error
from quant.blob import BlobLayout
from quant.errors import UserError
from quant.pack import pack, packed_length, unpack

SETTINGS = [(8, 64), (4, 64), (3, 64), (2, 16)]  # the widths and group sizes the README's table compares


def matrix(kind: str, rows: int = 256, cols: int = 1024, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=gen) * 0.02
    # Student-t with 3 degrees of freedom: heavy tails, as real weight matrices have a few outliers.
    normal = torch.randn(rows, cols, generator=gen)
    chi2 = torch.randn(3, rows, cols, generator=gen).square().sum(0)
    return normal / (chi2 / 3).sqrt() * 0.02


# ---- packing ----

@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 13), (2, 0), (4, 64), (5, 17), (1, 1, 9)])
def test_pack_round_trips_every_width_and_odd_shape(bits, shape):
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], packed_length(shape[-1], bits))
    assert torch.equal(unpack(packed, bits, shape[-1]), codes)


def test_pack_sizes_and_3_bit_bit_order():
    assert [packed_length(8, b) for b in (8, 4, 3, 2)] == [8, 4, 3, 2]
    assert packed_length(9, 3) == 6 and packed_length(5, 4) == 3 and packed_length(5, 2) == 2
    # Codes 0..7 as one little-endian bit stream, 3 bits each: code k at bits 3k..3k+2.
    stream = int.from_bytes(bytes(pack(torch.arange(8), 3).tolist()), "little")
    assert [(stream >> (3 * k)) & 7 for k in range(8)] == list(range(8))


def test_pack_refuses_unknown_widths_and_wrong_lengths():
    with pytest.raises(UserError, match="bits"):
        pack(torch.zeros(8, dtype=torch.uint8), 5)
    with pytest.raises(UserError, match="9"):
        unpack(torch.zeros(4, dtype=torch.uint8), 3, 9)


# ---- quantization ----

def test_quantize_refuses_bad_formats_naming_the_numbers():
    w = torch.randn(4, 96)
    with pytest.raises(UserError, match=r"64.*96"):
        quant.quantize(w, 4, 64)
    with pytest.raises(UserError, match="5"):
        quant.quantize(w, 5, 32)
    with pytest.raises(UserError, match="NaN"):
        quant.quantize(torch.full((2, 32), float("nan")), 4, 32)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_quantized_tensor_holds_the_format(bits):
    w = matrix("gaussian", 8, 96)
    q = quant.quantize(w, bits, 32)
    assert q.q.dtype == torch.uint8 and q.q.shape == (8, packed_length(96, bits))
    assert q.scale.dtype == q.zero.dtype == torch.float16 and q.scale.shape == q.zero.shape == (8, 3)
    assert q.bits_per_param == bits + 32 / 32
    deq = quant.dequantize(q, torch.float16)
    assert deq.dtype == torch.float16 and deq.shape == w.shape
    assert torch.equal(deq, quant.dequantize(q).half())


def plain_dequantize(q: quant.QuantizedTensor) -> torch.Tensor:
    """The format's formula, element by element in float64, from the stored bytes: a row's codes are one
    little-endian bit stream, code k at bits [bits*k, bits*(k+1)); weight = (code - zero) * scale of its group."""
    rows, cols = q.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    for r in range(rows):
        stream = int.from_bytes(bytes(q.q[r].tolist()), "little")
        for k in range(cols):
            code = (stream >> (q.bits * k)) & ((1 << q.bits) - 1)
            g = k // q.group_size
            out[r, k] = (code - float(q.zero[r, g])) * float(q.scale[r, g])
    return out


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_dequantize_is_the_formats_formula_and_within_half_a_step_of_the_weight(bits):
    """Against the format written out (not dequantize in another dtype, which is the same arithmetic): the
    value of every code; and each weight that was not clipped to the end of the code range lies within half a
    step (its group's scale) of the value its code stands for, as rounding to the nearest code promises."""
    w = matrix("student_t3", 6, 96, seed=bits)
    q = quant.quantize(w, bits, 32)
    deq = quant.dequantize(q)
    torch.testing.assert_close(deq.double(), plain_dequantize(q), rtol=1e-6, atol=1e-12)
    codes = torch.tensor([[(int.from_bytes(bytes(q.q[r].tolist()), "little") >> (bits * k)) & ((1 << bits) - 1)
                           for k in range(96)] for r in range(6)])
    step = q.scale.float().repeat_interleave(32, dim=1)
    inside = (codes > 0) & (codes < (1 << bits) - 1)
    assert inside.float().mean() > 0.5
    assert bool(((w - deq).abs() <= step / 2 * (1 + 1e-3))[inside].all())


def test_constant_and_zero_groups_are_exact():
    w = torch.cat([torch.zeros(2, 32), torch.full((2, 32), -0.75), torch.full((2, 32), 3.0)])
    for bits in (8, 4, 3, 2):
        assert torch.equal(quant.dequantize(quant.quantize(w, bits, 32)), w)


@pytest.mark.parametrize("bits, size", [(4, 1e6), (2, 1e5)])
def test_values_too_large_for_float16_scales_are_refused_not_stored_as_garbage(bits, size):
    w = matrix("gaussian", 4, 64) / 0.02 * size  # groups span ~5 x size: a scale beyond float16's 65504
    with pytest.raises(UserError, match="values too large for float16 scales"):
        quant.quantize(w, bits, 64)
    assert relative_error(w, quant.dequantize(quant.quantize(w, 8, 64))) < 0.01  # 255 steps: the scale fits


@pytest.mark.parametrize("kind", ["gaussian", "student_t3"])
@pytest.mark.parametrize("bits,group_size", SETTINGS)
def test_error_is_no_worse_than_hqq_at_no_more_bits(kind, bits, group_size):
    w = matrix(kind)
    q = quant.quantize(w, bits, group_size)
    ours = relative_error(w, quant.dequantize(q))
    hqq = relative_error(w, hqq_dequantize(w, bits, group_size))
    assert ours <= hqq, f"{kind} {bits}-bit g{group_size}: ours {ours:.5f} > HQQ {hqq:.5f}"
    assert q.bits_per_param <= hqq_bits_per_param(bits, group_size)


def test_the_hqq_reference_is_hqqs_stronger_setting():
    """tests/hqq_ref.py calls HQQ's quantizer with an unrounded zero point; HQQLinear's default config rounds
    the zero at 4 bits and errs more, so comparing against the former is the harder test (and ours beats both)."""
    w = matrix("gaussian", 64, 512)
    reference, layer_default = (relative_error(w, f(w, 4, 64)) for f in (hqq_dequantize, hqq_linear_dequantize))
    assert reference < layer_default
    assert relative_error(w, quant.dequantize(quant.quantize(w, 4, 64))) < reference


# ---- expert blobs ----

D, FFN = 128, 192


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(FFN, D, generator=gen) * 0.05, torch.randn(D, FFN, generator=gen) * 0.05,
            torch.randn(FFN, D, generator=gen) * 0.05)


def reference_forward(w: dict, x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w["w1"].T) * (x @ w["w3"].T)) @ w["w2"].T


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 64), (3, 32), (2, 16)])
def test_blob_round_trip_and_forward_match_dequantized_weights(weights, bits, group_size):
    blob = quant.pack_expert(*weights, bits, group_size)
    layout = quant.expert_layout(D, FFN, bits, group_size)
    assert blob.dtype == torch.uint8 and blob.numel() == layout.nbytes
    parsed = BlobLayout.parse(blob.numpy().tobytes(), source="expert")
    assert parsed == layout and parsed.kind == "quant" and parsed.bits == bits
    w = quant.unpack_expert(parsed, blob)
    for name, original in zip(("w1", "w2", "w3"), weights):
        assert w[name].shape == original.shape
        assert torch.equal(w[name], quant.dequantize(quant.quantize(original, bits, group_size)))
    x = torch.randn(5, D)
    assert torch.allclose(quant.expert_forward(parsed, parsed.views(blob), x), reference_forward(w, x), atol=1e-5)


def test_forward_in_row_blocks_and_in_bfloat16(weights, monkeypatch):
    """The torch path (prefill, or no compiled CPU kernels): several row blocks per matrix."""
    import quant.expert
    from quant import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_torch_forced", True)
    layout = quant.expert_layout(D, FFN, 4, 64)
    blob = quant.pack_expert(*weights, 4, 64)
    w, x = quant.unpack_expert(layout, blob), torch.randn(3, D)
    ref = reference_forward(w, x)
    monkeypatch.setattr(quant.expert, "ROW_BLOCK_ELEMS", 1000)  # several row blocks per matrix
    assert torch.allclose(quant.expert_forward(layout, layout.views(blob), x), ref, atol=1e-5)
    y = quant.expert_forward(layout, layout.views(blob), x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert relative_error(ref, y) < 2e-2


def test_expert_shapes_are_checked(weights):
    w1, w2, w3 = weights
    with pytest.raises(UserError, match="w2"):
        quant.pack_expert(w1, w1, w3, 4, 64)
    with pytest.raises(UserError, match="group size 50"):
        quant.expert_layout(D, FFN, 4, 50)


def test_corrupt_or_unknown_version_blob_is_refused(weights):
    good = quant.pack_expert(*weights, 4, 64).numpy().tobytes()
    with pytest.raises(UserError, match="bad magic"):
        BlobLayout.parse(b"NOTABLOB" + good[8:], source="expert")
    with pytest.raises(UserError, match="version 7"):
        BlobLayout.parse(good[:8] + (7).to_bytes(4, "little") + good[12:], source="expert")
    with pytest.raises(UserError, match="corrupt"):
        BlobLayout.parse(good[:16] + b"{garbage" + good[24:], source="expert")
    with pytest.raises(UserError, match="truncated"):
        BlobLayout.parse(good[:10], source="expert")


@pytest.mark.parametrize("field, value", [
    ("nbytes", float("inf")), ("bits", "4"), ("kind", 5), ("offset", "256"), ("extra", []),
])
def test_blob_header_fields_of_the_wrong_type_are_corrupt(weights, field, value):
    good = quant.pack_expert(*weights, 4, 64).numpy().tobytes()
    n = int.from_bytes(good[12:16], "little")
    body = json.loads(good[16:16 + n])
    if field == "offset":
        body["tensors"][0][3] = value
    else:
        body[field] = value
    raw = json.dumps(body).encode()
    header = b"MOEBLOB\x00" + (1).to_bytes(4, "little") + len(raw).to_bytes(4, "little") + raw
    with pytest.raises(UserError, match="corrupt blob header"):
        BlobLayout.parse(header, source="expert")


# ---- fused GPU kernel ----

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 64), (3, 64), (2, 16)])
def test_triton_gemv_matches_expert_forward(weights, bits, group_size):
    pytest.importorskip("triton")
    layout = quant.expert_layout(D, FFN, bits, group_size)
    blob = quant.pack_expert(*weights, bits, group_size).cuda()
    x = torch.randn(1, D, device="cuda", dtype=torch.float16)
    ref = quant.expert_forward(layout, layout.views(blob), x.float(), fused=False)
    got = quant.expert_forward(layout, layout.views(blob), x)  # one token on CUDA: the fused kernels
    assert got.dtype == torch.float16 and got.shape == (1, D)
    assert relative_error(ref, got) < 2e-3


INTERPRETER_CHECK = """
import torch, quant
torch.manual_seed(0)
w1, w2, w3 = torch.randn(40, 32) * 0.05, torch.randn(32, 40) * 0.05, torch.randn(40, 32) * 0.05
for bits, group in [(8, 8), (4, 8), (3, 8), (2, 8)]:
    layout = quant.expert_layout(32, 40, bits, group)
    views = layout.views(quant.pack_expert(w1, w2, w3, bits, group))
    x = torch.randn(1, 32)
    fused, ref = (quant.expert_forward(layout, views, x, fused=f) for f in (True, False))
    assert torch.allclose(fused, ref, atol=1e-5), (bits, (fused - ref).abs().max())
    q = quant.quantize(torch.randn(19, 24), bits, 8)   # rows not a multiple of the block; 3-bit rows of 9 bytes
    v = torch.randn(1, 24)
    fused, ref = (quant.linear(v, q, fused=f) for f in (True, False))
    assert fused.shape == (1, 19) and torch.allclose(fused, ref, atol=1e-5), (bits, (fused - ref).abs().max())
print("ok")
"""


def test_triton_kernels_in_the_interpreter():
    """The fused kernels' indexing and arithmetic, run by Triton's CPU interpreter (when triton is installed)."""
    pytest.importorskip("triton")
    run_in_triton_interpreter(INTERPRETER_CHECK)


def test_triton_kernels_compile_to_cubin_for_ampere_and_hopper():
    """The interpreter runs what the GPU compiler may refuse (block shapes, dtypes, pointer arithmetic): compile
    both kernels to machine code for sm_80 (A100, RTX 30xx) and sm_90 (H100) at every width and input dtype.
    No GPU needed: Triton carries its own ptxas."""
    pytest.importorskip("triton")  # the test extras install it on Linux x86-64 only
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from quant import triton_gemv as g

    blob = {"s": "*fp16", "z": "*fp16"}  # scales and zeros are fp16 in every blob
    sizes = {"N": "i32", "K": "i32", "row_bytes": "i32", "n_groups": "i32"}
    meta = {"BITS": "constexpr", "GROUP": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    for arch in (80, 90):
        for bits in (8, 4, 3, 2):
            constexprs = {"BITS": bits, "GROUP": 64, "BLOCK_N": g.BLOCK_N, "BLOCK_K": g.BLOCK_K}
            kernels = [(g._gemv_kernel, {"q_ptr": "*u8", "s_ptr": blob["s"], "z_ptr": blob["z"], "x_ptr": x,
                                         "y_ptr": "*fp32", **sizes, **meta})
                       for x in ("*fp16", "*bf16", "*fp32")]  # a token in the model's dtype; fp32 h (w2 x h)
            kernels += [(g._gate_up_kernel, {"q1_ptr": "*u8", "s1_ptr": blob["s"], "z1_ptr": blob["z"], "q3_ptr": "*u8",
                                             "s3_ptr": blob["s"], "z3_ptr": blob["z"], "x_ptr": x, "h_ptr": "*fp32",
                                             **sizes, **meta})
                        for x in ("*fp16", "*bf16")]
            for kernel, signature in kernels:
                source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                compiled = compile(source, target=GPUTarget("cuda", arch, 32),
                                   options={"enable_fp_fusion": g.FP_FUSION})  # as the launches ask
                assert compiled.asm.get("cubin"), (arch, bits, kernel.fn.__name__, signature["x_ptr"])


# ---- the demo model's real expert matrices ----

REAL_EXPERTS = [(0, 0), (2, 5), (3, 7)]  # (layer, expert): from three of the demo model's four layers


def test_error_on_real_demo_experts_is_no_worse_than_hqq_at_no_more_bits():
    """The trained demo model's expert matrices (w1, w3 [320, 192], w2 [192, 320]) rather than synthetic ones."""
    from offload.models import open_checkpoint
    from offload.models.mixtral import expert_names
    from offload.runtime import resolve_model_path

    ckpt = open_checkpoint(resolve_model_path("demo"))
    try:
        mats = {f"L{layer}.E{e}.w{i}": ckpt.read(name, dtype=torch.float32)
                for layer, e in REAL_EXPERTS for i, name in zip((1, 2, 3), expert_names(layer, e))}
    finally:
        ckpt.close()
    failures = []
    for bits, group_size in SETTINGS:
        for key, w in mats.items():
            q = quant.quantize(w, bits, group_size)
            ours = relative_error(w, quant.dequantize(q))
            hqq = relative_error(w, hqq_dequantize(w, bits, group_size))
            if ours > hqq:
                failures.append(f"{key} {bits}-bit g{group_size}: ours {ours:.5f} > HQQ {hqq:.5f}")
            assert q.bits_per_param <= hqq_bits_per_param(bits, group_size)
    assert not failures, "; ".join(failures)


# ---- the converted demo model, end to end, against float32 and against HQQ at the same width ----

WINDOW = 256


@pytest.fixture(scope="module")
def heldout_float32():
    """The demo model's float32 logits [T, V] over four windows of held-out text (`<s>` + 255 tokens each),
    with the windows' token ids: text it never trained on."""
    from offload.demo import corpus
    from offload.runtime import resolve_model_path

    src = resolve_model_path("demo")
    rt = offload_load(src)
    ids = rt.tokenizer.encode(corpus("heldout"))[1:]
    windows = [[rt.tokenizer.bos_id] + ids[i:i + WINDOW - 1] for i in range(0, 4 * (WINDOW - 1), WINDOW - 1)]
    return src, windows, window_logits(rt, windows)


def offload_load(folder):
    import offload

    return offload.load(folder, device="cpu", dtype="float32", context=WINDOW)


def window_logits(rt, windows: list[list[int]]) -> torch.Tensor:
    """Teacher-forced logits [T, V] of every position of every window (each forward starts at position 0)."""
    return torch.cat([rt.model.forward(torch.tensor(w), 0, all_logits=True) for w in windows])


def closeness(logits: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(distance of the logits from float32's, relative to float32's spread around each position's mean;
    the fraction of positions whose most likely next token is float32's)."""
    distance = float((logits - exact).norm() / (exact - exact.mean(-1, keepdim=True)).norm())
    return distance, float((logits.argmax(-1) == exact.argmax(-1)).float().mean())


@pytest.mark.parametrize("bits,group_size", SETTINGS)
def test_a_converted_demo_model_predicts_held_out_text_as_well_as_hqq_at_that_width(heldout_float32, tmp_path,
                                                                                   bits, group_size):
    """`convert` at each width, run end to end: its logits on held-out text are about as close to float32's as
    those of the same model with HQQ's experts at the same width and group size, measured here as the yardstick:
    within 1.5x HQQ's distance, and the same most likely next token as float32 within 3 points of HQQ's
    agreement. Ours measures 0.78x-1.15x HQQ's distance (the most at 2 bits, where it also agrees 1.6 points
    less often, though its held-out perplexity is lower: bench/results/quant-cpu.json), while every expert
    weight 20% too large puts it 2x (3 bits) to 16x (8 bits) HQQ's distance away."""
    from offload.convert import convert

    src, windows, exact = heldout_float32
    ours = closeness(window_logits(offload_load(convert(src, tmp_path / "ours", bits, group_size)), windows), exact)
    hqq = closeness(window_logits(offload_load(hqq_folder(src, tmp_path / "hqq", bits, group_size)), windows), exact)
    assert ours[0] <= 1.5 * hqq[0], f"{bits}-bit: distance from float32 {ours[0]:.4f}, HQQ {hqq[0]:.4f}"
    assert ours[1] >= hqq[1] - 0.03, f"{bits}-bit: next token as float32's {ours[1]:.3f}, HQQ {hqq[1]:.3f}"


# ---- sizes (quant/units.py) ----


@pytest.mark.parametrize("text, expected", [
    ("12GiB", 12 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("30KiB", 30 * 1024),
    ("2TiB", 2 * 2**40), ("1TB", 10**12), ("1.5TiB", 3 * 2**39), ("12gib", 12 * 2**30), ("100kB", 100_000),
    (" 12 GiB ", 12 * 2**30), ("4096", 4096), ("4096B", 4096), (4096, 4096), (None, None),
])
def test_sizes_people_write_are_bytes(text, expected):
    from quant.units import parse_bytes

    assert parse_bytes(text, "--vram") == expected


@pytest.mark.parametrize("text, hint", [
    ("12G", "write 12GiB or 12GB"), ("512M", "write 512MiB or 512MB"), ("1.5T", "write 1.5TiB or 1.5TB"),
    ("64k", "write 64KiB or 64KB"),
    # A lower-case b reads as bits elsewhere (accelerate gives 12Gb = 1.5 GB): asked, not guessed.
    ("12Gb", "write 12GiB or 12GB"), ("12gb", "write 12GiB or 12GB"),
])
def test_an_ambiguous_unit_is_refused_saying_what_to_write(text, hint):
    from quant.units import parse_bytes

    with pytest.raises(UserError) as info:
        parse_bytes(text, "--vram")
    assert str(info.value) == f"--vram {text!r} is not a size ({hint})"


@pytest.mark.parametrize("value", ["9" * 400 + "GiB", "9" * 5000, "8EiB", 2**70, "9223372036854775808"])
def test_a_size_beyond_any_machine_is_refused_in_one_short_line(value):
    from quant.units import parse_bytes

    with pytest.raises(UserError, match=r"^--vram .{1,45} is (larger than any machine's memory|not a size) "):
        parse_bytes(value, "--vram")
    assert parse_bytes("9223372036854775807", "--vram") == 2**63 - 1


@pytest.mark.parametrize("value", ["12 parsecs", "", "GiB", "-1GiB", "infGiB", "nanGB", "12.5", "1e3GB",
                                   True, -5, float("inf"), float("nan")])
def test_what_is_not_a_size_is_refused_naming_the_flag(value):
    from quant.units import parse_bytes

    with pytest.raises(UserError, match=r"^--ram .* is not a size \(use e\.g\. 12GiB"):
        parse_bytes(value, "--ram")


def test_cli_an_ambiguous_size_is_one_line_exit_2():
    from conftest import run_cli

    result = run_cli("inspect", "demo", "--vram", "12G")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "--vram '12G' is not a size (write 12GiB or 12GB)" in result.stderr
