"""Mixture of Lookup Experts: the table model gives the MoLE model's logits, serves its tables from disk or RAM
without putting them on the device, and refuses bad input with one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import offload
from conftest import REPO, greedy_logits, inspect_json, reference_logits, run_cli, tiny_mole_config, write_tokenizer
from lut.build import TABLE_FILE, build_tables
from lut.config import MoLEConfig
from lut.model import MoLEForCausalLM, load_model, save_model
from lut.tables import TableLayout
from offload.generate import decode_one, prefill
from offload.models import open_checkpoint
from quant.errors import UserError

PROMPT = [1, 17, 42, 99, 17, 250, 3]  # 17 twice: a prefill gathers each distinct id once


# ---- the table model is the MoLE model ------------------------------------------------------------

@pytest.mark.parametrize("tables", ["disk", "ram"])
def test_table_model_logits_match_the_mole_model(mole, tables32, tables):
    rt = offload.load(tables32, device="cpu", dtype="float32", tables=tables)
    seq, got = greedy_logits(rt, PROMPT, 32)
    want = reference_logits(mole[1], seq, len(PROMPT))
    assert got.shape == want.shape == (33, 320)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tables", ["disk", "ram"])
def test_reads_that_arrive_in_pieces_give_the_same_logits(mole, tables32, tables, monkeypatch):
    """One read returns at most ~2 GiB on Linux, so loading a big table into RAM takes several: a short read
    is not truncation. Every read here returns at most 100 bytes."""
    import os

    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, offset: real(fd, [bufs[0][:100]], offset))
    rt = offload.load(tables32, device="cpu", dtype="float32", tables=tables)
    seq, got = greedy_logits(rt, PROMPT, 4)
    assert (got - reference_logits(mole[1], seq, len(PROMPT))).abs().max().item() <= 1e-5


def test_a_step_too_big_for_one_read_gathers_layer_by_layer_with_the_same_logits(mole, tables32):
    rt = offload.load(tables32, device="cpu", dtype="float32", step_bytes=1)  # every step per layer
    seq, got = greedy_logits(rt, PROMPT, 4)
    assert (got - reference_logits(mole[1], seq, len(PROMPT))).abs().max().item() <= 1e-5


def test_fewer_bits_per_row_cost_more_error_and_16_bits_almost_none(mole, tmp_path):
    errors = {}
    for bits in (16, 8, 4, 2):
        dst = tmp_path / f"t{bits}"
        build_tables(mole[0], dst, bits=bits)
        assert TableLayout.open(dst / TABLE_FILE).bits == bits
        seq, got = greedy_logits(offload.load(dst, device="cpu", dtype="float32"), PROMPT, 3)
        want = reference_logits(mole[1], seq, len(PROMPT))
        errors[bits] = (got - want).abs().max().item() / want.abs().max().item()
    assert errors[16] < 1e-3 and errors[16] < errors[8] < errors[4] < errors[2] < 0.5, errors


def test_rows_beyond_float16_are_refused_at_16_bits_and_kept_at_32():
    rows = torch.zeros(2, 3, 3, 64)  # [U, L, N, D]
    rows[1, 2, 0, 5] = 1e5
    with pytest.raises(UserError, match="beyond float16's range"):
        TableLayout.make(320, 3, 3, 64, 16).encode(rows)
    for bits in (8, 4):
        with pytest.raises(UserError, match="values too large for float16 scales"):
            TableLayout.make(320, 3, 3, 64, bits).encode(rows * 1000)
    layout = TableLayout.make(320, 3, 3, 64, 32)
    assert torch.equal(layout.decode(layout.encode(rows).view(2, 3, -1), torch.float32), rows)


@pytest.mark.parametrize("ffn, experts, top_k, ffn_size", [("moe", 4, 2, 32), ("dense", 1, 1, 64)])
def test_baselines_are_mixtral_folders_the_expert_runtime_serves_identically(tmp_path, ffn, experts, top_k, ffn_size):
    cfg = tiny_mole_config(ffn=ffn, num_local_experts=experts, num_experts_per_tok=top_k, intermediate_size=ffn_size)
    model = MoLEForCausalLM(cfg).init_weights(seed=5, std=0.1).eval()
    save_model(model, tmp_path, torch.float32)
    write_tokenizer(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mixtral"
    rt = offload.load(tmp_path, device="cpu", dtype="float32")
    seq, got = greedy_logits(rt, PROMPT, 6)
    assert (got - reference_logits(model, seq, len(PROMPT))).abs().max().item() <= 1e-5
    assert load_model(tmp_path, model_types=("mixtral",)).cfg.ffn == ffn


# ---- where the bytes are --------------------------------------------------------------------------

@pytest.mark.parametrize("tables", ["disk", "ram"])
def test_stats_show_rows_moved_per_token_and_no_table_bytes_on_the_device(tables32, tables):
    rt = offload.load(tables32, device="cpu", dtype="float32", tables=tables)
    tokens = list(rt.generate_ids(PROMPT, max_new_tokens=6))
    s = rt.stats()
    record = TableLayout.open(tables32 / TABLE_FILE).record_nbytes
    # prefill: one record per distinct prompt id; decode: one per generated token fed back (all but the last)
    moved = (len(set(PROMPT)) + len(tokens) - 1) * record
    assert s["table_bytes_device"] == 0 and s["tables"] == tables
    assert s["bytes_h2d"] == moved
    assert s["bytes_disk"] == (moved if tables == "disk" else 0)
    assert s["table_bytes_host"] == (0 if tables == "disk" else 320 * record)
    assert s["peak_vram_bytes"] < s["dense_bytes"] + 2 * len(PROMPT) * record  # dense part + one step's rows


def test_ram_budget_picks_the_tier_and_refuses_a_table_that_does_not_fit(tables32):
    data = TableLayout.open(tables32 / TABLE_FILE).vocab * TableLayout.open(tables32 / TABLE_FILE).record_nbytes
    assert offload.load(tables32, device="cpu", ram=data).store.mode == "ram"
    assert offload.load(tables32, device="cpu", ram=f"{data - 1}").store.mode == "disk"
    with pytest.raises(UserError, match="cannot hold the tables"):
        offload.load(tables32, device="cpu", ram="1KiB", tables="ram")


def test_a_decode_step_from_disk_is_one_read_of_its_record(tables32, monkeypatch):
    rt = offload.load(tables32, device="cpu", dtype="float32", tables="disk")
    logits = prefill(rt.model, torch.tensor(PROMPT))
    reads = []
    real = os.preadv

    def preadv(fd, buffers, offset):
        reads.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    token = int(logits.argmax())
    decode_one(rt.model, token, len(PROMPT))
    layout = TableLayout.open(tables32 / TABLE_FILE)
    assert reads == [(layout.data_offset + token * layout.record_nbytes, layout.record_nbytes)]


def test_a_table_file_truncated_while_served_is_a_user_error_not_a_crash(tables32, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(tables32, served)
    # In a child process: rows read through a memory map of a shrunken file kill the process with SIGBUS.
    code = (f"import os, torch, offload\n"
            f"from offload.generate import prefill\n"
            f"from quant.errors import UserError\n"
            f"rt = offload.load({str(served)!r}, device='cpu', tables='disk')\n"
            f"os.truncate({str(served / TABLE_FILE)!r}, 4096)  # a rebuild copied over the served file\n"
            f"try:\n"
            f"    prefill(rt.model, torch.tensor([1, 300, 5]))\n"
            f"except UserError as exc:\n"
            f"    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tables.bin: truncated since it was opened" in result.stdout


@pytest.mark.parametrize("option, needle", [
    ({"prefetch": -3}, "--prefetch must be 0"),         # the expert store's options: nothing to act on in a
    ({"cpu_experts": "bogus"}, "--cpu-experts must be"),  # table folder, but a wrong value is still refused
    ({"ram": 0}, "--ram must be positive"),
    ({"vram": "1KiB"}, "cannot hold the dense part"),
])
def test_a_table_folder_refuses_bad_options_and_a_vram_its_dense_part_exceeds(tables32, option, needle):
    with pytest.raises(UserError, match=needle):
        offload.load(tables32, device="cpu", **option)


@pytest.mark.parametrize("tables, needle", [
    ({"bits": "32"}, "field 'tables.bits' is \"32\" but tables.bin holds 32-bit rows"),
    ({"bits": True}, "field 'tables.bits' is true"),
    ({"bits": 8}, "field 'tables.bits' is 8"),
    ({"file": ""}, "field 'tables.file' must be a file name in the folder, got ''"),
    ({"file": "../tables.bin"}, "field 'tables.file' must be a file name in the folder"),
])
def test_a_table_config_that_disagrees_with_its_file_names_the_field(tables32, tmp_path, tables, needle):
    folder = tmp_path / "t"
    shutil.copytree(tables32, folder)
    config = json.loads((folder / "config.json").read_text())
    config["tables"].update(tables)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=re.escape(needle)):
        offload.load(folder, device="cpu")


def test_a_table_folder_takes_the_expert_stores_options_but_not_a_misspelled_one(tables32):
    rt = offload.load(tables32, device="cpu", prefetch=2, cpu_experts="never", per_layer_cache=True)
    assert rt.store.mode == "disk"
    with pytest.raises(TypeError, match="rma"):
        offload.load(tables32, device="cpu", rma="1GiB")  # as for a Mixtral folder: not silently dropped


def test_a_generation_on_a_table_folder_closed_between_tokens_stops_in_one_line(tables32):
    rt = offload.load(tables32, device="cpu", tables="disk")
    running = rt.generate("The quick brown fox", max_new_tokens=6)
    next(running)
    rt.close()  # tables.bin is closed: the next step must not read it
    with pytest.raises(UserError, match="this runtime was closed"):
        "".join(running)


def test_a_table_folders_vram_holds_what_its_device_holds(tables32):
    rt = offload.load(tables32, device="cpu", context=128)
    dense = rt.store.dense_bytes()
    with pytest.raises(UserError, match="need at least"):
        offload.load(tables32, device="cpu", context=128, vram=dense)  # no room for the KV cache
    rt = offload.load(tables32, device="cpu", context=128, vram=dense + (1 << 20))
    "".join(rt.generate("The quick brown fox", max_new_tokens=4))
    assert rt.stats()["peak_vram_bytes"] <= dense + (1 << 20)


def test_close_releases_the_table_file_and_profile_refuses_a_table_folder_in_one_line(tables32, tmp_path):
    result = run_cli("profile", tables32, "--out", tmp_path / "profile", "-n", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "profile runs models with routed experts" in result.stderr
    store = offload.load(tables32, device="cpu", tables="disk").store
    fd = store.fd
    os.fstat(fd)
    store.close()
    store.close()  # the runtime may close a store twice (a failed load, then the runtime's own close)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_tables_in_ram_are_never_page_locked(tables32, monkeypatch):
    from offload.models import open_checkpoint
    from lut.serve import TableStore
    from quant import pinned

    # A CUDA store on a CPU machine, as far as the RAM table is concerned: the DMA goes through the pinned
    # staging buffer of each step, so locking the whole table (tens of GiB at Mixtral scale) buys nothing.
    monkeypatch.delenv("MOE_OFFLOAD_PINNED", raising=False)
    monkeypatch.setattr(pinned, "_cudart", lambda: pytest.fail("the RAM table was page-locked"))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    ckpt = open_checkpoint(tables32)
    store = TableStore(ckpt, torch.device("cuda"), torch.float32, tables="ram")
    assert store.cuda and store.mode == "ram" and not store.table.is_pinned()


# ---- the folder and the command line --------------------------------------------------------------

def test_cli_build_writes_a_servable_folder_atomically(mole, tmp_path):
    dst = tmp_path / "served"
    result = run_cli("lut", "build", mole[0], dst, "--bits", "8", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    layout = TableLayout.open(dst / TABLE_FILE)
    assert summary["table_nbytes"] == layout.file_nbytes == (dst / TABLE_FILE).stat().st_size
    assert json.loads((dst / "config.json").read_text())["model_type"] == "mole_tables"
    assert {"tokenizer.json", "model.safetensors"} <= set(os.listdir(dst))
    from quant.files import current_umask

    assert {p.stat().st_mode & 0o777 for p in dst.iterdir()} == {0o666 & ~current_umask()}  # not 0600
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp folder left behind
    result = run_cli("generate", dst, "The quick brown fox", "-n", "5", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stats"]["table_bytes_device"] == 0


def test_inspect_describes_a_table_folder_and_a_mole_checkpoint(mole, tables32):
    info = inspect_json(tables32)
    layout = TableLayout.open(tables32 / TABLE_FILE)
    assert info["bytes_tables"] == layout.vocab * layout.record_nbytes
    assert info["bytes_h2d_per_decode_token"] == info["bytes_per_token_record"] == layout.record_nbytes
    assert info["bytes_dense_gpu"] == open_checkpoint(tables32).file_bytes()
    assert info["layers"] == layout.layers and info["table_experts_per_layer"] == layout.experts
    plan = run_cli("inspect", tables32, "--vram", "1GiB")
    assert plan.returncode == 2 and "a table folder has no expert slots to plan" in plan.stderr
    # The MoLE checkpoint itself is a model family: its routed experts are served like Mixtral's.
    info = inspect_json(mole[0])
    cfg = mole[1].cfg
    assert info["experts_per_layer"] == info["experts_per_token"] == cfg.num_local_experts
    assert info["bytes_per_expert"] == 3 * cfg.hidden_size * cfg.intermediate_size * 4  # float32 w1, w2, w3


def test_an_interrupted_build_leaves_nothing(mole, tmp_path):
    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_tables(mole[0], tmp_path / "dst", progress=interrupt)
    assert os.listdir(tmp_path) == []


def test_force_never_replaces_a_dst_that_holds_src(mole, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(mole[0], models / "mole")
    (models / "notes.txt").write_text("mine")
    for dst in (models, models / "mole"):
        with pytest.raises(UserError, match="must not be SRC or a folder holding it"):
            build_tables(models / "mole", dst, force=True)
    assert (models / "notes.txt").read_text() == "mine"
    assert MoLEConfig.from_folder(models / "mole").ffn == "mole" and (models / "mole" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_force_replaces_only_an_earlier_build(mole, tmp_path, kind):
    dst = tmp_path / "dst"
    build_tables(mole[0], dst, bits=8)
    build_tables(mole[0], dst, bits=16, force=True)  # an earlier build: replaced
    assert TableLayout.open(dst / TABLE_FILE).bits == 16
    mine = tmp_path / "mine"
    if kind == "folder":
        mine.mkdir()
        (mine / "keep.txt").write_text("precious")
    else:
        mine.write_text("precious")
    with pytest.raises(UserError, match="is not a table folder that lut build wrote"):
        build_tables(mole[0], mine, force=True)
    assert (mine / "keep.txt" if kind == "folder" else mine).read_text() == "precious"


def test_the_tables_do_not_depend_on_the_batch_memory(mole, tmp_path):
    from lut.build import CHUNK_TOKENS, tokens_per_batch

    files = {}
    for batch in (1, 1 << 14, 1 << 16, 256 << 20):  # down to one chunk per batch
        dst = tmp_path / f"b{batch}"
        build_tables(mole[0], dst, bits=16, batch_bytes=batch)
        files[batch] = (dst / TABLE_FILE).read_bytes()
    assert len(set(files.values())) == 1
    cfg = MoLEConfig.from_folder(mole[0])
    layout = TableLayout.make(cfg.vocab_size, cfg.num_hidden_layers, cfg.num_local_experts, cfg.hidden_size, 16, None)
    assert tokens_per_batch(cfg, layout, 1) == CHUNK_TOKENS
    with pytest.raises(UserError, match="--batch-mem must be positive"):
        tokens_per_batch(cfg, layout, 0)


def test_force_replaces_a_symlink_dst_by_unlinking_it_and_leaves_its_target(mole, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    build_tables(mole[0], link, force=True)
    assert not link.is_symlink() and TableLayout.open(link / TABLE_FILE).bits == 16
    assert os.listdir(target) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["link", "target"]  # nothing moved aside is left behind


def test_an_unwritable_dst_is_one_line_naming_it(mole, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    result = run_cli("lut", "build", mole[0], tmp_path / "afile" / "x")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"{tmp_path / 'afile'}" in result.stderr and "cannot write" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_src_that_is_not_a_mole_checkpoint_is_one_line_exit_2(tmp_path):
    src = tmp_path / "mixtral"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 64}))
    result = run_cli("lut", "build", src, tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a MoLE checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [
    ("rms_norm_eps", "1e-5"), ("rms_norm_eps", 0), ("rope_theta", float("inf")), ("rope_theta", True),
    ("tie_word_embeddings", "false"), ("tie_word_embeddings", 0), ("hidden_size", True), ("eos_token_id", "2"),
])
def test_config_fields_of_the_wrong_type_are_refused_naming_the_field(field, value):
    with pytest.raises(UserError, match=f"field '{field}'"):
        tiny_mole_config(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("num_attention_heads", 0), ("num_attention_heads", True), ("hidden_size", True), ("num_hidden_layers", True),
    ("num_local_experts", True), ("shared_intermediate_size", False), ("rope_theta", False),
])
def test_config_json_with_a_bool_or_zero_count_is_refused_naming_the_field(field, value):
    """Without head_dim in config.json it is hidden_size // heads: a bad count is named, not divided by."""
    raw = {**tiny_mole_config().to_dict(), field: value}
    del raw["head_dim"]
    with pytest.raises(UserError, match=f"field '{field}' must be a positive"):
        MoLEConfig.from_dict(raw)


