"""Sparse experts (quant/sparse.py, `convert --sparse`, offload/store/partial.py, offload/store/predictor.py):
the sparse forward is the dense one with the dropped neurons zeroed; TARGET 0 is the dense model; tokens do
not depend on budgets, prefetch or the neuron predictors; a partial copy moves the base and the missing chunks,
a guess copy the base and its predicted chunks, and bytes_h2d counts exactly that; the staging buffers are
inside the device budget."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import offload
import quant
from conftest import greedy_logits, inspect_json, make_checkpoint, run_cli
from offload.convert import convert
from offload.demo import DEMO_DIR
from offload.generate import decode_one
from offload.models import family, open_checkpoint
from offload.store import predictor
from quant import sparse
from quant.blob import BlobLayout

CALIBRATION = ("The quick brown fox jumps over the lazy dog. Experts are streamed between disk, pinned memory "
               "and the GPU; the cache keeps the hot ones. ") * 40
PROMPT = "The for statement is used to iterate over"


def dense_reference(x, w):
    """The dense SwiGLU on the blob's own weights, each (token, neuron) with |w3 x| <= thr zeroed."""
    v = F.linear(x, w["w3"])
    return F.linear(F.silu(F.linear(x, w["w1"])) * v * (v.abs() > w["thr"]), w["w2"])


@pytest.mark.parametrize("chunk_bits", sparse.CHUNK_BITS)
def test_sparse_forward_equals_the_dense_expert_with_the_dropped_neurons_zeroed(chunk_bits):
    torch.manual_seed(chunk_bits)
    D, Fn = 64, 96
    w1, w3, w2 = torch.randn(Fn, D) * 0.1, torch.randn(Fn, D) * 0.1, torch.randn(D, Fn) * 0.1
    layout = sparse.sparse_layout(D, Fn, 3, 32, chunk_bits, 32)
    blob = sparse.pack_sparse(w1, w2, quant.quantize(w3, 3, 32), 0.4, layout)
    w = sparse.unpack_sparse(layout, blob)
    for tokens in (1, 5, 40):  # the kernels' batch, and the row-blocked torch path
        x = torch.randn(tokens, D)
        y = quant.expert_forward(layout, layout.views(blob), x)
        want = dense_reference(x, w)
        assert torch.allclose(y, want, atol=1e-5, rtol=1e-4), (chunk_bits, tokens, (y - want).abs().max())
        assert 0.3 < (F.linear(x, w["w3"]).abs() > 0.4).float().mean() < 0.9  # really sparse, not all or nothing
    # The chunks dequantize to the weights given, at their width (float16 chunks exactly as float16 rounds).
    err = (w["w1"] - w1).abs().max() / w1.abs().max()
    assert err < {16: 1e-3, 8: 0.01, 4: 0.1, 3: 0.2, 2: 0.5}[chunk_bits]


def test_the_blob_describes_itself_and_a_neurons_weights_are_one_chunk():
    D, Fn = 64, 96
    torch.manual_seed(0)
    w1, w3, w2 = torch.randn(Fn, D), torch.randn(Fn, D), torch.randn(D, Fn)
    layout = sparse.sparse_layout(D, Fn, 4, 32, 4, 32)
    blob = sparse.pack_sparse(w1, w2, quant.quantize(w3, 4, 32), 1.5, layout)
    parsed = BlobLayout.parse(blob.numpy().tobytes())
    assert parsed == layout and parsed.kind == "sparse" and parsed.extra == layout.extra
    assert layout.extra["chunk_nbytes"] % sparse.CHUNK_ALIGN == 0
    assert sparse.base_nbytes(layout) < layout.record("chunks").offset + 1 <= layout.nbytes
    # Neuron 7's gate row and down column come from its chunk alone.
    chunk = layout.views(blob)["chunks"][7:8].clone()
    gate, down = sparse.chunk_weights(layout, chunk, torch.float32)
    full = sparse.unpack_sparse(layout, blob)
    assert torch.equal(gate[0], full["w1"][7]) and torch.equal(down[0], full["w2"][:, 7])
    assert full["thr"] == 1.5


