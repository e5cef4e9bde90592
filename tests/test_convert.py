"""`moe-offload convert`: quantized folders that generate runs, the invariant for quantized blobs, atomicity."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import torch

import offload
import quant
from offload.models import open_checkpoint
from offload.convert import convert
from offload.formats.converted import PARTIAL_MARKER, read_experts_header
from offload.generate import decode_one, prefill
from offload.runtime import resolve_model_path
from quant.errors import UserError

from conftest import run_cli


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("q") / "tiny-q4"
    result = run_cli("convert", tiny_checkpoint, dst, "--bits", "4", "--group-size", "32")
    assert result.returncode == 0, result.stderr
    return dst


@pytest.fixture(scope="module")
def dense4(tiny_checkpoint, tmp_path_factory):
    """4-bit experts and 4-bit attention projections."""
    dst = tmp_path_factory.mktemp("qd") / "tiny-q4-d4"
    result = run_cli("convert", tiny_checkpoint, dst, "--bits", "4", "--group-size", "32", "--dense-bits", "4")
    assert result.returncode == 0, result.stderr
    return dst


def greedy(folder, steps=10, **options):
    rt = offload.load(folder, device="cpu", context=128, **options)
    ids = rt.encode("The quick brown fox jumps")
    logits = [prefill(rt.model, torch.tensor(ids))]
    for i in range(steps):
        logits.append(decode_one(rt.model, int(logits[-1].argmax()), len(ids) + i))
    return torch.stack(logits), rt


def test_converted_folder_generates_and_moves_quantized_blobs(quantized, tiny_checkpoint):
    info = json.loads((quantized / "moe_offload.json").read_text())
    assert info["bits"] == 4 and info["group_size"] == 32
    result = run_cli("generate", quantized, "The quick brown fox", "-n", "8", "--json", "--vram", "1GiB")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    fp32_blob = offload.load(tiny_checkpoint, device="cpu").store.layout.nbytes
    assert stats["blob_bytes"] * 5 < fp32_blob  # 4-bit codes + fp16 scales/zeros vs fp32 weights
    assert stats["bytes_h2d"] == (stats["expert_misses"] - stats["cpu_expert_calls"] + stats["prefetch_issued"]) * stats["blob_bytes"]


def test_every_output_file_gets_the_same_permissions(quantized):
    """safetensors writes its file owner-only (0600); a model folder others share must be readable as a whole."""
    from quant.files import current_umask

    modes = {p.name: p.stat().st_mode & 0o777 for p in quantized.iterdir()}
    assert set(modes.values()) == {0o666 & ~current_umask()}, modes


def test_the_same_vram_holds_more_quantized_experts(quantized, tiny_checkpoint):
    plain = offload.load(tiny_checkpoint, device="cpu", context=128).store.plan
    vram = plain.dense_bytes + plain.kv_bytes + plain.margin_bytes + 2 * plain.blob_bytes
    small = offload.load(quantized, device="cpu", context=128, vram=vram).store.plan
    assert offload.load(tiny_checkpoint, device="cpu", context=128, vram=vram).store.plan.device_slots == 2
    assert small.dense_bytes == plain.dense_bytes  # fp16 dense weights, computed in float32 as the original's
    # A quantized prefill dequantizes a block of weights at a time: the plan's workspace holds that block
    # (tests/test_memory.py); the rest of the two float slots' bytes holds more, smaller experts.
    assert small.margin_bytes == plain.margin_bytes + small.workspace.dequant
    assert small.device_slots == (2 * plain.blob_bytes - small.workspace.dequant) // small.blob_bytes > 2


def test_quantized_logits_stay_close_to_the_original(quantized, tiny_checkpoint):
    original, _ = greedy(tiny_checkpoint, steps=0)
    q, _ = greedy(quantized, steps=0)
    assert torch.nn.functional.cosine_similarity(original[0], q[0], dim=0) > 0.99


@pytest.mark.parametrize("folder", ["quantized", "dense4"])
def test_quantized_results_are_bit_identical_across_budgets_and_prefetch(folder, request):
    quantized = request.getfixturevalue(folder)
    reference, rt = greedy(quantized)
    plan = rt.store.plan
    fixed = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes
    for slots, prefetch, ram in ((2, 0, None), (3, 1, 3 * plan.blob_bytes), (9, 2, None)):
        logits, rt = greedy(quantized, vram=fixed + slots * plan.blob_bytes, ram=ram, prefetch=prefetch)
        assert rt.store.plan.device_slots == slots
        assert torch.equal(logits, reference), (slots, prefetch, ram)


@pytest.mark.parametrize("folder", ["tiny_checkpoint", "quantized", "dense4"])
def test_the_kernel_warm_up_at_load_changes_nothing(folder, request):
    """On a GPU, load runs each one-token matmul once (the Triton kernels compile there, not in the first
    decode step). It only computes: the store's tables and counters, and what is generated, stay the same."""
    from offload.runtime import warm_up_kernels

    folder = request.getfixturevalue(folder)
    reference, rt = greedy(folder, steps=4)
    rt = offload.load(folder, device="cpu", context=128)
    store = rt.store
    def state():
        return (store.stats_.as_dict(), list(store.dev_table.key_of), list(store.dev_table.free),
                list(store.host_table.key_of))

    before = state()
    warm_up_kernels(rt.model, store)
    assert state() == before
    ids = rt.encode("The quick brown fox jumps")
    logits = [prefill(rt.model, torch.tensor(ids))]
    for i in range(4):
        logits.append(decode_one(rt.model, int(logits[-1].argmax()), len(ids) + i))
    assert torch.equal(torch.stack(logits), reference)


