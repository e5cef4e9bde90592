"""Where experts run on the CPU: `--cpu-experts all` (every expert in host RAM and computed there), and
quantized experts through the compiled CPU kernels giving the same tokens at every budget."""

from __future__ import annotations

import pytest
import torch

import offload
from conftest import run_cli
from offload.convert import convert
from offload.models import open_checkpoint
from offload.store.memory import plan_memory
from offload.store.store import ExpertStore
from quant import cpu_kernels
from test_store import budget, run


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint's experts at 4 bits, group 32 (hidden 64, ffn 96)."""
    return convert(tiny_checkpoint, tmp_path_factory.mktemp("q4") / "q4", bits=4, group_size=32)


def test_all_computes_every_expert_on_the_cpu_with_no_device_slot_and_the_same_results(tiny_checkpoint):
    reference = run(tiny_checkpoint)
    plan = offload.load(tiny_checkpoint, device="cpu", context=256).store.plan
    for ram_slots, prefetch in ((plan.experts_total, 0), (3, 1)):  # every expert in RAM; streamed from disk
        tokens, logits, stats, store = run(tiny_checkpoint, cpu_experts="all", prefetch=prefetch,
                                           ram=ram_slots * plan.blob_bytes)
        assert store.plan.device_slots == 0 and store.dev.shape[0] == 0
        assert stats["cpu_experts"] == "all" and stats["expert_hits"] == 0
        assert stats["cpu_expert_calls"] == stats["uses"] > 0  # prefill too
        assert tokens == reference[0] and torch.equal(logits, reference[1])


def test_the_plan_for_all_leaves_the_experts_out_of_the_device_budget(tiny_checkpoint):
    cfg = open_checkpoint(tiny_checkpoint).config
    common = dict(cfg=cfg, itemsize=4, device="cuda", ram=1 << 30, context=256, blob_bytes=10_000,
                  free_device_bytes=None)
    with_slots = plan_memory(vram=None, **common)
    fixed = with_slots.dense_bytes + with_slots.kv_bytes + with_slots.margin_bytes
    plan = plan_memory(vram=fixed, device_experts=False, **common)  # no room for even one expert: enough
    assert plan.device_slots == 0 and plan.expert_pool_bytes == 0
    with pytest.raises(offload.UserError, match="one expert"):
        plan_memory(vram=fixed, **common)


@pytest.mark.skipif(cpu_kernels.path() == "torch", reason="no C compiler here: the kernels are not built")
def test_quantized_experts_through_the_kernels_are_bit_identical_across_budgets(quantized):
    reference = run(quantized)
    assert reference[2]["uses"] > 0
    for options in (dict(vram=budget(quantized, 2)), dict(vram=budget(quantized, 5), prefetch=1),
                    dict(vram=budget(quantized, 3), cpu_experts="always"), dict(cpu_experts="all", prefetch=2)):
        tokens, logits, _, _ = run(quantized, **options)
        assert tokens == reference[0] and torch.equal(logits, reference[1]), options
    # the torch path (before the kernels) computes the same experts, up to float rounding
    with cpu_kernels.torch_path():
        tokens, logits, _, _ = run(quantized)
    assert torch.allclose(logits, reference[1], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(cpu_kernels.path() == "torch", reason="no C compiler here: the kernels are not built")
def test_a_layers_experts_run_together_with_the_same_results(quantized, monkeypatch):
    """A decode step's experts computed on the CPU go to the kernels in one call (`ExpertStore.run_group`):
    the same tokens and logits as one call per expert, in the CPU slot pool and under --cpu-experts all."""
    calls = []
    grouped = cpu_kernels.qexperts
    monkeypatch.setattr(cpu_kernels, "qexperts", lambda xs, *a, **k: calls.append(len(xs)) or grouped(xs, *a, **k))
    options = [dict(), dict(cpu_experts="all"), dict(vram=budget(quantized, 3))]
    together = [run(quantized, **o) for o in options]
    # top-2: both experts of a decode step in one call (an expert alone, a prefill's, is a call of one)
    assert 2 in calls and set(calls) <= {1, 2}
    monkeypatch.setattr(ExpertStore, "run_group", None)  # the MoE block then runs them one at a time
    calls.clear()
    for o, (tokens, logits, stats, _) in zip(options, together):
        alone = run(quantized, **o)
        assert tokens == alone[0] and torch.equal(logits, alone[1]), o
        assert {k: stats[k] for k in ("uses", "expert_hits", "cpu_expert_calls")} == \
            {k: alone[2][k] for k in ("uses", "expert_hits", "cpu_expert_calls")}, o
    assert calls and set(calls) == {1}  # every expert in a call of its own


def test_cli_cpu_experts_all_and_threads(tiny_checkpoint):
    done = run_cli("generate", str(tiny_checkpoint), "hello", "-n", "4", "--cpu-experts", "all", "--threads", "1",
                   "--json")
    assert done.returncode == 0, done.stderr
    import json

    stats = json.loads(done.stdout)["stats"]
    assert stats["cpu_experts"] == "all" and stats["threads"] == 1
    bad = run_cli("generate", str(tiny_checkpoint), "hello", "--cpu-experts", "half")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "moe-offload: error: --cpu-experts must be auto, never, always or all, got 'half'"]
    bad = run_cli("generate", str(tiny_checkpoint), "hello", "--threads", "0")
    assert bad.returncode == 2 and "--threads must be a whole number >= 1, got 0" in bad.stderr
