"""Reading a model folder: lazy tensors, and one clear error for each way a folder can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from offload.checkpoint import Checkpoint, expert_names
from offload.errors import UserError

from conftest import make_checkpoint


def test_tensors_are_read_lazily_and_exactly(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint)
    ckpt.validate()
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
        Checkpoint(path).validate()
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
    assert "llama" in message and "Mixtral" in message


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