def test_dense_bits_keep_the_attention_projections_quantized_on_the_device(quantized, dense4, tiny_checkpoint,
                                                                           tmp_path):
    dense8 = convert(tiny_checkpoint, tmp_path / "d8", bits=4, group_size=32, dense_bits=8)
    info = json.loads((dense4 / "moe_offload.json").read_text())
    assert (info["dense_bits"], info["dense_group_size"]) == (4, 64)
    stored = open_checkpoint(dense4).locations
    assert "model.layers.0.self_attn.q_proj.weight" not in stored
    assert stored["model.layers.0.self_attn.q_proj.weight.q"].dtype == torch.uint8
    reference, _ = greedy(quantized, steps=0)
    held = {}
    for name, folder, similarity in (("16", quantized, 1.0), ("8", dense8, 0.999), ("4", dense4, 0.99)):
        logits, rt = greedy(folder, steps=0)
        assert torch.nn.functional.cosine_similarity(reference[0], logits[0], dim=0) >= similarity - 1e-6, name
        wq = rt.model.blocks[0].attn.qkv.wq
        assert isinstance(wq, torch.Tensor) if name == "16" else (isinstance(wq, quant.QuantizedTensor) and wq.bits == int(name))
        held[name] = sum(t.numel() * t.element_size() for t in rt.model.dense_tensors())
        assert rt.store.plan.dense_bytes == held[name]  # the memory plan counts what the device really holds
    assert held["16"] > held["8"] > held["4"]
    described = json.loads(run_cli("inspect", dense4, "--json").stdout)
    assert described["bytes_per_expert"] == info["blob_bytes"] and "attention 4-bit" in described["quantized"]


def test_the_demo_model_converts_at_every_width_and_generates(tmp_path):
    for bits, group in ((8, 64), (4, 64), (3, 64), (2, 16)):
        dst = convert(resolve_model_path("demo"), tmp_path / f"demo-{bits}", bits=bits, group_size=group)
        rt = offload.load(dst, device="cpu", context=128)
        text = "".join(rt.generate("The for statement", max_new_tokens=12))
        assert len(rt.last["tokens"]) == 12 and text
        prior = "routing-prior.safetensors"  # the demo's routing prior came along
        assert (dst / prior).read_bytes() == (resolve_model_path("demo") / prior).read_bytes()


