"""The transformers oracle for any model family: a random-weight reference model written with
save_pretrained (the Hub's own tensor names), and the runtime's logits checked against the reference's
after prefill and after decode steps, on the runtime's greedy path."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

import offload
from conftest import run_cli, write_tokenizer
from offload.generate import decode_one, prefill
from offload.models import expected_shapes, open_checkpoint
from offload.runtime import build_model
from offload.store import ExpertStore


def save_reference(folder: Path, model_cls, config, *, dtype=torch.float32, shard_size: str | None = None,
                   seed: int = 0, tokenizer: bool = False):
    """Write a random-weight `model_cls(config)` to `folder`; return the reference model in float32 (with
    the weights as saved: a bfloat16 checkpoint's rounding included)."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(8)  # random init routes near-uniformly; a wider router separates the top-k choices
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))  # initialized to 0, a bias would go untested
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))  # initialized to 1, likewise
        for p in model.parameters():
            p.copy_(p.to(dtype).float())  # the weights as the checkpoint holds them
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    # A copy is cast for saving: casting the model itself would round its rotary buffers to bfloat16 too.
    copy.deepcopy(model).to(dtype).save_pretrained(folder, **kwargs)
    if tokenizer:
        write_tokenizer(folder)
    return model


def ours(folder: Path, context: int = 128):
    """The runtime's model over an expert store, float32 on the CPU."""
    ckpt = open_checkpoint(folder)
    ckpt.validate(expected_shapes(ckpt.config))
    store = ExpertStore(ckpt, torch.device("cpu"), torch.float32)
    return build_model(ckpt, store, torch.device("cpu"), torch.float32, context)


def assert_logits_match(folder: Path, ref, vocab: int, steps: int = 16, atol: float = 1e-4,
                        prompt_len: int = 21) -> None:
    """Last-position logits within `atol` of the reference after prefill and after each of `steps` decode
    steps. The decode steps are fed a fixed random continuation rather than greedy tokens: a random tiny
    model's greedy path soon repeats one token, and an oracle whose answer never varies proves little, so
    the reference's top token must also vary across the steps."""
    model = ours(folder)
    tokens = torch.randint(3, vocab, (prompt_len + steps,), generator=torch.Generator().manual_seed(1))
    prompt = tokens[:prompt_len]
    tops = []
    with torch.no_grad():
        out = ref(prompt[None], use_cache=True)
        logits = prefill(model, prompt)
        torch.testing.assert_close(logits, out.logits[0, -1], atol=atol, rtol=0)
        past, pos = out.past_key_values, prompt_len
        for token in tokens[prompt_len:].tolist():
            tops.append(int(out.logits[0, -1].argmax()))
            out = ref(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            logits = decode_one(model, token, pos)
            torch.testing.assert_close(logits, out.logits[0, -1], atol=atol, rtol=0)
            past, pos = out.past_key_values, pos + 1
    assert len(set(tops)) >= 3, f"the reference's top token barely varies ({tops}): pick another seed"


def assert_greedy_matches(folder: Path, ref, prompt: str, n: int = 32) -> None:
    """`n` greedy tokens equal transformers' own, through the Python API and through `generate --json`,
    and they vary (a reference that repeats one token would prove little)."""
    with offload.load(folder, device="cpu", dtype="float32") as rt:
        ids = rt.encode(prompt)
        api = list(rt.generate_ids(ids, n))
    expected = reference_greedy(ref, ids, n)
    assert api == expected and len(set(expected)) >= 3
    result = run_cli("generate", folder, prompt, "--max-new-tokens", str(n), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == expected


def reference_greedy(ref, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy generation of `n` tokens after `prompt` (no end-of-sequence stop)."""
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    return out[0, len(prompt):].tolist()
