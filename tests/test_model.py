"""The forward against the oracle: transformers' MixtralForCausalLM on random-weight checkpoints: float32 on CPU
to 1e-4, and float16 / bfloat16 (CPU, and CUDA's `--dtype auto`) no farther from float32 than transformers' own
run in that dtype. Every case's reference varies: inputs are drawn at random, and greedy runs must not repeat
one token (a model whose layers computed nothing would pass those)."""

from __future__ import annotations

import pytest
import torch

from offload.models import expected_shapes, open_checkpoint
from offload.generate import Sampling, decode_one, generate_ids, prefill
from offload.runtime import build_model
from offload.store import ExpertStore

from conftest import make_checkpoint

SHAPES = {
    "gqa4-e6-top2-untied": dict(heads=8, kv_heads=2, experts=6, top_k=2, tied=False),
    "mha-e4-top1-tied": dict(heads=4, kv_heads=4, experts=4, top_k=1, tied=True),
    "gqa8-e8-top2-sharded": dict(heads=8, kv_heads=1, experts=8, top_k=2, shard_size="100KB"),
    "headdim-window-e3-top2": dict(heads=4, kv_heads=2, experts=3, top_k=2, head_dim=32, sliding_window=8),
}
SEEDS = {"gqa4-e6-top2-untied": 3, "mha-e4-top1-tied": 1, "gqa8-e8-top2-sharded": 2, "headdim-window-e3-top2": 0}


def ours(folder, context=128):
    ckpt = open_checkpoint(folder)
    ckpt.validate(expected_shapes(ckpt.config))
    store = ExpertStore(ckpt, torch.device("cpu"), torch.float32)
    return build_model(ckpt, store, torch.device("cpu"), torch.float32, context)