def test_interrupted_conversion_leaves_nothing_generate_accepts_and_a_rerun_succeeds(tiny_checkpoint, tmp_path):
    dst = tmp_path / "out"

    def interrupt(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_checkpoint, dst, bits=4, group_size=32, progress=interrupt)
    assert not dst.exists()
    partial = tmp_path / "out.partial"
    assert (partial / PARTIAL_MARKER).is_file()  # what lets the rerun remove it
    result = run_cli("generate", partial, "hello", "-n", "2")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "an unfinished conversion (moe-offload convert stopped before it was done)" in result.stderr
    assert convert(tiny_checkpoint, dst, bits=4, group_size=32) == dst
    assert not partial.exists() and not (dst / PARTIAL_MARKER).exists()
    # Rerunning on a finished conversion with the same settings is a no-op, and says so.
    before = digest(dst)
    assert convert(tiny_checkpoint, dst, bits=4, group_size=32) == dst and digest(dst) == before
    result = run_cli("convert", tiny_checkpoint, dst, "--bits", "4", "--group-size", "32")
    assert result.returncode == 0 and "already converted" in result.stderr and digest(dst) == before


@pytest.mark.parametrize("damage", ["truncate experts.bin", "remove model.safetensors", "remove tokenizer.json"])
def test_a_rerun_onto_a_damaged_conversion_says_so(quantized, tiny_checkpoint, tmp_path, damage):
    dst = tmp_path / "q"
    shutil.copytree(quantized, dst)
    verb, name = damage.split()
    if verb == "truncate":
        with open(dst / name, "r+b") as f:
            f.truncate(1000)
    else:
        (dst / name).unlink()
    before = digest(dst)
    with pytest.raises(UserError, match=f"an earlier conversion of .* that is damaged .*{name}.*remove it"):
        convert(tiny_checkpoint, dst, bits=4, group_size=32)
    assert digest(dst) == before  # left as it was: the user decides


@pytest.mark.parametrize("args, needle", [
    (("--bits", "5"), "--bits"),
    (("--bits", "4", "--group-size", "7"), "does not divide"),
    (("--bits", "4", "--dense-bits", "5"), "--dense-bits"),
    (("--bits", "4", "--group-size", "32", "--dst-exists"), "not an earlier conversion"),
])
def test_bad_convert_input_is_one_line_and_leaves_the_source_untouched(tiny_checkpoint, tmp_path, args, needle):
    before = digest(tiny_checkpoint)
    dst = tmp_path / "dst"
    args = list(args)
    if "--dst-exists" in args:
        args.remove("--dst-exists")
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
    result = run_cli("convert", tiny_checkpoint, dst, *args)
    assert result.returncode == 2 and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert digest(tiny_checkpoint) == before
    if (dst / "notes.txt").exists():
        assert (dst / "notes.txt").read_text() == "mine"


