"""The MoLE family (offload/models/mole.py): a MoLE checkpoint runs as it was trained, its routed experts
served by the expert store like any family's; its logits are the MoLE model's own (the oracle), budgets and
prefetch do not change them, and its tables (lut build) generate the same tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import offload
from conftest import greedy_logits, reference_logits, run_cli
from lut import DEMO_DIR
from lut.build import build_tables

PROMPT = [1, 17, 42, 99, 17, 250, 3]
DEMO_PROMPT = "The with statement is used to"


def test_logits_match_the_mole_model_after_prefill_and_32_decode_steps(mole):
    with offload.load(mole[0], device="cpu", dtype="float32") as rt:
        seq, got = greedy_logits(rt, PROMPT, 32)
        stats = rt.stats()
    want = reference_logits(mole[1], seq, len(PROMPT))
    assert got.shape == want.shape == (33, 320)
    assert (got - want).abs().max().item() <= 1e-5
    # Every expert of every layer runs in every step (prefill and 32 decodes): MoLE's router keeps them all.
    cfg = mole[1].cfg
    assert stats["expert_hits"] + stats["expert_misses"] == 33 * cfg.num_hidden_layers * cfg.num_local_experts


@pytest.fixture(scope="module")
def reference(mole):
    with offload.load(mole[0], device="cpu", dtype="float32") as rt:
        return greedy_logits(rt, PROMPT, 12)


@pytest.mark.parametrize("options", [dict(vram_slots=1, prefetch=0), dict(vram_slots=4, prefetch=2),
                                     dict(vram_slots=2, ram_slots=3, prefetch=1)])
def test_budgets_and_prefetch_do_not_change_the_logits(mole, reference, options):
    with offload.load(mole[0], device="cpu", dtype="float32") as rt:
        plan = rt.store.plan
    fixed = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes
    vram = fixed + options["vram_slots"] * plan.blob_bytes
    ram = options.get("ram_slots", plan.experts_total) * plan.blob_bytes
    with offload.load(mole[0], device="cpu", dtype="float32", vram=vram, ram=ram, prefetch=options["prefetch"]) as rt:
        seq, logits = greedy_logits(rt, PROMPT, 12)
        stats = rt.store.stats()
    assert stats["device_slots"] == options["vram_slots"]
    if "ram_slots" in options:
        assert stats["bytes_disk"] > 0  # experts streamed from disk through the small host tier
    assert seq == reference[0] and torch.equal(logits, reference[1])


@pytest.fixture(scope="module")
def demo_tables(tmp_path_factory) -> dict[int, Path]:
    """The shipped MoLE model's tables at 32 and 16 bits per value."""
    out = {bits: tmp_path_factory.mktemp("demo") / f"tables{bits}" for bits in (32, 16)}
    for bits, dst in out.items():
        build_tables(DEMO_DIR, dst, bits=bits)
    return out


def test_the_shipped_mole_model_and_its_tables_generate_the_same_tokens(demo_tables):
    runs = {}
    for name, folder in {"checkpoint": DEMO_DIR, "fp32 tables": demo_tables[32], "fp16 tables": demo_tables[16]}.items():
        result = run_cli("generate", folder, DEMO_PROMPT, "--max-new-tokens", "32", "--temperature", "0", "--json")
        assert result.returncode == 0, result.stderr
        runs[name] = json.loads(result.stdout)
    tokens = runs["checkpoint"]["tokens"]
    assert len(tokens) == 32 and len(set(tokens)) > 4  # text, not one token repeated
    assert runs["fp32 tables"]["tokens"] == tokens
    assert runs["fp16 tables"]["tokens"] == tokens
    # The checkpoint moves experts; the tables move rows, never an expert.
    assert runs["checkpoint"]["stats"]["expert_hits"] > 0 and "table_tokens" in runs["fp16 tables"]["stats"]


def test_the_demo_tables_match_the_checkpoint_logits(demo_tables):
    with offload.load(DEMO_DIR, device="cpu", dtype="float32") as rt:
        prompt = rt.encode(DEMO_PROMPT)
        seq, want = greedy_logits(rt, prompt, 8)
    with offload.load(demo_tables[32], device="cpu", dtype="float32") as rt:
        got_seq, got = greedy_logits(rt, prompt, 8)
    assert got_seq == seq and (got - want).abs().max().item() <= 1e-4


def test_a_mole_checkpoint_converts_to_quantized_experts_that_still_follow_it(mole, tmp_path):
    """convert works per family: the MoLE experts become 8-bit blobs, and the logits stay close."""
    from offload.convert import convert

    dst = convert(mole[0], tmp_path / "q8", bits=8, group_size=16)
    with offload.load(dst, device="cpu", dtype="float32") as rt:
        seq, got = greedy_logits(rt, PROMPT, 4)
        assert rt.store.layout.kind == "quant"
    want = reference_logits(mole[1], seq, len(PROMPT))
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()
