"""The routing prior (offload/store/prior.py): its counts are the calibration text's routing counted by hand, it
survives the file, a wrong file is a one-line error, the context policy starts warm from it, and it never
changes what a run computes."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_checkpoint, run_cli
from test_optimum import repeating_trace
from test_store import budget, recorded, run

import offload
from offload import UserError
from offload.calibrate import calibration_text, routing_prior
from offload.demo import DEMO_DIR
from offload.store.cache import Context
from offload.store.optimum import optimum, replay
from offload.store.prior import FILE, RoutingPrior


def random_routing(seed: int, n: int = 300, vocab: int = 20, layers: int = 3, experts: int = 6, k: int = 2):
    rng = random.Random(seed)
    ids = torch.tensor([rng.randrange(vocab) for _ in range(n)])
    routing = {layer: torch.tensor([rng.sample(range(experts), k) for _ in range(n)]) for layer in range(layers)}
    return ids, routing


def test_the_counts_are_what_the_context_policy_counts_online():
    """A prior is what a cold context policy, decoding the same text, would have counted for each token alone."""
    ids, routing = random_routing(4, n=400, vocab=15)
    prior = RoutingPrior.build(ids, routing, layers=3, experts=6, vocab=15, ahead=Context.AHEAD)
    policy = Context()
    for i, t in enumerate(ids.tolist()):
        for layer in range(3):
            policy.visit(layer, routing[layer][i].tolist(), [t])
    for t in range(15):
        seen = policy.seen.get((t,))
        online = (seen.n, {layer: u for layer, u in seen.used.items() if u}) if seen else (0, {})
        assert prior.used(t) == online


@pytest.mark.parametrize("seed", range(3))
def test_the_counts_are_the_routing_that_followed_each_token(seed):
    ids, routing = random_routing(seed)
    prior = RoutingPrior.build(ids, routing, layers=3, experts=6, vocab=20, ahead=Context.AHEAD)
    tokens = ids.tolist()
    for token in range(20):
        expected: dict = {}
        for i, t in enumerate(tokens):
            if t != token:
                continue
            for ahead in range(Context.AHEAD):
                if i + ahead < len(tokens):
                    for layer, chosen in routing.items():
                        for e in chosen[i + ahead].tolist():
                            uses = expected.setdefault(layer, {}).setdefault(e, [0] * Context.AHEAD)
                            uses[ahead] += 1
        n, used = prior.used(token)
        assert n == tokens.count(token)
        assert used == expected
        assert (token in prior) == (n > 0)


def test_the_file_round_trips_and_a_wrong_file_is_refused(tmp_path):
    ids, routing = random_routing(0)
    prior = RoutingPrior.build(ids, routing, layers=3, experts=6, vocab=20, ahead=Context.AHEAD, source="text")
    prior.save(tmp_path / FILE)
    again = RoutingPrior.load(tmp_path / FILE)
    assert again.meta == prior.meta
    assert all(again.used(t) == prior.used(t) for t in range(20))
    assert not list(tmp_path.glob("*.tmp"))

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read it"):
        RoutingPrior.load(garbage)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(UserError, match="not a routing prior"):
        RoutingPrior.load(tmp_path / "weights.safetensors")

    # Tagged as a prior, damaged inside: refused at load, not midway through a run.
    damages = {
        "offsets": lambda t, m: t.update(offsets=t["offsets"][:-1]),
        "cells": lambda t, m: t.update(cells=t["cells"] + 1000),
        "counts": lambda t, m: t.update(counts=t["counts"].float()),
        "meta": lambda t, m: m.pop("tokens"),
        "layers": lambda t, m: m.update(layers="x"),
    }
    for name, damage in damages.items():
        tensors, meta = dict(prior.tensors), dict(prior.meta)
        damage(tensors, meta)
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        with pytest.raises(UserError, match="damaged"):
            RoutingPrior.load(tmp_path / f"{name}.safetensors")


@pytest.mark.parametrize("seed", range(4))
def test_context_starts_warm_from_a_prior_of_the_same_text(seed):
    """A prior counted on the text the run then decodes (the way calibration text stands in for what a model
    generates), one pass over 60 tokens of a 40-token vocabulary, so most tokens are new to a cold policy: warm,
    the context policy gets well over the hits it gets cold, and near the optimum; other policies ignore it."""
    trace = repeating_trace(seed, repeats=1, length=60, vocab=40)
    decode = [s for s in trace if s[0]]
    ids = torch.tensor([s[3][0] for s in decode if s[1] == 0])
    routing = {layer: torch.tensor([s[2] for s in decode if s[1] == layer]) for layer in range(4)}
    prior = RoutingPrior.build(ids, routing, layers=4, experts=8, vocab=40, ahead=Context.AHEAD)
    for slots in (4, 8, 16):
        best = optimum(trace, slots)["hits"]
        cold = replay(trace, slots, "context")["hits"]
        warm = replay(trace, slots, "context", prior)["hits"]
        assert warm >= 1.15 * cold and warm >= 0.7 * best, (slots, cold, warm, best)
        assert replay(trace, slots, "cycle", prior) == replay(trace, slots, "cycle")


def test_a_prior_counted_over_other_tokens_ahead_is_refused():
    ids, routing = random_routing(0)
    prior = RoutingPrior.build(ids, routing, layers=3, experts=6, vocab=20, ahead=Context.AHEAD + 1)
    with pytest.raises(ValueError, match="tokens ahead"):
        Context(prior=prior)


def test_the_shipped_demo_prior_is_the_training_texts():
    """offload/demo_model's prior is what `moe-offload prior demo` counts (scripts/train_demo.py writes it)."""
    text, name = calibration_text(None)
    fresh = routing_prior(DEMO_DIR, text, name)
    shipped = RoutingPrior.load(DEMO_DIR / FILE)
    assert shipped.meta == fresh.meta
    assert all(torch.equal(shipped.tensors[k], fresh.tensors[k]) for k in fresh.tensors)