@pytest.fixture(scope="module")
def demo_sparse(tmp_path_factory):
    """The demo model with 60% of each expert's neurons dropped on its training text, 4-bit up and chunks."""
    return convert(DEMO_DIR, tmp_path_factory.mktemp("sp") / "demo-sparse", 4, 64, sparse=0.6)


def greedy(folder, steps=12, **options):
    with offload.load(folder, device="cpu", dtype="float32", context=128, **options) as rt:
        seq, logits = greedy_logits(rt, rt.encode(PROMPT), steps)
        return seq, logits, rt.stats(), rt.store


def vram_for(folder, slots: int) -> int:
    with offload.load(folder, device="cpu", dtype="float32", context=128) as rt:
        plan = rt.store.plan
    return plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + plan.staging_bytes + slots * plan.blob_bytes


def test_target_zero_equals_the_dense_model_whose_up_projection_is_quantized_alike(tmp_path):
    """TARGET 0 keeps every neuron. The reference is the demo folder with every weight replaced by what the
    sparse folder computes with: its fp16 dense tensors, float16 gate/down chunks, the dequantized 4-bit up
    projection, stored float32 and run as a plain checkpoint."""
    from safetensors.torch import save_file

    dst = convert(DEMO_DIR, tmp_path / "zero", 4, 64, sparse=0.0, chunk_bits=16, calibration_tokens=256)
    with offload.load(dst, device="cpu", dtype="float32") as rt:
        source, cfg = rt.store.source, rt.config
        blob = torch.empty(source.layout.nbytes, dtype=torch.uint8)
        tensors = {}
        ckpt = open_checkpoint(dst)
        tensors.update({name: ckpt.read(name, dtype=torch.float32) for name in ckpt.locations})
        ckpt.close()
        for layer in cfg.moe_layers:
            for e in range(cfg.num_local_experts):
                source.read_into((layer, e), blob)
                w = sparse.unpack_sparse(source.layout, blob)
                assert w["thr"] == 0.0
                names = family(cfg).expert_names(layer, e)
                tensors.update({n: w[k].contiguous() for n, k in zip(names, ("w1", "w2", "w3"))})
    ref = tmp_path / "reference"
    ref.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dst / name, ref / name)
    save_file(tensors, ref / "model.safetensors")
    seq, logits, _, _ = greedy(dst, steps=16)
    want_seq, want, _, _ = greedy(ref, steps=16)
    assert seq == want_seq
    # The up projection runs through the CPU kernels in the sparse folder, dequantized in the reference.
    assert torch.allclose(logits, want, atol=1e-3, rtol=0)


def test_tokens_do_not_depend_on_budgets_prefetch_or_where_the_expert_runs(demo_sparse):
    seq, logits, stats, _ = greedy(demo_sparse)
    assert stats["device_slots"] == 32
    for options in (dict(vram=vram_for(demo_sparse, 3)), dict(vram=vram_for(demo_sparse, 5), prefetch=1),
                    dict(vram=vram_for(demo_sparse, 12), prefetch=2), dict(cpu_experts="always")):
        got_seq, got, got_stats, _ = greedy(demo_sparse, **options)
        assert got_seq == seq and torch.equal(got, logits), options
        assert got_stats["bytes_h2d"] > 0 or options.get("cpu_experts") == "always"


