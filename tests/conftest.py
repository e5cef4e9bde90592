"""Fixtures: tiny random-weight Mixtral checkpoints written by transformers' save_pretrained, with a
small byte-level BPE tokenizer beside them, so every test runs on a real Hugging Face folder layout; a tiny
MoLE checkpoint (written by lut's own model, its oracle) and its tables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lut.build import build_tables
from lut.config import MoLEConfig
from lut.model import MoLEForCausalLM, save_model
from offload.generate import decode_one, prefill

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_TEXT = ("The quick brown fox jumps over the lazy dog. Experts are streamed between disk, "
                  "pinned memory and the GPU; the cache keeps the hot ones. ") * 20


def write_tokenizer(folder: Path, vocab: int = 300) -> None:
    """A byte-level BPE tokenizer with <unk>=0, <s>=1, </s>=2 and a Mixtral-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
        "chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
    }))


def make_checkpoint(folder: Path, *, vocab: int = 320, hidden: int = 64, ffn: int = 96, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, experts: int = 4, top_k: int = 2, tied: bool = False,
                    head_dim: int | None = None, sliding_window: int | None = None, dtype=torch.float32,
                    shard_size: str | None = None, seed: int = 0, tokenizer: bool = True):
    """Write a random-weight MixtralForCausalLM to `folder` and return the transformers model (float32)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
                        num_experts_per_tok=top_k, tie_word_embeddings=tied, head_dim=head_dim,
                        sliding_window=sliding_window, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    # Random init gives near-uniform routing; widen the router so top-k choices are well separated.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(8)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.to(dtype).save_pretrained(folder, **kwargs)
    if tokenizer:
        write_tokenizer(folder)
    return model.float()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """One small float32 checkpoint shared by tests that only read it."""
    folder = tmp_path_factory.mktemp("tiny")
    make_checkpoint(folder, layers=3, experts=6)
    return folder


# ---- Mixture of Lookup Experts: a tiny MoLE checkpoint, its tables, and the oracle's logits ----------------

def tiny_mole_config(**overrides) -> MoLEConfig:
    fields = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=48, shared_intermediate_size=80, num_local_experts=3,
                  num_experts_per_tok=3, tie_word_embeddings=False, max_position_embeddings=128)
    return MoLEConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def mole(tmp_path_factory):
    """A random float32 MoLE checkpoint (weights wide enough that the router's mix varies) and its model."""
    folder = tmp_path_factory.mktemp("mole")
    model = MoLEForCausalLM(tiny_mole_config()).init_weights(seed=3, std=0.1).eval()
    save_model(model, folder, torch.float32)
    write_tokenizer(folder)
    return folder, model


@pytest.fixture(scope="module")
def tables32(mole, tmp_path_factory):
    dst = tmp_path_factory.mktemp("t") / "tables32"
    build_tables(mole[0], dst, bits=32, batch_bytes=1 << 16)  # small batches: several writes
    return dst


def greedy_logits(rt, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """The runtime's logits for the prompt's last position, then for `steps` greedy tokens."""
    logits = [prefill(rt.model, torch.tensor(prompt))]
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(logits[-1].argmax()))
        logits.append(decode_one(rt.model, seq[-1], len(seq) - 1))
    return seq, torch.stack(logits)


def reference_logits(model: MoLEForCausalLM, seq: list[int], start: int) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([seq]))
    return logits[0, start - 1:]


def run_in_triton_interpreter(script: str, timeout: float = 300) -> None:
    """Run `script` in a fresh interpreter under Triton's CPU interpreter (TRITON_INTERPRET=1, which must be set
    before triton is imported); it checks the kernels itself and prints "ok" at the end."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def copy_with(folder: Path, dst: Path, config=None, tensors=None) -> Path:
    """A copy of a one-shard model folder at `dst`, its config.json dict passed through `config` and its
    tensors dict through `tensors` (each edits in place), for the tests of what a broken folder says."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dst)
    if config:
        raw = json.loads((dst / "config.json").read_text())
        config(raw)
        (dst / "config.json").write_text(json.dumps(raw))
    if tensors:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, dst / "model.safetensors")
    return dst


def assert_generate_fails_in_one_line(folder: Path, needle: str) -> None:
    """`moe-offload generate FOLDER` exits 2 with one line on stderr that contains `needle`."""
    result = run_cli("generate", folder, "hello", "-n", "2")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert needle in result.stderr


def run_cli(*args: str, timeout: float = 300, stdin: str = "") -> subprocess.CompletedProcess:
    """Run the command line as a user would, in a fresh interpreter (`stdin`: the text piped into it)."""
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, input=stdin)


def inspect_json(folder, *options: str) -> dict:
    """`moe-offload inspect FOLDER --json OPTIONS` as a user runs it: it exits 0, and this is its JSON."""
    result = run_cli("inspect", folder, "--json", *options)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