@pytest.fixture(scope="module")
def demo_runs():
    """The demo at 8 of 32 device slots, prefetch 1, 40 tokens: without a prior and with the shipped one."""
    return {prior: run("demo", steps=40, vram=budget("demo", 8), prefetch=1, routing_prior=prior)
            for prior in ("none", "auto")}


def test_a_prior_never_changes_tokens_or_logits(demo_runs):
    cold, warm = demo_runs["none"], demo_runs["auto"]
    assert warm[3].routing_prior is not None and cold[3].routing_prior is None
    assert cold[0] == warm[0] and torch.equal(cold[1], warm[1])


def test_replaying_with_the_prior_is_the_store():
    """The ruler with a prior: replaying the store's layer steps from the same prior gives its own hits."""
    rt = offload.load("demo", device="cpu", context=256, prefetch=0, cpu_experts="never", vram=budget("demo", 8))
    trace = recorded(rt)
    generated = rt.generate_ids(rt.encode("The for statement is used to"), 40)
    next(generated)
    rt.store.reset_stats()
    list(generated)
    prior = rt.store.routing_prior
    got = replay(trace, 8, "context", prior)["hits"]
    assert got == rt.store.stats()["expert_hits"] > 0
    assert got != replay(trace, 8, "context")["hits"]  # the prior is in play


def test_the_prior_command_writes_a_file_runs_pick_up(tmp_path):
    folder = tmp_path / "model"
    make_checkpoint(folder, layers=2, experts=4)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat; the dog sat on the log. " * 20)
    done = run_cli("prior", folder, "--calibration", text)
    assert done.returncode == 0, done.stderr
    assert (folder / FILE).is_file() and "wrote" in done.stderr
    with offload.load(folder, device="cpu", context=256, vram=budget(folder, 3)) as rt:
        assert rt.store.routing_prior is not None and rt.store.routing_prior.meta["source"] == str(text)
    with offload.load(folder, device="cpu", context=256) as rt:  # every expert resident: nothing to evict
        assert rt.store.routing_prior is None and rt.stats()["routing_prior"] == "none"
    with offload.load(folder, device="cpu", context=256, vram=budget(folder, 3), policy="lru") as rt:
        assert rt.store.routing_prior is None  # only the context policy reads one
    with pytest.raises(UserError, match="does not read one"):
        offload.load(folder, device="cpu", context=256, policy="cycle", routing_prior=folder / FILE)
    assert not [f for f in folder.iterdir() if f.name.startswith(".")]  # no temporary file left
    again = run_cli("prior", folder, "--calibration", text)
    assert again.returncode == 2 and "--force" in again.stderr and again.stderr.count("\n") == 1
    assert run_cli("prior", folder, "--calibration", text, "--force").returncode == 0


def test_a_prior_of_another_model_is_a_one_line_error(tmp_path):
    folder = tmp_path / "model"
    make_checkpoint(folder, layers=2, experts=4)
    other = DEMO_DIR / FILE
    for args in (["--routing-prior", other], ["--routing-prior", tmp_path / "missing.safetensors"]):
        done = run_cli("generate", folder, "hello", "-n", "2", *args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "routing prior" in done.stderr or "--routing-prior" in done.stderr
    with pytest.raises(UserError, match="was made for a model with 4 layers, 8 experts"):
        offload.load(folder, device="cpu", routing_prior=other)


@pytest.mark.parametrize("args, needle", [
    (["/nonexistent/model"], "no such model folder"),
    (["demo", "--tokens", "1", "--out", "/tmp/never-written.safetensors"], "--tokens must be at least 2"),
    (["demo", "--calibration", "/nonexistent.txt", "--out", "/tmp/never-written.safetensors"], "no such file"),
    (["demo", "--out", "/nonexistent/dir/prior.safetensors"], "no folder"),
    (["demo"], "part of the package"),
])
def test_bad_prior_input_is_one_line(args, needle):
    done = run_cli("prior", *args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and needle in done.stderr, done.stderr