def random_tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers_after_prefill_and_16_decode_steps(tmp_path, name):
    ref = make_checkpoint(tmp_path, layers=3, seed=SEEDS[name], tokenizer=False, **SHAPES[name])
    if SHAPES[name].get("shard_size"):
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model = ours(tmp_path)
    # Decode steps are fed random tokens, not the argmax: a random-weight model's greedy tokens can repeat one
    # token (the tied shape does), and a forward that ignored its context would then match the reference too.
    prompt, fed = random_tokens(21, 1), random_tokens(16, 2).tolist()
    with torch.no_grad():
        out = ref(prompt[None], use_cache=True)
        logits = prefill(model, prompt)
        torch.testing.assert_close(logits, out.logits[0, -1], atol=1e-4, rtol=0)
        past, pos, top = out.past_key_values, prompt.numel(), [int(out.logits[0, -1].argmax())]
        for token in fed:
            out = ref(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            logits = decode_one(model, token, pos)
            torch.testing.assert_close(logits, out.logits[0, -1], atol=1e-4, rtol=0)
            past, pos = out.past_key_values, pos + 1
            top.append(int(out.logits[0, -1].argmax()))
    assert len(set(top)) >= 8  # the reference's answer changes from step to step


# The tied shape is not here: at random initialization its residual stream is mostly the input token's
# embedding, which the tied lm_head scores highest, so its greedy run repeats one token from the start (the
# logits test above pins it on varied inputs). The sliding-window shape generates past its window of 8.
@pytest.mark.parametrize("name", ["gqa4-e6-top2-untied", "headdim-window-e3-top2"])
def test_greedy_generation_is_identical_for_32_tokens(tmp_path, name):
    ref = make_checkpoint(tmp_path, layers=2, seed=7, tokenizer=False, **SHAPES[name])
    model = ours(tmp_path)
    prompt = [1, 17, 42, 99, 5, 230, 64]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert len(set(expected)) >= 8  # a varied reference: a model that repeats one token cannot match it
    got = list(generate_ids(model, prompt, 32, Sampling(temperature=0)))
    assert got == expected


def test_sampling_is_reproducible_with_a_seed(tiny_checkpoint):
    model = ours(tiny_checkpoint)
    s = Sampling(temperature=0.9, top_k=50, top_p=0.9, seed=123)
    first = list(generate_ids(model, [1, 5, 6], 20, s))
    model.cache.k.zero_()
    second = list(generate_ids(model, [1, 5, 6], 20, s))
    assert first == second and len(first) == 20


# ---- half precision: the oracle is transformers in the same dtype --------------------------------------------

def transformers_logits(model, prompt: torch.Tensor, fed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' logits, float32 on the CPU: every prompt position [T, V], then each decode step [S, V]."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(prompt[None].to(device), use_cache=True)
        prompt_logits, past, steps = out.logits[0], out.past_key_values, []
        for token in fed:
            out = model(torch.tensor([[token]], device=device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[0, -1])
    return prompt_logits.float().cpu(), torch.stack(steps).float().cpu()


def runtime_logits(rt, prompt: torch.Tensor, fed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from a loaded runtime: the forward over the whole prompt, then one decode step per fed token."""
    model = rt.model
    with torch.no_grad():
        prompt_logits = model.forward(prompt.to(model.device), 0, all_logits=True)
        steps = [decode_one(model, token, prompt.numel() + i) for i, token in enumerate(fed)]
    return prompt_logits.float().cpu(), torch.stack(steps).float().cpu()


def check_half_against_float32(folder, ref, device: str, dtype: str | None) -> None:
    """Our run in a half type (`dtype`, or what `--dtype auto` picks on `device`) errs from float32 by no more than
    twice transformers' run in that same type: both round the same arithmetic to the same 8 or 11 significant
    bits, in different orders and with different float32 islands (norms, softmax), so their errors are of one
    size, not equal. Errors are measured in units of the float32 logits' spread, at every prompt position and
    every decode step; the top token must agree with float32 where transformers' does."""
    import copy

    import offload

    prompt, fed = random_tokens(21, 1), random_tokens(8, 2).tolist()
    rt = offload.load(folder, device=device, context=64, cpu_experts="never",
                      **({"dtype": dtype} if dtype else {}))
    half = rt.model.dtype
    assert half in (torch.float16, torch.bfloat16)
    exact = transformers_logits(ref, prompt, fed)
    theirs = transformers_logits(copy.deepcopy(ref).to(device, half), prompt, fed)
    got = runtime_logits(rt, prompt, fed)
    for part, x, y, z in zip(("prompt", "decode"), exact, theirs, got):
        spread = float(x.std())
        their_err, our_err = float((y - x).abs().max()) / spread, float((z - x).abs().max()) / spread
        assert our_err <= 2 * their_err, f"{half} {part}: ours {our_err:.4f} vs transformers {their_err:.4f}"
        assert bool(((z.argmax(-1) == x.argmax(-1)) | (y.argmax(-1) != x.argmax(-1))).all()), part


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["gqa4-e6-top2-untied", "headdim-window-e3-top2"])
def test_half_precision_on_cpu_is_as_close_to_float32_as_transformers_in_that_dtype(tmp_path, name, dtype):
    ref = make_checkpoint(tmp_path, layers=3, seed=SEEDS[name], **SHAPES[name])
    check_half_against_float32(tmp_path, ref, "cpu", dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("checkpoint_dtype", [torch.float32, torch.bfloat16])
def test_dtype_auto_on_a_gpu_is_as_close_to_float32_as_transformers_in_that_dtype(tmp_path, checkpoint_dtype):
    """`--dtype auto` on CUDA computes in a half type (float16, or bfloat16 for a bfloat16 checkpoint)."""
    name = "gqa4-e6-top2-untied"
    ref = make_checkpoint(tmp_path, layers=3, seed=SEEDS[name], dtype=checkpoint_dtype, **SHAPES[name])
    if checkpoint_dtype != torch.float32:  # the float32 oracle computes the weights the folder holds
        ref = ref.to(checkpoint_dtype).float()
    check_half_against_float32(tmp_path, ref, "cuda", None)
