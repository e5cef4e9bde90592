"""Generation, in the order it happens: prefill, decode one token, sample, the loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from quant.errors import UserError

from .models.transformer import Transformer

SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0          # 0: no top-k cut
    top_p: float = 1.0      # 1: no nucleus cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # NaN fails this too
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        # Checked at temperature 0 too, where it goes unused, so a seed that cannot work fails at once.
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise UserError(f"--seed must be between {SEED_MIN} and {SEED_MAX}, got {self.seed}")


@dataclass
class CachedTokens:
    """The token ids whose keys and values fill the KV cache's first positions, in order: what a later prompt
    that starts with them need not run again (prefix reuse: the history of a chat). Only generation writes
    it, and only after a forward has finished, so it never claims a position that a failed or interrupted
    step left half-written. A forward run outside generation (`model.forward` called directly) overwrites
    the cache behind its back: clear `ids` after one."""

    ids: list[int] = field(default_factory=list)
    reused: int = 0  # prompt tokens the latest generation took from the cache instead of prefilling them

    def reusable(self, prompt_ids: list[int]) -> int:
        """How many leading prompt tokens the cache holds already: their common prefix, short of the prompt's
        last token, which runs in any case (its logits choose the first new token)."""
        n, limit = 0, min(len(self.ids), len(prompt_ids) - 1)
        while n < limit and self.ids[n] == prompt_ids[n]:
            n += 1
        return n


def prefill(model: Transformer, prompt: torch.Tensor, chunk: int = 0, start: int = 0) -> torch.Tensor:
    """Run the prompt [T] at positions start.. (0, or after a reused prefix already in the KV cache) in one
    pass, or in passes of `chunk` tokens (the memory plan's, where attention memory grows with tokens x
    keys: offload.store.memory.Workspace.prefill_chunk); logits of its last position [V]."""
    T = prompt.shape[0]
    chunk = chunk or T
    for i in range(0, T, chunk):
        logits = model.forward(prompt[i:i + chunk], start + i)
    return logits[-1]


def decode_one(model: Transformer, token: int, pos: int) -> torch.Tensor:
    """Run one token at position `pos`; its logits [V]."""
    return model.forward(torch.tensor([token], device=model.device), pos)[-1]


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """Pick the next token id from logits [V] (float32)."""
    if s.temperature == 0:
        return int(torch.argmax(logits))
    # Shift the top logit to 0 before dividing: a tiny temperature then sends the others to -inf, where it
    # would send the top one to inf (softmax of inf is NaN). Below float32's smallest normal the temperature
    # itself rounds to 0 (0/0 is NaN); clamped there, every gap between distinct logits still gets probability 0.
    logits = logits.float().cpu()
    logits = (logits - logits.max()) / max(s.temperature, torch.finfo(torch.float32).tiny)
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p, and always the top token: a top_p below float32's
        # range rounds to 0 and would drop every token.
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= s.top_p
        drop[0] = False
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def positions_needed(prompt_tokens: int, max_new_tokens: int) -> int:
    """KV cache positions a generation fills: the last new token is sampled, never fed back."""
    return prompt_tokens + max_new_tokens - 1


def check_request(model: Transformer, prompt_ids: list[int], max_new_tokens: int) -> None:
    """Raise UserError for a generation that cannot run: an empty prompt, no new tokens, or more positions
    than the KV cache holds (saying whether --context can grow or the model's own limit is reached)."""
    if not prompt_ids:
        raise UserError("the prompt is empty")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    need = positions_needed(len(prompt_ids), max_new_tokens)
    if need > model.max_seq:
        limit = model.cfg.max_position_embeddings
        fix = ("the model's limit (max_position_embeddings in config.json); lower --max-new-tokens or shorten "
               "the prompt" if model.max_seq >= limit else f"raise --context (up to {limit}) or lower --max-new-tokens")
        raise UserError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({max_new_tokens}) needs {need} "
                        f"positions, more than the context holds ({model.max_seq}): {fix}")


def generate_ids(model: Transformer, prompt_ids: list[int], max_new_tokens: int, s: Sampling,
                 stop_ids: set[int] = frozenset(), prefill_chunk: Callable[[int, int], int] | None = None,
                 cached: CachedTokens | None = None, reuse_prefix: bool = False) -> Iterator[int]:
    """Generated token ids one by one; stops at a stop id (not yielded) or after max_new_tokens. A request
    that cannot run (`check_request`) raises here, before any step; the steps run as the ids are taken.

    `cached` tracks what the KV cache holds; with `reuse_prefix`, the prompt tokens it holds already are
    not prefilled again (the same tokens as a cold run: their keys and values are the ones that run wrote)."""
    check_request(model, prompt_ids, max_new_tokens)
    return _steps(model, prompt_ids, max_new_tokens, s, stop_ids, prefill_chunk, cached, reuse_prefix)


def _steps(model: Transformer, prompt_ids: list[int], max_new_tokens: int, s: Sampling,
           stop_ids: set[int], prefill_chunk: Callable[[int, int], int] | None = None,
           cached: CachedTokens | None = None, reuse_prefix: bool = False) -> Iterator[int]:
    generator = None
    if s.seed is not None:
        generator = torch.Generator().manual_seed(s.seed)
    cached = cached if cached is not None else CachedTokens()
    reuse = cached.reusable(prompt_ids) if reuse_prefix else 0
    # Chunks the memory plan has room for: after a reused prefix they pass a mask and attend to it too.
    chunk = prefill_chunk(len(prompt_ids) - reuse, reuse) if prefill_chunk else 0
    del cached.ids[reuse:]  # the positions after the reused prefix are about to be overwritten
    cached.reused = reuse
    logits = prefill(model, torch.tensor(prompt_ids[reuse:], device=model.device), chunk, start=reuse)
    cached.ids.extend(prompt_ids[reuse:])
    pos = len(prompt_ids)
    for i in range(max_new_tokens):
        token = sample(logits, s, generator)
        if token in stop_ids:
            return
        yield token
        if i + 1 < max_new_tokens:
            logits = decode_one(model, token, pos)
            cached.ids.append(token)
            pos += 1
