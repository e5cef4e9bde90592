"""Generation through a Runtime: the context limit is exact, bad sampling values and foreign token ids are
one-line errors, one generation owns the KV cache at a time, and stats describe the run that just ended."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import offload
from offload.errors import UserError
from offload.generate import Sampling, sample

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def rt(tiny_checkpoint):
    return offload.load(tiny_checkpoint, device="cpu", context=64)


def test_the_context_holds_prompt_plus_new_tokens_minus_one(rt, tiny_checkpoint):
    """The last new token is sampled, never fed back: it needs no KV position."""
    ids = rt.encode(PROMPT)
    context = len(ids) + 3
    small = offload.load(tiny_checkpoint, device="cpu", context=context)
    assert len(list(small.generate_ids(ids, 4))) == 4
    with pytest.raises(UserError, match=f"needs {context + 1} positions, more than the context holds \\({context}\\)"):
        list(small.generate_ids(ids, 5))


def test_beyond_the_context_is_refused_before_any_token_with_the_fix_that_works(rt, tiny_checkpoint):
    ids = rt.encode(PROMPT)
    limit = rt.config.max_position_embeddings
    with pytest.raises(UserError, match=f"raise --context \\(up to {limit}\\) or lower --max-new-tokens"):
        rt.generate_ids(ids, 64)  # raised on the call, not at the first next(): the CLI has printed nothing yet
    with offload.load(tiny_checkpoint, device="cpu", context=10 * limit) as capped:  # above the model's limit
        assert capped.model.max_seq == limit
        with pytest.raises(UserError, match="the model's limit \\(max_position_embeddings in config.json\\); "
                                            "lower --max-new-tokens or shorten the prompt"):
            capped.generate(PROMPT, limit)


def test_the_cli_says_so_before_echoing_the_prompt():
    from conftest import run_cli

    result = run_cli("demo", "-n", "600")  # the demo model holds 512 positions
    assert result.returncode == 2 and result.stdout == ""
    assert "the model's limit" in result.stderr and len(result.stderr.splitlines()) == 1  # no blank line first


def test_an_empty_model_path_is_refused_not_read_as_the_current_folder():
    with pytest.raises(UserError, match="the model path is empty"):
        offload.load("  ")


@pytest.mark.parametrize("option, needle", [
    (dict(device=None), "--device must be"), (dict(dtype=None), "--dtype must be"),
    (dict(context=1.5), "--context must be a positive number of tokens"), (dict(context=True), "--context"),
    (dict(prefetch=1.5), "--prefetch must be 0"), (dict(prefetch=True), "--prefetch must be 0"),
])
def test_the_python_api_names_a_wrong_kind_of_option(tiny_checkpoint, option, needle):
    with pytest.raises(UserError, match=needle):
        offload.load(tiny_checkpoint, **option)


def test_zero_new_tokens_and_a_closed_runtime_are_one_line_errors(tiny_checkpoint):
    rt = offload.load(tiny_checkpoint, device="cpu", context=64)
    with pytest.raises(UserError, match="--max-new-tokens must be at least 1, got 0"):
        list(rt.generate_ids(rt.encode(PROMPT), 0))
    pending = rt.generate_ids(rt.encode(PROMPT), 2)  # asked for before close, run after
    rt.close()
    with pytest.raises(UserError, match="this runtime was closed"):
        list(rt.generate_ids(rt.encode(PROMPT), 2))
    with pytest.raises(UserError, match="this runtime was closed"):
        list(pending)
    rt = offload.load(tiny_checkpoint, device="cpu", context=64)  # every expert in RAM: nothing read after
    running = rt.generate_ids(rt.encode(PROMPT), 4)
    first = next(running)
    rt.close()  # between two tokens
    with pytest.raises(UserError, match="this runtime was closed"):
        next(running)
    assert isinstance(first, int)


@pytest.mark.parametrize("options", [dict(temperature=float("nan")), dict(temperature=-1.0), dict(top_k=-2)])
def test_bad_sampling_values_are_refused(options):
    with pytest.raises(UserError, match="--t"):
        Sampling(**options)


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 10**23])
def test_a_seed_torch_cannot_take_is_refused_naming_the_range(seed):
    with pytest.raises(UserError, match=f"--seed must be between {-2**63} and {2**64 - 1}, got {seed}"):
        Sampling(seed=seed)  # greedy too: the seed is checked whether or not it is used


def test_the_ends_of_the_seed_range_sample(rt):
    ids = rt.encode(PROMPT)
    for seed in (-2**63, 2**64 - 1):
        assert len(list(rt.generate_ids(ids, 2, Sampling(temperature=1.0, seed=seed)))) == 2


def test_the_cli_refuses_a_bad_seed_before_echoing_the_prompt():
    from conftest import run_cli

    result = run_cli("demo", "-n", "4", "--seed", "99999999999999999999999")
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith("moe-offload: error: --seed must be between")
    assert len(result.stderr.splitlines()) == 1


def test_an_ordinary_temperature_samples_softmax_of_logits_over_temperature():
    logits = torch.randn(320, generator=torch.Generator().manual_seed(0)) * 4
    for seed in range(20):
        probs = torch.softmax(logits / 0.7, dim=-1)
        expected = int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)))
        assert sample(logits, Sampling(temperature=0.7), torch.Generator().manual_seed(seed)) == expected


@pytest.mark.parametrize("options", [dict(temperature=1e-45), dict(temperature=5e-324),
                                     dict(temperature=1e-300, top_k=3), dict(temperature=1.0, top_p=1e-300),
                                     dict(temperature=1e-45, top_p=1e-300)])
def test_a_temperature_or_top_p_near_zero_picks_the_most_likely_token(options):
    """Values far below float32's range: dividing by the temperature or cutting at top_p must not leave NaN
    or no token at all, but tend to greedy, as the limit does."""
    logits = torch.randn(320, generator=torch.Generator().manual_seed(0)) * 4
    picks = {sample(logits, Sampling(**options), torch.Generator().manual_seed(seed)) for seed in range(10)}
    assert picks == {int(logits.argmax())}


def test_a_near_zero_temperature_generates_the_greedy_tokens(rt):
    ids = rt.encode(PROMPT)
    assert list(rt.generate_ids(ids, 6, Sampling(temperature=1e-45, seed=1))) == list(rt.generate_ids(ids, 6))


def test_a_tokenizer_id_beyond_the_models_vocabulary_is_refused(rt, monkeypatch):
    monkeypatch.setattr(rt.tokenizer, "encode", lambda text, chat=False: [1, rt.config.vocab_size + 5])
    with pytest.raises(UserError, match=f"beyond the model's vocab_size {rt.config.vocab_size}"):
        rt.encode("hello")


def test_a_second_generation_ends_the_first_instead_of_sharing_its_cache(rt):
    ids = rt.encode(PROMPT)
    alone = list(rt.generate_ids(ids, 6))
    first = rt.generate_ids(ids, 6)
    assert next(first) == alone[0]
    assert list(rt.generate_ids(ids, 6)) == alone  # the newer one runs on a cache of its own
    with pytest.raises(UserError, match="another generation started on this runtime"):
        next(first)


def test_stats_describe_a_generation_the_caller_stopped_early(rt):
    ids = rt.encode(PROMPT)
    list(rt.generate_ids(ids, 8))
    assert rt.stats()["new_tokens"] == 8
    for i, _ in enumerate(rt.generate_ids(ids, 8)):
        if i == 2:
            break
    s = rt.stats()
    assert s["new_tokens"] == 3 and s["prompt_tokens"] == len(ids) and s["tokens_per_s"] > 0


def test_decode_speed_excludes_the_step_that_only_found_end_of_sequence(rt, monkeypatch):
    """Stopping on end-of-sequence: the step that sampled it produced no token, so its time is not counted."""
    ids = rt.encode(PROMPT)
    tokens = list(rt.generate_ids(ids, 4))
    monkeypatch.setattr(rt.tokenizer, "eos_ids", {tokens[3]})
    slow, real_clock, skew = rt.model.forward, time.perf_counter, [0.0]

    def forward(x, pos):
        if pos == len(ids) + 2:  # the step that yields the end-of-sequence token "takes" 1000 s of the clock
            skew[0] += 1000.0
        return slow(x, pos)

    # A clock that jumps, not a sleep: the bound below then holds however busy the machine is.
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skew[0])
    monkeypatch.setattr(rt.model, "forward", forward)
    assert list(rt.generate_ids(ids, 4)) == tokens[:3]
    s = rt.stats()
    assert skew[0] == 1000.0 and s["new_tokens"] == 3 and s["decode_s"] < 1000


def test_prefetch_reads_in_flight_count_in_the_run_that_started_them(tiny_checkpoint, monkeypatch):
    from offload.store.sources import CheckpointExperts

    plan = offload.load(tiny_checkpoint, device="cpu", context=64).store.plan
    store = offload.load(tiny_checkpoint, device="cpu", context=64, ram=2 * plan.blob_bytes).store
    started, real = threading.Event(), CheckpointExperts.read_into

    def slow_read(self, key, blob):
        started.set()
        time.sleep(0.3)
        return real(self, key, blob)

    monkeypatch.setattr(CheckpointExperts, "read_into", slow_read)
    read = store._start_host((0, 0), protected={(0, 1)})  # as a prefetch does: no one waits for it
    started.wait()
    store.reset_stats()  # a new run starts while that read is still going
    read.result()
    assert store.stats()["bytes_disk"] == 0


# ---- which tokens sampling can ever draw, against a reference written out here -----------------------------

# Eight tokens with these probabilities at temperature 1 (logits are their logs): no cumulative sum below
# lands within 0.01 of a top_p used, so float rounding cannot move a token across a cut.
PROBS = [0.30, 0.22, 0.16, 0.12, 0.09, 0.06, 0.03, 0.02]


def drawable(probs: list[float], temperature: float, top_k: int, top_p: float) -> set[int]:
    """The tokens that may be drawn, as transformers' warpers define them, in their order: temperature, then
    the k most likely, then the smallest most-likely-first prefix of those (renormalized) whose mass reaches
    top_p, so the token that crosses top_p is kept."""
    weights = [p ** (1 / temperature) for p in probs]  # softmax(log p / T), up to its normalization
    order = sorted(range(len(probs)), key=lambda i: -weights[i])
    if top_k:
        order = order[:top_k]
    total, mass, kept = sum(weights[i] for i in order), 0.0, set()
    for i in order:
        kept.add(i)
        mass += weights[i] / total
        if mass >= top_p:
            break
    return kept


@pytest.mark.parametrize("temperature, top_k, top_p, expected", [
    (1.0, 0, 1.0, {0, 1, 2, 3, 4, 5, 6, 7}),
    (1.0, 3, 1.0, {0, 1, 2}),
    (1.0, 1, 1.0, {0}),
    (1.0, 0, 0.5, {0, 1}),          # 0.30 < 0.5, then 0.52: the token that crosses top_p is kept
    (1.0, 0, 0.75, {0, 1, 2, 3}),   # 0.68, then 0.80
    (1.0, 5, 0.7, {0, 1, 2}),       # top-5 renormalized: 0.337, 0.584, 0.764; without the top-k cut, 4 tokens
    (2.0, 0, 0.6, {0, 1, 2, 3}),    # a higher temperature flattens the distribution: more tokens reach 0.6
])
def test_sampling_draws_exactly_the_tokens_top_k_and_top_p_allow(temperature, top_k, top_p, expected):
    assert drawable(PROBS, temperature, top_k, top_p) == expected  # the reference agrees with the hand count
    logits = torch.tensor(PROBS).log() + 3.0  # any shift: softmax does not see it
    s = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    generator = torch.Generator().manual_seed(0)
    # Every kept token has probability >= 0.02 (0.98**600 < 1e-5 that one is never drawn); a dropped one, 0.
    drawn = {sample(logits, s, generator) for _ in range(600)}
    assert drawn == expected


def test_a_seed_gives_the_same_tokens_and_another_seed_others(rt):
    ids = rt.encode(PROMPT)
    runs = {seed: list(rt.generate_ids(ids, 10, Sampling(temperature=1.0, seed=seed))) for seed in range(4)}
    torch.manual_seed(12345)  # the global generator is not what a seeded run draws from
    assert list(rt.generate_ids(ids, 10, Sampling(temperature=1.0, seed=2))) == runs[2]
    assert len({tuple(tokens) for tokens in runs.values()}) == 4
    greedy = list(rt.generate_ids(ids, 10))
    assert all(tokens != greedy for tokens in runs.values())
