"""Reading a model folder: lazy tensors, and one clear error for each way a folder can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from offload.models import expected_shapes, open_checkpoint
from offload.models.mixtral import expert_names
from offload.errors import UserError

from conftest import make_checkpoint


def test_tensors_are_read_lazily_and_exactly(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    ckpt.validate(expected_shapes(ckpt.config))
    assert ckpt._files == {}  # opening read headers only
    reference = load_file(tiny_checkpoint / "model.safetensors")
    for name in ("model.embed_tokens.weight", *expert_names(2, 5)):
        assert torch.equal(ckpt.read(name), reference[name])


@pytest.fixture
def folder(tmp_path, tiny_checkpoint):
    dst = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def error_of(path) -> str:
    with pytest.raises(UserError) as info:
        (ckpt := open_checkpoint(path)).validate(expected_shapes(ckpt.config))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path):
    assert "no such model folder" in error_of(tmp_path / "nope")


def test_missing_config(folder):
    (folder / "config.json").unlink()
    assert "config.json" in error_of(folder)


def test_config_of_another_family(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    message = error_of(folder)
    assert "llama" in message and "supported: mixtral" in message


def test_config_missing_a_field(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["num_local_experts"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert "num_local_experts" in error_of(folder)


def test_missing_shard(tmp_path):
    make_checkpoint(tmp_path, shard_size="60KB", tokenizer=False)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    assert shards[-1].name in error_of(tmp_path)


def test_tensor_with_wrong_shape(folder):
    tensors = load_file(folder / "model.safetensors")
    name = expert_names(1, 2)[1]
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    message = error_of(folder)
    assert name in message and "shape" in message


def test_truncated_shard(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in error_of(folder)


def rewrite_header(path, edit) -> None:
    """Apply `edit` to a safetensors file's JSON header in place (the data after it stays as it was)."""
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))  # same length: the byte offsets stay valid
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])


def set_entry(name, field, value):
    def edit(header):
        header[name][field] = value
        return header
    return edit


@pytest.mark.parametrize("edit, needle", [
    (set_entry("model.norm.weight", "data_offsets", None), "corrupt safetensors header"),
    (set_entry("model.norm.weight", "shape", [63]), "do not hold [63] F32 values"),
    (set_entry(expert_names(1, 2)[0], "shape", [True, 64]), "corrupt safetensors header"),
    (lambda header: list(header), "not a JSON object"),
])
def test_a_corrupt_header_is_one_line_naming_the_file(folder, edit, needle):
    rewrite_header(folder / "model.safetensors", edit)
    message = error_of(folder)
    assert needle in message and "model.safetensors" in message


