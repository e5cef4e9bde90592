"""Prefix reuse (offload/generate.py CachedTokens, Runtime.generate_ids(reuse_prefix=True)): a prompt that
starts with the tokens the KV cache holds prefills only the tokens after them, says how many it reused,
and generates what a cold run of the same prompt generates."""

from __future__ import annotations

import pytest

import offload
from offload.generate import CachedTokens, Sampling

PROMPT = "The for statement"


@pytest.fixture(scope="module")
def rt():
    with offload.load("demo", context=256) as runtime:
        yield runtime


def cold(rt, ids, n, sampling=Sampling()):
    """The tokens of `ids` run from an empty cache."""
    tokens = list(rt.generate_ids(ids, n, sampling))
    assert rt.stats()["prompt_tokens_reused"] == 0
    return tokens


def test_reusable_is_the_common_prefix_short_of_the_last_prompt_token():
    cached = CachedTokens([1, 5, 7, 9])
    assert cached.reusable([1, 5, 7, 9, 11]) == 4
    assert cached.reusable([1, 5, 8, 9, 11]) == 2
    assert cached.reusable([2, 5, 7]) == 0
    # The whole prompt cached: its last token runs again, for the logits of the first new token.
    assert cached.reusable([1, 5, 7, 9]) == 3
    assert cached.reusable([1, 5]) == 1
    assert CachedTokens().reusable([1, 2, 3]) == 0


def test_a_continued_prompt_prefills_only_its_new_tokens_and_generates_a_cold_runs_tokens(rt):
    first = rt.encode(PROMPT)
    out = cold(rt, first, 8)
    # The cache holds the prompt and every new token but the last, which was sampled and never run.
    assert rt.cached.ids == first + out[:-1]
    second = first + out + rt.tokenizer.tok.encode(" In a loop", add_special_tokens=False).ids
    warm = list(rt.generate_ids(second, 10, reuse_prefix=True))
    s = rt.stats()
    assert s["prompt_tokens_reused"] == len(first) + len(out) - 1 and s["prompt_tokens"] == len(second)
    assert warm == cold(rt, second, 10)


def test_sampled_tokens_match_a_cold_run_too(rt):
    ids = rt.encode(PROMPT)
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=3)
    list(rt.generate_ids(ids, 6, sampling))
    longer = ids + rt.tokenizer.tok.encode(" is used", add_special_tokens=False).ids
    warm = list(rt.generate_ids(longer, 8, sampling, reuse_prefix=True))
    assert rt.stats()["prompt_tokens_reused"] == len(ids)
    assert warm == cold(rt, longer, 8, sampling)


def test_the_same_prompt_again_reruns_only_its_last_token(rt):
    ids = rt.encode(PROMPT)
    first = list(rt.generate_ids(ids, 6, reuse_prefix=True))
    again = list(rt.generate_ids(ids, 6, reuse_prefix=True))
    assert rt.stats()["prompt_tokens_reused"] == len(ids) - 1
    assert again == first


def test_a_different_prompt_reuses_only_what_it_shares(rt):
    a, b = rt.encode(PROMPT), rt.encode("Lists are mutable")
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # <s> at least
    list(rt.generate_ids(a, 4))
    out = list(rt.generate_ids(b, 6, reuse_prefix=True))
    assert rt.stats()["prompt_tokens_reused"] == shared
    assert rt.cached.ids[:len(b)] == b
    assert out == cold(rt, b, 6)


def test_a_generation_stopped_early_leaves_only_what_it_ran_in_the_cache(rt):
    ids = rt.encode(PROMPT)
    gen = rt.generate_ids(ids, 20)
    taken = [next(gen) for _ in range(5)]
    gen.close()  # a client that went away after 5 tokens: the 5th was never run
    assert rt.cached.ids == ids + taken[:4]
    longer = ids + taken + rt.tokenizer.tok.encode(" and", add_special_tokens=False).ids
    warm = list(rt.generate_ids(longer, 6, reuse_prefix=True))
    assert rt.stats()["prompt_tokens_reused"] == len(ids) + 4
    assert warm == cold(rt, longer, 6)


def test_without_reuse_the_cache_is_still_tracked(rt):
    ids = rt.encode(PROMPT)
    list(rt.generate_ids(ids, 3, reuse_prefix=True))
    list(rt.generate_ids(rt.encode("Lists are mutable"), 3))  # a cold run overwrites the cache...
    list(rt.generate_ids(ids, 3, reuse_prefix=True))
    assert rt.stats()["prompt_tokens_reused"] == 1  # ...so only <s> is left to share with PROMPT