def test_a_blob_with_a_corrupt_header_is_refused(quantized, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(quantized, broken)
    data = bytearray((broken / "experts.bin").read_bytes())
    info = json.loads((broken / "moe_offload.json").read_text())
    stride = -(-info["blob_bytes"] // 4096) * 4096
    data[4096 + 5 * stride + 20] ^= 0xFF  # inside expert (0, 5)'s header JSON
    (broken / "experts.bin").write_bytes(bytes(data))
    result = run_cli("generate", broken, "The quick brown fox", "-n", "6", "--ram", "1GiB")
    assert result.returncode == 2 and "corrupt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_source_named_like_the_partial_folder_is_refused_and_kept(tiny_checkpoint, tmp_path):
    src = tmp_path / "mixtral.partial"
    shutil.copytree(tiny_checkpoint, src)
    before = digest(src)
    result = run_cli("convert", src, tmp_path / "mixtral", "--bits", "4", "--group-size", "32")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "source" in result.stderr
    assert digest(src) == before and not (tmp_path / "mixtral").exists()


@pytest.mark.parametrize("kind", ["folder", "file", "symlink"])
def test_a_partial_name_that_convert_did_not_make_is_left_alone(tiny_checkpoint, tmp_path, kind):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    partial = tmp_path / "out.partial"
    if kind == "folder":
        shutil.copytree(mine, partial)
    elif kind == "file":
        partial.write_text("mine")
    else:
        partial.symlink_to(mine, target_is_directory=True)
    with pytest.raises(UserError, match="not made by moe-offload convert; remove or rename it"):
        convert(tiny_checkpoint, tmp_path / "out", bits=4, group_size=32)
    assert (mine / "notes.txt").read_text() == "mine"
    assert (partial / "notes.txt").read_text() == "mine" if kind != "file" else partial.read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_an_unwritable_destination_is_one_line_naming_it(tiny_checkpoint, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    result = run_cli("convert", tiny_checkpoint, tmp_path / "afile" / "x", "--bits", "4", "--group-size", "32")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "afile/x.partial: cannot write" in result.stderr


def test_an_unreadable_source_file_is_cannot_read_naming_it_and_leaves_no_output(tiny_checkpoint, tmp_path,
                                                                                monkeypatch):
    import errno

    real = shutil.copy2

    def copy2(src, dst, **kw):  # what a tokenizer file the user cannot read does (root reads anything)
        if str(src).endswith("tokenizer.json"):
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        return real(src, dst, **kw)

    monkeypatch.setattr(shutil, "copy2", copy2)
    with pytest.raises(UserError, match=r"tokenizer\.json: cannot read \(Permission denied\)$"):
        convert(tiny_checkpoint, tmp_path / "out", bits=4, group_size=32)
    # A failed conversion gives its space back: no DST, no DST.partial (Ctrl-C keeps the marked partial).
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_full_disk_while_copying_an_input_file_is_cannot_write(tiny_checkpoint, tmp_path, monkeypatch):
    import errno

    def copy2(src, dst, **kw):  # sendfile's failure names both files, whichever side failed
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))

    monkeypatch.setattr(shutil, "copy2", copy2)
    with pytest.raises(UserError, match=r"cannot write \(No space left on device\)$"):
        convert(tiny_checkpoint, tmp_path / "out", bits=4, group_size=32)
    assert sorted(tmp_path.iterdir()) == []  # the partial output is removed: the disk is full


def test_a_source_without_a_tokenizer_is_refused_before_converting(tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, src)
    (src / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"tokenizer\.json: missing"):
        convert(src, tmp_path / "out", bits=4, group_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_converted_folder_is_not_converted_again(quantized, tmp_path):
    with pytest.raises(UserError, match="is already a quantized conversion .moe_offload.json.; convert the original"):
        convert(quantized, tmp_path / "again", bits=4, group_size=32)


@pytest.mark.parametrize("field, value, needle", [
    ("version", 99, "field 'version' is 99; this build reads 1"),
    ("bits", 5, "field 'bits' is 5; this build reads 8 or 4 or 3 or 2"),
    ("bits", True, "field 'bits' is true"),
    ("experts_file", "other.bin", "field 'experts_file' is \"other.bin\""),
    ("group_size", 0, "field 'group_size' must be a positive integer, got 0"),
    ("dense_group_size", None, "field 'dense_group_size' must be a positive integer, got null"),
])
def test_a_conversion_record_this_build_cannot_read_is_refused_naming_the_field(dense4, tmp_path, field, value,
                                                                                 needle):
    folder = tmp_path / "q"
    shutil.copytree(dense4, folder)  # 4-bit attention too: its record has a dense group size
    info = json.loads((folder / "moe_offload.json").read_text())
    (folder / "moe_offload.json").write_text(json.dumps({**info, field: value}))
    result = run_cli("generate", folder, "hello", "-n", "2")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "moe_offload.json: " + needle in result.stderr


@pytest.mark.parametrize("body", [
    b'{"layers":3,"experts":6,"stride":8192}',                        # no blob_bytes
    b'{"layers":3,"experts":6,"stride":8192,"blob_bytes":9e999}',     # JSON infinity
    b'{"layers":3,"experts":6,"stride":8192,"blob_bytes":"4096"}',
    b'{"layers":true,"experts":6,"stride":8192,"blob_bytes":4096}',
    b'[3,6,8192,4096]',
])
def test_a_corrupt_experts_file_header_is_refused(quantized, tmp_path, body):
    path = tmp_path / "experts.bin"
    data = bytearray((quantized / "experts.bin").read_bytes())
    data[8:4096] = (struct.pack("<II", 1, len(body)) + body).ljust(4088, b"\x00")
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt experts header"):
        read_experts_header(path)


def test_generate_on_a_corrupt_experts_header_is_one_line(quantized, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(quantized, broken)
    data = bytearray((broken / "experts.bin").read_bytes())
    i = data.index(b'"blob_bytes"')
    data[i:i + 12] = b'"blob_bytez"'
    (broken / "experts.bin").write_bytes(bytes(data))
    result = run_cli("generate", broken, "hello", "-n", "2")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "corrupt experts header" in result.stderr