def test_a_prequantized_checkpoint_is_refused(folder):
    """bitsandbytes / GPTQ / AWQ folders carry quantization_config and integer weights: refused, not cast."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    assert "pre-quantized checkpoint (quantization_config: bitsandbytes)" in error_of(folder)


def test_integer_weights_are_refused_not_cast(folder):
    import offload

    tensors = load_file(folder / "model.safetensors")
    for name in ("model.norm.weight", expert_names(1, 2)[0]):
        tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"experts\.2\.w1\.weight is torch\.int8"):
        offload.load(folder, device="cpu")
    tensors[expert_names(1, 2)[0]] = tensors[expert_names(1, 3)[0]].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.norm\.weight holds torch\.int8 values where a float weight belongs"):
        offload.load(folder, device="cpu")


def test_tie_word_embeddings_must_be_a_bool(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["tie_word_embeddings"] = "false"  # a string is truthy: it would tie silently
    (folder / "config.json").write_text(json.dumps(cfg))
    assert "'tie_word_embeddings' must be true or false" in error_of(folder)


def test_a_tensor_that_takes_several_reads_is_read_whole(tiny_checkpoint, monkeypatch):
    """Linux returns at most ~2 GiB per read: a larger tensor arrives in pieces, which is not truncation."""
    import os

    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, offset: real(fd, [bufs[0][:1000]], offset))
    ckpt = open_checkpoint(tiny_checkpoint)
    name = "model.embed_tokens.weight"
    assert ckpt.locations[name].nbytes > 10_000
    assert torch.equal(ckpt.read(name), load_file(tiny_checkpoint / "model.safetensors")[name])


def test_a_converted_expert_that_takes_several_reads_runs_the_same(tiny_checkpoint, tmp_path, monkeypatch):
    import os

    import offload
    from offload.convert import convert

    q4 = convert(tiny_checkpoint, tmp_path / "q4", bits=4, group_size=32)

    def tokens():
        with offload.load(q4, device="cpu", context=64, ram="30KiB") as rt:  # experts streamed from experts.bin
            return list(rt.generate_ids(rt.encode("hello"), 6)), rt.stats()["bytes_disk"]

    want, read = tokens()
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, offset: real(fd, [bufs[0][:1000]], offset))
    assert tokens() == (want, read) and read > 0


def test_a_closed_checkpoint_refuses_reads_instead_of_reopening_its_files(tiny_checkpoint):
    import os

    ckpt = open_checkpoint(tiny_checkpoint)
    ckpt.read("model.norm.weight")
    before = len(os.listdir("/proc/self/fd"))
    ckpt.close()
    with pytest.raises(UserError, match="read after the model was closed"):
        ckpt.read("model.norm.weight")
    assert len(os.listdir("/proc/self/fd")) == before - 1


def test_load_and_close_leave_no_file_open(tiny_checkpoint, tmp_path):
    import os

    import offload
    from offload.convert import convert

    q4 = convert(tiny_checkpoint, tmp_path / "q4", bits=4, group_size=32)
    before = len(os.listdir("/proc/self/fd"))
    for folder in (tiny_checkpoint, q4, tiny_checkpoint, q4):
        with offload.load(folder, device="cpu", context=64) as rt:
            list(rt.generate_ids(rt.encode("hello"), 2))
    with pytest.raises(UserError, match="cannot hold the dense part"):
        offload.load(q4, device="cpu", vram="1KiB")  # a load that fails closes what it opened too
    assert len(os.listdir("/proc/self/fd")) == before


def edit_config(folder, **fields) -> None:
    """Set (or, with None, delete) top-level config.json fields."""
    cfg = json.loads((folder / "config.json").read_text())
    for name, value in fields.items():
        if value is None:
            cfg.pop(name, None)
        else:
            cfg[name] = value
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field, value", [
    # JSON true is a Python int: it must not reach torch as a layer count or a top-k of 1.
    ("num_hidden_layers", True), ("num_experts_per_tok", True), ("hidden_size", False), ("head_dim", True),
    ("num_local_experts", 2.0), ("vocab_size", "320"), ("num_attention_heads", 0),
    ("rms_norm_eps", "abc"), ("rms_norm_eps", True), ("rms_norm_eps", 0), ("rope_theta", True),
    ("rope_theta", 0), ("rope_theta", -1.0), ("sliding_window", True), ("bos_token_id", "1"),
    ("eos_token_id", [2, "x"]), ("torch_dtype", 16),
])
def test_a_config_field_of_the_wrong_type_or_range_is_one_line_naming_it(folder, field, value):
    edit_config(folder, **{field: value})
    message = error_of(folder)
    assert f"config.json: field '{field}' must be" in message
    if value is True:
        assert message.endswith("got true")  # as the user wrote it in the JSON


@pytest.mark.parametrize("field", ["rope_parameters", "rope_scaling", "quantization_config"])
@pytest.mark.parametrize("value", [5, [1, 2], "yes"])
def test_an_object_field_holding_something_else_is_one_line_naming_it(folder, field, value):
    edit_config(folder, **{field: value})
    assert f"config.json: field '{field}' must be an object or null" in error_of(folder)


def test_a_present_rope_theta_is_validated_and_only_a_missing_one_defaults(folder):
    edit_config(folder, rope_parameters={"rope_theta": 0, "rope_type": "default"})
    assert "field 'rope_parameters.rope_theta' must be a positive number" in error_of(folder)
    edit_config(folder, rope_parameters=None, rope_theta=0)
    assert "field 'rope_theta' must be a positive number, got 0" in error_of(folder)
    edit_config(folder, rope_theta=10000)
    assert open_checkpoint(folder).config.rope_theta == 10000.0
    edit_config(folder, rope_theta=None)
    assert open_checkpoint(folder).config.rope_theta == 1e6


@pytest.fixture
def sharded(tmp_path):
    make_checkpoint(tmp_path, shard_size="60KB", tokenizer=False)
    return tmp_path


def edit_index(folder, edit) -> None:
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def first_to(value):
    def edit(index):
        index["weight_map"][next(iter(index["weight_map"]))] = value
        return index
    return edit


@pytest.mark.parametrize("edit, needle", [
    (lambda index: {**index, "weight_map": []}, "field 'weight_map' must be an object"),
    (lambda index: {**index, "weight_map": [f"name{i}" for i in range(10_000)]}, "field 'weight_map' must be an object"),
    (lambda index: {"metadata": {}}, "field 'weight_map' must be an object"),
    (lambda index: [index], "field 'weight_map' must be an object"),
    (first_to(7), "field 'weight_map' maps 'lm_head.weight' to 7"),
    (first_to(None), "field 'weight_map' maps 'lm_head.weight' to null"),
    (first_to(["model-00001-of-00010.safetensors"]), "field 'weight_map' maps 'lm_head.weight'"),
    # A shard outside the folder (the tester's copy of a real shard one level up): never read.
    (first_to("../model-00001-of-00010.safetensors"), "not the name of a .safetensors file in the folder"),
    (first_to("/etc/passwd"), "not the name of a .safetensors file in the folder"),
])
def test_a_malformed_shard_index_is_one_short_line_naming_it(sharded, edit, needle):
    edit_index(sharded, edit)
    message = error_of(sharded)
    assert "model.safetensors.index.json" in message and needle in message
    assert len(message) < 300  # a bad value is shown cut short, not as ten thousand names


@pytest.mark.parametrize("fields", [dict(num_hidden_layers=True), dict(num_experts_per_tok=True),
                                    dict(rope_parameters=5), dict(rms_norm_eps="abc")])
def test_cli_refuses_a_bad_config_in_one_line_exit_2(folder, fields):
    from conftest import run_cli

    edit_config(folder, **fields)
    for command in (("generate", folder, "The for", "-n", "2"), ("inspect", folder)):
        result = run_cli(*command)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert f"field '{next(iter(fields))}'" in result.stderr