def test_a_string_tie_word_embeddings_is_one_line_not_a_silently_tied_model(mole, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(mole[0], src)
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": "false"}))  # "false" is truthy
    result = run_cli("lut", "build", src, tmp_path / "out")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "field 'tie_word_embeddings' must be true or false" in result.stderr
    assert not (tmp_path / "out").exists()


def test_table_that_does_not_match_vocab_layers_experts_d_is_one_line_exit_2(mole, tables32, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(tables32, bad)
    with open(bad / TABLE_FILE, "r+b") as f:
        f.truncate((bad / TABLE_FILE).stat().st_size - 100)
    result = run_cli("generate", bad, "hello", "-n", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "vocab 320 x layers 3 x experts 3 x d 64" in result.stderr

    # A consistent table file, but built for another shape of model.
    other = tmp_path / "other_src"
    save_model(MoLEForCausalLM(tiny_mole_config(num_local_experts=2, num_experts_per_tok=2)).init_weights(), other)
    build_tables(other, tmp_path / "other", bits=32)
    swapped = tmp_path / "swapped"
    shutil.copytree(tables32, swapped)
    shutil.copy(tmp_path / "other" / TABLE_FILE, swapped / TABLE_FILE)
    with pytest.raises(UserError, match="config.json implies 320 x 3 x 3 x 64"):
        offload.load(swapped, device="cpu")


# ---- the shipped model ----------------------------------------------------------------------------

def test_shipped_mole_model_generates_through_its_tables(tmp_path):
    from lut import DEMO_DIR

    cfg = MoLEConfig.from_folder(DEMO_DIR)
    assert cfg.ffn == "mole" and sum(p.stat().st_size for p in DEMO_DIR.iterdir()) <= 16 << 20
    dst = tmp_path / "tables"
    build_tables(DEMO_DIR, dst, bits=32)
    rt = offload.load(dst, device="cpu", dtype="float32")
    prompt = rt.encode("The for statement")
    seq, got = greedy_logits(rt, prompt, 8)
    model = load_model(DEMO_DIR)
    assert (got - reference_logits(model, seq, len(prompt))).abs().max().item() <= 1e-4
    assert len(seq) == len(prompt) + 8 and all(0 <= t < cfg.vocab_size for t in seq)


# ---- on a GPU (skipped without CUDA; run with `pytest -m gpu`) ----------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tables", ["disk", "ram"])
def test_on_cuda_the_device_holds_the_dense_part_alone_and_logits_match(mole, tables32, tables):
    torch.backends.cuda.matmul.allow_tf32 = False
    # cuBLAS keeps a workspace per stream, allocated by the first matmul: let it exist before counting, so
    # the count is this runtime's alone whichever test ran first.
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    rt = offload.load(tables32, device="cuda", dtype="float32", tables=tables, context=64)
    torch.cuda.synchronize()
    m = rt.model
    resident = sum(t.numel() * t.element_size() for t in m.dense_tensors()) + m.cache.nbytes \
        + 2 * m.cos.numel() * m.cos.element_size()
    table = TableLayout.open(tables32 / TABLE_FILE).file_nbytes
    assert torch.cuda.memory_allocated() - before <= resident + (64 << 10) < resident + table
    ids = [1, 17, 42, 99]
    logits = [prefill(m, torch.tensor(ids, device="cuda"))]
    seq = list(ids)
    for _ in range(8):
        seq.append(int(logits[-1].argmax()))
        logits.append(decode_one(m, seq[-1], len(seq) - 1))
    got = torch.stack(logits).cpu()
    assert (got - reference_logits(mole[1], seq, len(ids))).abs().max().item() <= 1e-4
    assert rt.store.stats()["bytes_h2d"] > 0
    assert torch.cuda.memory_allocated() - before <= resident + (64 << 10)  # no rows left behind after the steps