def test_a_miss_moves_the_base_and_only_the_active_chunks_and_bytes_count_exactly_that(demo_sparse, monkeypatch):
    """With every expert fitting on the device nothing is evicted: each expert used is filled once (its base) and
    its slot then holds exactly the union of the neurons its uses activated, recorded here as they are found."""
    found: dict[int, torch.Tensor] = {}
    active = sparse.active_neurons

    def recording(layout, views, x):
        v, mask, idx = active(layout, views, x)
        ptr = views["chunks"].data_ptr()
        found[ptr] = torch.unique(torch.cat([found.get(ptr, idx.new_empty(0)), idx.cpu()]))
        return v, mask, idx

    monkeypatch.setattr(sparse, "active_neurons", recording)
    with offload.load(demo_sparse, device="cpu", dtype="float32", context=128) as rt:
        ids = rt.encode(PROMPT)
        greedy_logits(rt, ids[:4], 0)  # a short prefill, then decode steps: partial copies grow the slots
        rt.store.reset_stats()
        found.clear()
        held_before = rt.store.partial.held.clone()
        filled_before = len(rt.store.dev_table)
        seq = list(ids[:4])
        for i in range(12):
            seq.append(17 + i)
            decode_one(rt.model, seq[-1], len(seq) - 1)
        store, stats = rt.store, rt.stats()
        layout = store.layout
        base, C = sparse.base_nbytes(layout), layout.extra["chunk_nbytes"]
        fills = len(store.dev_table) - filled_before
        new_chunks = int((store.partial.held & ~held_before).sum())
        assert stats["bytes_h2d"] == fills * base + new_chunks * C
        # What the slots hold is what the uses needed: the union of the neurons they found active.
        slot_of = {store.dev_views[s]["chunks"].data_ptr(): s for s in range(len(store.dev_views))}
        expect = held_before.clone()
        for ptr, idx in found.items():
            expect[slot_of[ptr], idx] = True
        assert torch.equal(store.partial.held, expect)
        # Partial: a decode token moves far less than whole blobs would.
        assert stats["bytes_h2d"] < (fills + stats["expert_misses"]) * layout.nbytes
        assert stats["bytes_h2d"] > 0


def test_a_smaller_device_budget_reuses_held_chunks_and_counts_each_copy(demo_sparse):
    seq, _, stats, store = greedy(demo_sparse, vram=vram_for(demo_sparse, 4))
    layout = store.layout
    base, C = sparse.base_nbytes(layout), layout.extra["chunk_nbytes"]
    # Every byte moved is a base or whole chunks; fewer bytes than a whole blob per miss.
    assert stats["bytes_h2d"] < stats["expert_misses"] * layout.nbytes
    assert (stats["bytes_h2d"] - stats["expert_misses"] * base) % C == 0


def test_inspect_describes_a_sparse_folder(demo_sparse):
    described = inspect_json(demo_sparse)["quantized"]
    assert described.startswith("experts sparse (up projection 4-bit (group 64), neuron chunks 4-bit, 0.6 of the "
                                "neurons dropped on pydoc_data.topics, neuron predictors of rank 32)"), described


def test_convert_sparse_records_its_settings_and_a_rerun_with_others_is_refused(demo_sparse, tmp_path):
    info = json.loads((demo_sparse / "moe_offload.json").read_text())
    assert info["sparse"] == {"target": 0.6, "chunk_bits": 4, "calibration": "pydoc_data.topics",
                              "predictor_rank": predictor.DEFAULT_RANK}
    assert info["sparse_calibration"]["tokens"] > 1000
    # The predictors guess the next layer's active neurons far better than chance (40% of them are active) on
    # calibration tokens they were not fit on; half as many as are active, so they find fewer than half.
    assert info["predictor"]["file"] == predictor.FILE
    assert info["predictor"]["heldout_precision"] > 0.7 and 0.25 < info["predictor"]["heldout_recall"] < 0.5
    assert convert(DEMO_DIR, demo_sparse, 4, 64, sparse=0.6) == demo_sparse  # same settings: nothing to do
    with pytest.raises(quant.UserError, match="other settings"):
        convert(DEMO_DIR, demo_sparse, 4, 64, sparse=0.5)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "text.txt"
    path.write_text(CALIBRATION)
    return path


def one_line_error(*args, needle: str):
    result = run_cli("convert", *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert needle in result.stderr, result.stderr


@pytest.mark.parametrize("target", ["1.0", "1.5", "-0.1"])
def test_a_target_outside_0_1_is_one_line(tmp_path, target):
    one_line_error("demo", tmp_path / "out", "--sparse", target, needle="--sparse must be a fraction")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_missing_or_empty_calibration_file_is_one_line(tmp_path):
    one_line_error("demo", tmp_path / "out", "--sparse", "0.5", "--calibration", tmp_path / "nope.txt",
                   needle="no such file")
    (tmp_path / "empty.txt").write_text(" \n")
    one_line_error("demo", tmp_path / "out", "--sparse", "0.5", "--calibration", tmp_path / "empty.txt",
                   needle="the file is empty")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_predictor_rank_without_sparse_or_below_zero_is_one_line(tmp_path):
    one_line_error("demo", tmp_path / "out", "--predictor-rank", "8", needle="apply to sparse experts only")
    one_line_error("demo", tmp_path / "out", "--sparse", "0.5", "--predictor-rank", "-1",
                   needle="--predictor-rank must be 0")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_experts_without_a_separate_gate_projection_are_refused_in_one_line(tmp_path, calibration_file):
    from test_families import gpt_oss

    gpt_oss(tmp_path / "gpt-oss")
    one_line_error(tmp_path / "gpt-oss", tmp_path / "out", "--sparse", "0.5", "--calibration", calibration_file,
                   needle="no separate gate projection")


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])  # a shared expert and a dense layer; grouped sigmoid routing
def test_every_family_with_gated_experts_converts_sparse_and_keeps_the_invariant(name, tmp_path, calibration_file):
    from test_families import MAKERS

    MAKERS[name](tmp_path / "src")
    dst = convert(tmp_path / "src", tmp_path / "sparse", 4, 16, sparse=0.5, calibration=str(calibration_file))
    prompt = [1, 17, 42, 99, 17, 250, 3, 61]

    def run(**options):
        with offload.load(dst, device="cpu", dtype="float32", context=64, **options) as rt:
            assert rt.store.layout.kind == "sparse"
            seq, logits = greedy_logits(rt, prompt, 6)
            return seq, logits, rt.stats()

    seq, logits, _ = run()
    got_seq, got, stats = run(vram=vram_for_small(dst), prefetch=1)
    assert got_seq == seq and torch.equal(got, logits)
    assert 0 < stats["bytes_h2d"] < stats["expert_misses"] * stats["blob_bytes"]


def vram_for_small(folder) -> int:
    with offload.load(folder, device="cpu", dtype="float32", context=64) as rt:
        plan = rt.store.plan
    return plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + plan.staging_bytes + 3 * plan.blob_bytes


def test_mixtral_tiny_checkpoint_converts_with_a_calibration_file(tmp_path, calibration_file):
    make_checkpoint(tmp_path / "src", layers=2, experts=4)
    result = run_cli("convert", tmp_path / "src", tmp_path / "dst", "--sparse", "0.7", "--bits", "3",
                     "--chunk-bits", "8", "--group-size", "32", "--calibration", calibration_file)
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "dst" / "moe_offload.json").read_text())
    assert info["sparse"]["chunk_bits"] == 8 and info["sparse"]["calibration"] == str(calibration_file)
    result = run_cli("generate", tmp_path / "dst", "The quick brown fox", "-n", "4", "--json")
    assert result.returncode == 0, result.stderr


# ---- neuron predictors (offload/store/predictor.py) and the staging buffers -----------------------------------

def without_predictor(folder, dst):
    """A copy of the sparse folder as converted with --predictor-rank 0: no predictor file, none in its record."""
    shutil.copytree(folder, dst)
    (dst / predictor.FILE).unlink()
    info = json.loads((dst / "moe_offload.json").read_text())
    del info["predictor"]
    info["sparse"]["predictor_rank"] = 0
    (dst / "moe_offload.json").write_text(json.dumps(info))
    return dst


def test_the_predictor_file_describes_itself_and_guesses_from_the_previous_moe_layer(demo_sparse):
    from safetensors import safe_open

    with safe_open(str(demo_sparse / predictor.FILE), framework="pt") as f:
        meta = f.metadata()
    assert meta["moe_offload"] == predictor.FORMAT and int(meta["rank"]) == predictor.DEFAULT_RANK
    with offload.load(demo_sparse, device="cpu", dtype="float32", context=64) as rt:
        pred, layers = rt.store.predictor, rt.config.moe_layers
        assert pred.source == dict(zip(layers[1:], layers[:-1]))
        idx = pred.predict(layers[1], 3, torch.randn(1, rt.config.hidden_size))
        assert idx.dtype == torch.int64 and torch.equal(idx, idx.unique())  # ascending neurons, each once


def test_tokens_and_logits_do_not_depend_on_the_predictor_and_bytes_count_its_chunks(demo_sparse, tmp_path):
    """With prefetch, guess copies bring their predicted chunks; tokens and logits are bit-identical to the same
    folder without predictors and to no prefetch at all. Every byte moved is a base or a whole chunk, the guessed
    chunks among them; a guessed chunk is used (a hit), gone with its slot (wasted), or still held unused."""
    plain = without_predictor(demo_sparse, tmp_path / "plain")
    steps, vram = 40, vram_for(demo_sparse, 6)
    seq, logits, _, _ = greedy(demo_sparse, steps=steps)
    for folder in (demo_sparse, plain):
        with offload.load(folder, device="cpu", dtype="float32", context=128, vram=vram, prefetch=1) as rt:
            got_seq, got = greedy_logits(rt, rt.encode(PROMPT), steps)
            stats, store = rt.stats(), rt.store
            guessed, held = store.partial.guessed.clone(), store.partial.held.clone()
        assert got_seq == seq and torch.equal(got, logits), folder
        base, C = sparse.base_nbytes(store.layout), store.layout.extra["chunk_nbytes"]
        fills = stats["expert_misses"] + stats["prefetch_issued"]
        chunks, rest = divmod(stats["bytes_h2d"] - fills * base, C)
        assert rest == 0 and chunks >= stats["chunk_guesses"]
        # What a wasted prefetch moved: its base and the chunks guessed with it, not a whole blob.
        assert stats["bytes_prefetch_wasted"] >= stats["prefetch_wasted"] * base
        assert (stats["bytes_prefetch_wasted"] - stats["prefetch_wasted"] * base) % C == 0
        unused = int(guessed.sum())
        assert stats["chunk_guess_hits"] + stats["chunk_guess_wasted"] + unused == stats["chunk_guesses"]
        assert not (guessed & ~held).any()
        if folder == plain:
            assert store.predictor is None and stats["chunk_guesses"] == 0
        else:
            assert stats["prefetch_issued"] > 0 and stats["chunk_guesses"] > 0
            assert stats["chunk_guess_hits"] > stats["chunk_guess_wasted"]


@pytest.mark.parametrize("damage", ["missing", "not safetensors", "other shapes"])
def test_a_missing_or_damaged_predictor_file_is_one_line(demo_sparse, tmp_path, damage):
    from safetensors.torch import load_file

    folder = tmp_path / "damaged"
    shutil.copytree(demo_sparse, folder)
    path = folder / predictor.FILE
    if damage == "missing":
        path.unlink()
    elif damage == "not safetensors":
        path.write_bytes(b"\x00" * 64)
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = {k: t.clone() for k, t in load_file(path).items()}
        name = next(k for k in tensors if k.endswith(".out"))
        tensors[name] = tensors[name][:, :-1].contiguous()
        from quant.files import save_tensors

        save_tensors(tensors, path, metadata=meta)
    result = run_cli("generate", folder, "The quick brown fox", "-n", "2")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert predictor.FILE in result.stderr and "convert the folder again" in result.stderr, result.stderr


def test_the_staging_buffers_are_inside_the_device_budget(demo_sparse):
    """Measured from the tensors: the slot pool, the partial copies' staging rows, the dense weights and the KV
    cache are what the plan says, and one byte less than that budget holds one expert slot fewer."""
    with offload.load(demo_sparse, device="cpu", dtype="float32", context=128) as rt:
        plan = rt.store.plan
    layout = rt.store.layout
    assert plan.staging_bytes == layout.record("chunks").shape[0] * layout.extra["chunk_nbytes"]
    vram = vram_for(demo_sparse, 5)
    with offload.load(demo_sparse, device="cpu", dtype="float32", context=128, vram=vram) as rt:
        store, plan = rt.store, rt.store.plan
        assert plan.device_slots == 5
        staged = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in store.partial.device_tensors()}
        assert sum(staged.values()) == plan.staging_bytes
        greedy_logits(rt, rt.encode(PROMPT), 4)
        held = store.held_device_bytes()
        assert held == plan.dense_bytes + plan.kv_bytes + plan.staging_bytes + plan.expert_pool_bytes <= vram
    with offload.load(demo_sparse, device="cpu", dtype="float32", context=128, vram=vram - 1) as rt:
        assert rt.store.plan.device_slots == 4
