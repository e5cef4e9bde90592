"""The expert store: caches, tiers and prefetch never change results, and its stats tell the truth."""

from __future__ import annotations

import functools
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import offload
from offload.errors import UserError
from offload.generate import decode_one, prefill
from offload.store import ExpertStore
from offload.store.cache import POLICIES
from offload.store.optimum import replay, step

PROMPT = "The quick brown fox jumps over the lazy dog and the experts"


def run(folder, steps: int = 12, **options):
    """Greedy prefill + decode; returns (tokens, stacked logits, stats, the store)."""
    rt = offload.load(folder, device="cpu", context=256, **options)
    ids = rt.encode(PROMPT)
    store, model = rt.store, rt.model
    calls, grouped = [], []  # every expert use, whichever way the MoE block asks for it
    inner, inner_group = store.run, store.run_group

    def run_one(layer, e, x):
        if not grouped:  # `run_group` counted it already
            calls.append((layer, e))
        return inner(layer, e, x)

    def run_group(layer, experts, x):
        calls.extend((layer, e) for e in experts)
        grouped.append(True)
        try:
            return inner_group(layer, experts, x)
        finally:
            grouped.pop()

    store.run = run_one
    if inner_group is not None:  # a test may take it away
        store.run_group = run_group
    store.reset_stats()
    logits = [prefill(model, torch.tensor(ids))]
    tokens = [int(logits[-1].argmax())]
    for i in range(steps):
        logits.append(decode_one(model, tokens[-1], len(ids) + i))
        tokens.append(int(logits[-1].argmax()))
    stats = store.stats()
    stats["uses"] = len(calls)
    return tokens, torch.stack(logits), stats, store


@functools.lru_cache
def _plan(folder):
    return offload.load(folder, device="cpu", context=256).store.plan


def budget(folder, slots: int) -> int:
    """A --vram that leaves room for exactly `slots` experts after the dense part, KV cache and workspace."""
    plan = _plan(str(folder))
    return plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + slots * plan.blob_bytes


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return run(tiny_checkpoint)


@pytest.mark.parametrize("slots", [2, 5, 11, 18])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_results_are_bit_identical_across_budgets_prefetch_and_cache_policies(tiny_checkpoint, reference, slots,
                                                                              prefetch, policy):
    tokens, logits, stats, _ = run(tiny_checkpoint, vram=budget(tiny_checkpoint, slots), prefetch=prefetch,
                                   policy=policy)
    assert stats["device_slots"] == slots and stats["cache_policy"] == policy
    assert tokens == reference[0]
    assert torch.equal(logits, reference[1])


@pytest.mark.parametrize("ram_slots", [2, 7])
def test_streaming_from_disk_through_a_small_ram_tier_is_bit_identical(tiny_checkpoint, reference, ram_slots):
    blob = reference[3].layout.nbytes
    tokens, logits, stats, store = run(tiny_checkpoint, vram=budget(tiny_checkpoint, 3), ram=ram_slots * blob, prefetch=1)
    assert stats["host_slots"] == ram_slots < 18
    assert stats["bytes_disk"] > 18 * blob  # experts were read from disk more than once: the disk tier is in use
    assert tokens == reference[0] and torch.equal(logits, reference[1])


def test_a_host_tier_that_holds_every_expert_is_filled_at_load(tiny_checkpoint):
    reports = []
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, vram=budget(tiny_checkpoint, 3),
                      progress=lambda done, total: reports.append((done, total)))
    store = rt.store
    total = store.plan.experts_total
    assert reports == [(i, total) for i in range(total + 1)]
    assert len(store.host_table) == total
    assert store.stats_.bytes_disk == total * sum(r.nbytes for r in store.layout.records)  # w1, w2, w3 once each
    for key in [(0, 0), (1, 4), (store.cfg.num_hidden_layers - 1, store.cfg.num_local_experts - 1)]:
        fresh = store.host[0].clone()
        store.source.read_into(key, fresh)
        assert torch.equal(store.host[store.host_table.lookup(key)], fresh), key


def test_a_shard_truncated_before_the_host_tier_is_filled_is_a_clean_error(tmp_path, tiny_checkpoint):
    import shutil

    from offload.models import open_checkpoint

    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, folder)
    store = ExpertStore(open_checkpoint(folder), torch.device("cpu"), torch.float32, vram=budget(folder, 3), context=256)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated since it was opened"):
        store.fill_host()
    assert len(store.host_table) == 0  # no expert of the failed fill is trusted afterwards


def test_a_read_failing_while_load_fills_the_host_tier_is_a_clean_error(tiny_checkpoint, monkeypatch):
    from offload.store.sources import CheckpointExperts

    reads = []
    real = CheckpointExperts.read_into

    def read_into(self, key, blob):
        reads.append(key)
        if key == (1, 2):
            raise UserError(f"{key}: read failed (Input/output error)")
        return real(self, key, blob)

    monkeypatch.setattr(CheckpointExperts, "read_into", read_into)
    with pytest.raises(UserError, match=r"\(1, 2\): read failed"):
        offload.load(tiny_checkpoint, device="cpu", context=256)
    assert (1, 2) in reads


def test_cpu_experts_are_bit_identical_and_counted(tiny_checkpoint, reference):
    tokens, logits, stats, _ = run(tiny_checkpoint, vram=budget(tiny_checkpoint, 2), cpu_experts="always")
    assert stats["cpu_expert_calls"] > 0
    assert tokens == reference[0] and torch.equal(logits, reference[1])


def test_with_cpu_experts_the_reader_speed_does_not_decide_where_an_expert_runs(monkeypatch):
    """On a GPU a CPU expert rounds differently from the device's: which experts run where must follow from
    the settings alone, not from whether a disk read happened to be done (the same split, so the same
    tokens, with a fast and a slow disk)."""
    import time

    from offload.store.sources import CheckpointExperts

    real = CheckpointExperts.read_into
    plan = _plan("demo")
    splits = {}
    for delay in (0.0, 0.01):
        monkeypatch.setattr(CheckpointExperts, "read_into",
                            lambda self, key, blob, d=delay: (time.sleep(d), real(self, key, blob))[1])
        for slots, host, prefetch in ((10, 4, 3), (10, 16, 3), (16, 4, 3)):
            vram = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + slots * plan.blob_bytes
            with offload.load("demo", device="cpu", context=256, vram=vram, ram=host * plan.blob_bytes,
                              prefetch=prefetch, cpu_experts="always") as rt:
                tokens = list(rt.generate_ids(rt.encode("Exceptions are raised"), 16))
                s = rt.stats()
            splits.setdefault((slots, host, prefetch), []).append((s["expert_hits"], s["cpu_expert_calls"], tokens))
    for setting, (fast, slow) in splits.items():
        assert fast == slow, setting


@pytest.mark.parametrize("options", [dict(slots=2, prefetch=0), dict(slots=4, prefetch=2), dict(slots=7, prefetch=1),
                                     dict(slots=3, prefetch=0, cpu_experts="always"),
                                     dict(slots=4, prefetch=1, policy="lru"), dict(slots=4, prefetch=1, policy="lfu")])
def test_stats_add_up(tiny_checkpoint, options):
    options = dict(options)
    slots = options.pop("slots")
    ram = _plan(str(tiny_checkpoint)).experts_total * _plan(str(tiny_checkpoint)).blob_bytes  # every expert
    _, _, s, store = run(tiny_checkpoint, vram=budget(tiny_checkpoint, slots), ram=ram, **options)
    assert s["expert_hits"] + s["expert_misses"] == s["uses"] > 0
    assert s["prefetch_hits"] <= s["expert_hits"] and s["prefetch_hits"] + s["prefetch_wasted"] <= s["prefetch_issued"]
    assert s["bytes_prefetch_wasted"] == s["prefetch_wasted"] * store.layout.nbytes
    copied = s["expert_misses"] - s["cpu_expert_calls"] + s["prefetch_issued"]
    assert s["bytes_h2d"] == copied * store.layout.nbytes
    assert s["host_slots"] == store.plan.experts_total  # --ram holds every expert: read at load,
    assert s["bytes_disk"] == 0                          # so a generation never touches the disk


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_bigger_budget_never_misses_more(tiny_checkpoint, policy):
    misses = [run(tiny_checkpoint, vram=budget(tiny_checkpoint, n), prefetch=0, policy=policy)[2]["expert_misses"]
              for n in (1, 2, 3, 4, 6, 9, 13, 18)]
    assert all(a >= b for a, b in zip(misses, misses[1:])), misses
    assert misses[-1] < misses[0]


def recorded(rt) -> list[list]:
    """The routing trace (optimum.step's format) the store of `rt` is asked for from now on, as it is asked."""
    trace, prepare = [], rt.store.prepare

    def recording(layer, h, experts, guesses=None, tokens=None):
        trace.append(step(h.shape[0] == 1, layer, experts, tokens))
        return prepare(layer, h, experts, guesses, tokens)

    rt.store.prepare = recording
    return trace


@pytest.mark.parametrize("policy", list(POLICIES))
def test_replaying_the_routing_trace_is_the_store(tiny_checkpoint, policy):
    """The ruler measures the store: replaying the layer steps the store was asked for (with the token ids the
    context policy learns from) gives exactly the store's own decode hits, prefetch off. With room for a
    prefill layer's experts: below that the store loads the rest as they run, in an order no trace records."""
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, prefetch=0, policy=policy, cpu_experts="never",
                      vram=budget(tiny_checkpoint, 8))
    trace = recorded(rt)
    generated = rt.generate_ids(rt.encode(PROMPT * 2), 24)
    next(generated)  # the prefill's token
    rt.store.reset_stats()
    assert len(list(generated)) == 23
    assert replay(trace, 8, policy)["hits"] == rt.store.stats()["expert_hits"] > 0


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_guess_copied_is_still_bit_identical(tiny_checkpoint, reference, monkeypatch, policy):
    """The random tiny model's router-ahead guesses rarely pay for themselves, so the store copies few; with
    that check off, it copies every guess it may, and the results do not change."""

    monkeypatch.setattr(ExpertStore, "guess_accuracy", lambda self, layer, ahead, rank: 1.0)
    monkeypatch.setattr(ExpertStore, "WASTE_SHARE", 1e9)
    tokens, logits, s, _ = run(tiny_checkpoint, vram=budget(tiny_checkpoint, 5), prefetch=2, policy=policy)
    assert s["prefetch_issued"] > s["prefetch_hits"] > 0 and s["prefetch_wasted"] > 0
    assert tokens == reference[0] and torch.equal(logits, reference[1])


def test_guesses_that_do_not_pay_are_not_copied(tiny_checkpoint, reference):
    """On the random tiny model the guesses are mostly wrong: the store measures that and copies few, so
    prefetch moves at most a few percent more bytes than no prefetch, with results unchanged."""
    off = run(tiny_checkpoint, vram=budget(tiny_checkpoint, 5), prefetch=0)[2]
    tokens, logits, on, _ = run(tiny_checkpoint, vram=budget(tiny_checkpoint, 5), prefetch=2)
    assert on["prefetch_skipped"] > 0
    assert on["bytes_h2d"] <= 1.1 * off["bytes_h2d"]
    assert tokens == reference[0] and torch.equal(logits, reference[1])


def test_prefetch_hits_on_the_trained_demo_model():
    """Guesses are copied once they have been right often enough: over 120 tokens (over 24, with the routing
    prior's warm start, the cache already holds what the guesses would bring)."""
    rt = offload.load("demo", device="cpu", context=256, prefetch=1, vram=budget("demo", 12))
    list(rt.generate("The for statement is used to", max_new_tokens=120))
    s = rt.stats()
    assert s["prefetch_issued"] > 0 and s["prefetch_hits"] > 0


@pytest.mark.parametrize("slots", [4])
def test_prefetch_on_the_trained_demo_model_raises_hits_for_at_most_a_tenth_more_bytes(slots):
    """Guesses are copied only while the run's copies stay within WASTE_SHARE of those the same run without
    prefetch makes (counted on its device table, kept beside): hits rise, bytes host->device stay within 10%
    of prefetch off's, and the tokens do not change. 120 tokens: guesses are copied once they have been right
    often enough, and the gain shows over that warm-up."""
    off = run("demo", steps=120, vram=budget("demo", slots), prefetch=0)
    for prefetch in (1, 2):
        on = run("demo", steps=120, vram=budget("demo", slots), prefetch=prefetch)
        assert on[2]["prefetch_issued"] > 0
        assert on[2]["expert_hits"] > off[2]["expert_hits"]
        assert on[2]["bytes_h2d"] <= 1.1 * off[2]["bytes_h2d"]
        assert on[0] == off[0] and torch.equal(on[1], off[1])


@pytest.mark.parametrize("policy", list(POLICIES))
def test_prefetch_counts_exactly_the_copies_prefetch_off_would_make(tiny_checkpoint, monkeypatch, policy):
    """What the guesses' budget is measured against: the device table kept beside, fed the same layer steps
    without guesses, misses exactly as often as a run with prefetch off copies (room for a prefill layer's
    experts, as the store then takes them in the order of the trace); the run's own copies are its demand
    misses and its guesses."""
    monkeypatch.setattr(ExpertStore, "WASTE_SHARE", 1e9)  # copy every guess the policy lets in: states diverge
    off = run(tiny_checkpoint, steps=20, vram=budget(tiny_checkpoint, 8), prefetch=0, policy=policy,
              cpu_experts="never")
    on = run(tiny_checkpoint, steps=20, vram=budget(tiny_checkpoint, 8), prefetch=2, policy=policy,
             cpu_experts="never")
    store = on[3]
    assert on[2]["prefetch_issued"] > 0
    assert store.shadow_misses == off[2]["expert_misses"] == off[3].copies
    assert store.copies == on[2]["expert_misses"] + on[2]["prefetch_issued"]


def test_peak_device_bytes_stay_within_the_budget(tiny_checkpoint):
    vram = budget(tiny_checkpoint, 4)
    _, _, s, _ = run(tiny_checkpoint, vram=vram, prefetch=1)
    assert s["peak_vram_bytes"] <= vram


@pytest.mark.parametrize("options, needle", [
    (dict(vram="1KiB"), "cannot hold the dense part"),
    (dict(ram=0), "--ram"),
    (dict(vram="12 parsecs"), "not a size"),
    (dict(prefetch=-1), "--prefetch"),
    (dict(cpu_experts="sometimes"), "--cpu-experts"),
])
def test_bad_budgets_are_refused_with_the_numbers(tiny_checkpoint, options, needle):
    with pytest.raises(UserError, match=needle):
        offload.load(tiny_checkpoint, device="cpu", **options)


def test_a_shard_truncated_while_running_is_a_clean_error(tmp_path, tiny_checkpoint):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, folder)
    # A host tier of 4 experts, so experts are still read from disk while generating.
    rt = offload.load(folder, device="cpu", context=256, vram=budget(folder, 2), ram=4 * _plan(str(folder)).blob_bytes)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    with pytest.raises(UserError, match="truncated"):
        list(rt.generate("The quick brown fox", max_new_tokens=8))


@pytest.mark.parametrize("failure", [OSError(5, "Input/output error"), KeyboardInterrupt()])
def test_a_runtime_used_again_after_a_failed_read_is_bit_identical(tiny_checkpoint, reference, monkeypatch, failure):
    """A read that fails (a disk error, or Ctrl-C while waiting for it, as in a notebook) must not leave a
    device slot mapped to an expert whose bytes never arrived: the next run would take it for a hit."""
    from offload.store.sources import CheckpointExperts

    blob = reference[3].layout.nbytes
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, vram=budget(tiny_checkpoint, 3), ram=2 * blob,
                      prefetch=0)
    real, reads = CheckpointExperts.read_into, []

    def read_into(self, key, out):
        reads.append(key)
        if len(reads) == 5:
            raise failure
        return real(self, key, out)

    monkeypatch.setattr(CheckpointExperts, "read_into", read_into)
    with pytest.raises((UserError, KeyboardInterrupt)):
        list(rt.generate_ids(rt.encode(PROMPT), 4))
    monkeypatch.setattr(CheckpointExperts, "read_into", real)
    slots = rt.store.dev_table.slot_of
    assert reads[4] not in slots  # the failed expert holds no slot
    rt.store.reset_stats()
    ids = rt.encode(PROMPT)
    logits = [prefill(rt.model, torch.tensor(ids))]
    for i, token in enumerate(reference[0][:-1]):
        logits.append(decode_one(rt.model, token, len(ids) + i))
    assert torch.equal(torch.stack(logits), reference[1])


def test_a_prefill_reads_each_expert_once_through_a_host_tier_smaller_than_a_layer(tiny_checkpoint):
    """Prefill needs most of a layer's experts at once. With fewer host slots than that, reading all of
    them up front would evict ones read but not yet copied, and read them again."""
    plan = _plan(str(tiny_checkpoint))
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, vram=budget(tiny_checkpoint, plan.experts_total),
                      ram=3 * plan.blob_bytes, prefetch=0)
    long = " ".join([PROMPT] * 4)
    ids = rt.encode(long)
    rt.store.reset_stats()
    prefill(rt.model, torch.tensor(ids))
    s = rt.store.stats()
    assert s["host_slots"] == 3 and s["expert_misses"] > 3 * rt.config.num_hidden_layers
    assert s["bytes_disk"] == s["expert_misses"] * sum(r.nbytes for r in rt.store.layout.records)


def test_the_reader_runs_reads_wanted_now_before_reads_ahead():
    """A read the model waits for goes before reads ahead for later layers, also when it was first queued
    as a read-ahead (promoted); each read runs once."""
    import threading

    from offload.store.reader import Reader

    gate, order = threading.Event(), []
    reader = Reader()
    reader.submit(0, gate.wait)  # keeps the thread busy while the rest queue up
    ahead = [reader.submit(2, order.append, f"ahead {i}") for i in range(3)]
    wanted = reader.submit(3, order.append, "read ahead, then wanted now")
    now = reader.submit(0, order.append, "wanted now")
    reader.promote(wanted, 0)
    reader.promote(ahead[0], 5)  # later is not sooner: no change
    gate.set()
    reader.shutdown()
    assert order == ["wanted now", "read ahead, then wanted now", "ahead 0", "ahead 1", "ahead 2"]
    assert all(f.done() for f in (*ahead, wanted, now))


def test_reader_threads_end_at_exit_after_the_read_in_progress():
    """At interpreter exit a reader thread still running (Ctrl-C mid-generation, a store never closed) is
    ended after its current read, queued reads dropped: a daemon thread torn down inside torch's C++ during
    finalization aborts the process instead."""
    import threading

    from offload.store.reader import Reader, _stop_readers

    started, gate, done = threading.Event(), threading.Event(), []
    reader = Reader()
    current = reader.submit(0, lambda: (started.set(), gate.wait()))
    queued = [reader.submit(1, done.append, i) for i in range(3)]
    started.wait()  # a read in progress, not one still queued (those exit drops)
    thread = reader.thread
    stopping = threading.Thread(target=_stop_readers)
    stopping.start()
    while not any(job[2] is None for job in list(reader.queue.queue)):  # the exit hook's stop is queued
        time.sleep(0.001)
    gate.set()  # the read in progress finishes on its own, while the exit hook waits for it
    stopping.join()
    assert not thread.is_alive()
    assert current.done() and done == [] and not any(f.done() for f in queued)
    reader.submit(0, done.append, "later")  # a reader used again after that starts a new thread
    reader.shutdown()
    assert sorted(map(str, done)) == ["0", "1", "2", "later"]


class FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister calls; `fail` makes registering return that error."""

    def __init__(self, fail: int = 0):
        self.calls, self.fail = [], fail

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size))
        return self.fail

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


def test_pinned_host_memory_is_locked_to_the_byte_and_unlocked_when_collected(monkeypatch):
    from quant import pinned

    fake = FakeCudart()
    monkeypatch.setattr(pinned, "_cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    t = pinned.empty((3, 1000), pin=True)  # 3,000 bytes: torch's pinned allocator would lock 4,096
    ptr = t.data_ptr()
    assert fake.calls == [("register", ptr, 3000)]
    view = t[1]
    del t
    assert len(fake.calls) == 1  # a view still uses the memory: it stays locked
    del view
    assert fake.calls == [("register", ptr, 3000), ("unregister", ptr)]
    assert pinned.empty((4, 4), pin=False) is not None and len(fake.calls) == 2  # unpinned: no CUDA calls


def test_a_host_tier_that_cannot_be_pinned_is_a_user_error(monkeypatch):
    from quant import pinned

    monkeypatch.setattr(pinned, "_cudart", lambda: FakeCudart(fail=2))
    with pytest.raises(UserError, match="could not page-lock .* lower --ram"):
        pinned.empty(1 << 20, pin=True)


FAKE_CUDART = """
static int last_error = 0, cleared = 0;
void fake_fail(int err) { last_error = err; }
int cudaGetLastError(void) { int e = last_error; last_error = 0; cleared++; return e; }
int fake_cleared(void) { return cleared; }
"""


@pytest.mark.skipif(not shutil.which("cc") or not Path("/proc/self/maps").exists(),
                    reason="needs a C compiler and /proc/self/maps (Linux) to build and find a stand-in libcudart")
def test_a_refused_page_lock_clears_the_last_cuda_error_it_left(monkeypatch, tmp_path):
    """cudaHostRegister's error stays as the thread's last CUDA error, which torch's next kernel-launch check
    would raise: the error path reads it off through the libcudart the process loaded. A stand-in library
    (loaded as a CUDA torch would have loaded the real one) records the call."""
    import ctypes

    from quant import pinned

    (tmp_path / "fake.c").write_text(FAKE_CUDART)
    lib_path = tmp_path / "libcudart.so.99"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib_path), str(tmp_path / "fake.c")], check=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.fake_fail(1)  # what a failed cudaHostRegister leaves behind
    monkeypatch.setattr(pinned, "_cudart", lambda: FakeCudart(fail=1))
    with pytest.raises(UserError, match="could not page-lock"):
        pinned.empty(1 << 10, pin=True)
    assert lib.fake_cleared() == 1
    assert lib.cudaGetLastError() == 0  # nothing left for torch's next check to find


def test_a_vram_budget_above_what_the_gpu_has_free_is_refused_before_allocating(tiny_checkpoint, monkeypatch):
    """Free is what the driver reports plus what torch's caching allocator holds unused (this process can
    reuse it). Faked here: the check runs before anything is allocated on the device."""
    from offload.models import open_checkpoint

    MiB = 1 << 20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024 * MiB, 80 * 1024 * MiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 512 * MiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 256 * MiB)
    with pytest.raises(UserError, match=r"--vram 2.00 GiB is more than cuda has free \(1.25 GiB\)"):
        ExpertStore(open_checkpoint(tiny_checkpoint), torch.device("cuda"), torch.float32, vram="2GiB", context=256)


def test_cpu_expert_decision_compares_measured_costs_and_reports_them(tiny_checkpoint, monkeypatch):
    """`--cpu-experts auto` on a GPU, run on the CPU with CUDA's synchronize faked: the costs are measured
    (each synchronized), the decision is their comparison, and stats() reports them."""
    from quant import pinned

    rt = offload.load(tiny_checkpoint, device="cpu", context=256, vram=budget(tiny_checkpoint, 3))
    store = rt.store
    assert store.stats()["cpu_expert_costs"] is None  # no GPU: nothing to decide
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    monkeypatch.setattr(pinned, "_cudart", lambda: FakeCudart())
    store.cuda, store.cpu_experts = True, "auto"
    wins = store._decide_cpu_experts()
    costs = store.measured
    times = {"cpu_expert_s", "h2d_blob_s", "device_expert_s"}
    assert set(costs) == times | {"blob_kind", "cpu_kernels"} and min(costs[k] for k in times) > 0
    assert costs["blob_kind"] == "dense 32-bit" and costs["cpu_kernels"] in ("avx512", "portable", "torch")
    # a CPU expert with its round trip against a blob's copy plus the expert's compute on the device
    assert wins == (costs["cpu_expert_s"] < costs["h2d_blob_s"] + costs["device_expert_s"])
    assert len(syncs) == 3 * 6  # each timing: a warm-up and 5 repeats, each synchronized
    assert store.stats()["cpu_expert_costs"] == costs


def test_pinned_memory_can_come_from_torchs_allocator_where_registering_is_unsupported(monkeypatch):
    from quant import pinned

    made = []
    real_empty = torch.empty

    def fake_empty(*shape, **kwargs):  # a CPU build cannot pin: record the request, return plain memory
        made.append(kwargs.get("pin_memory", False))
        kwargs.pop("pin_memory", None)
        return real_empty(*shape, **kwargs)

    monkeypatch.setenv("MOE_OFFLOAD_PINNED", "torch")
    monkeypatch.setattr(pinned, "_cudart", lambda: pytest.fail("cudaHostRegister must not be called"))
    monkeypatch.setattr(torch, "empty", fake_empty)
    t = pinned.empty((3, 1000), pin=True)
    assert made == [True] and t.shape == (3, 1000) and t.dtype == torch.uint8
    monkeypatch.setenv("MOE_OFFLOAD_PINNED", "sometimes")
    with pytest.raises(UserError, match="MOE_OFFLOAD_PINNED must be 'register' .* or 'torch', got 'sometimes'"):
        pinned.empty(10, pin=True)
    assert pinned.empty(10, pin=False).numel() == 10  # nothing to pin (a CPU run): the setting is not read


def test_planning_a_vram_budget_above_what_is_free_still_works(tiny_checkpoint, monkeypatch):
    """`inspect` and the benchmarks plan budgets the GPU cannot give right now (the refusal is the store's)."""
    from offload.inspect import memory_plan

    MiB = 1 << 20
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024 * MiB, 80 * 1024 * MiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    plan = memory_plan(tiny_checkpoint, device="cuda", dtype="float32", context=256, vram=10**15)["plan"]
    assert plan["vram_budget"] == 10**15 and plan["device_slots"] == plan["experts_total"]


def test_a_per_layer_cache_keeps_each_layer_to_its_share_and_changes_no_result(tiny_checkpoint, reference):
    """`per_layer_cache=True` (mixtral-offloading's policy, kept for bench_offload's comparison): the device slots
    are split between the layers (7 slots over 3 layers: 3, 2, 2), a layer's miss evicts only its own experts,
    and what is generated is what the global cache generates."""
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, vram=budget(tiny_checkpoint, 7), prefetch=1,
                      per_layer_cache=True)
    store, table = rt.store, rt.store.dev_table
    held = []
    inner = store.run

    def run_and_count(layer, e, x):
        held.append([sum(1 for key in table.key_of if key is not None and key[0] == n) for n in range(3)])
        return inner(layer, e, x)

    store.run = run_and_count
    ids = rt.encode(PROMPT)
    logits = [prefill(rt.model, torch.tensor(ids))]
    for i in range(12):
        logits.append(decode_one(rt.model, int(logits[-1].argmax()), len(ids) + i))
    assert torch.equal(torch.stack(logits), reference[1])
    assert all(count[0] <= 3 and count[1] <= 2 and count[2] <= 2 for count in held)
    assert held[-1] == [3, 2, 2] and store.stats()["expert_misses"] > 0
    with pytest.raises(UserError, match="a per-layer cache needs at least 6 device slots"):  # 3 layers x top-2
        offload.load(tiny_checkpoint, device="cpu", context=256, vram=budget(tiny_checkpoint, 5), per_layer_cache=True)


class RegisteringCudart(FakeCudart):
    """A stand-in libcudart that, like the real one, refuses to register pages already registered
    (cudaErrorHostMemoryAlreadyRegistered) and keeps the ranges registered now."""

    def __init__(self):
        super().__init__()
        self.registered: dict[int, int] = {}

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size))
        if any(p < ptr + size and ptr < p + n for p, n in self.registered.items()):
            return 712
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0 if self.registered.pop(ptr, None) is not None else 713  # cudaErrorHostMemoryNotRegistered


def test_unpinning_waits_for_its_own_device_only_and_unregisters_even_when_that_wait_fails(monkeypatch):
    """A sync of every visible GPU creates contexts on idle ones (and fails on exclusive-process GPUs); a
    failed sync that skipped cudaHostUnregister left the freed range registered, and the next registration
    of those pages failed with 'already registered'."""
    import gc

    from quant import pinned

    fake, synced = RegisteringCudart(), []

    def synchronize(device=None):
        synced.append(device)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(pinned, "_cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    t = pinned.empty((4, 1000), pin=True, device=torch.device("cuda", 1))
    ptr = t.data_ptr()
    assert fake.registered == {ptr: 4000}
    with pytest.raises(RuntimeError, match="illegal memory access"):
        pinned.release(t)
    assert synced == [torch.device("cuda", 1)]  # the store's device, not every visible one
    assert fake.registered == {}                 # unregistered although the wait failed ...
    assert fake.cudaHostRegister(ptr, 4000, pinned.PORTABLE) == 0  # ... so the pages can be registered again
    fake.cudaHostUnregister(ptr)
    del t
    gc.collect()
    assert synced == [torch.device("cuda", 1)] and fake.calls[-1] == ("unregister", ptr)  # unlocked once only


def test_a_host_tier_is_page_locked_in_pieces_of_whole_slots_counted_by_the_progress(tiny_checkpoint, monkeypatch):
    """Locking tens of GB takes seconds: the host tier is registered a piece at a time (whole slots, so one
    blob's copy never spans two registrations), each piece reported by load's progress before the experts
    are read in, to one total; close unlocks every piece."""
    from quant import pinned

    fake = RegisteringCudart()
    blob = _plan(str(tiny_checkpoint)).blob_bytes
    monkeypatch.setattr(pinned, "_cudart", lambda: fake)
    monkeypatch.setattr(pinned, "PIECE_BYTES", 4 * blob + 1)  # 4 host slots a piece
    reports = []
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, pin=True,
                      progress=lambda done, total: reports.append((done, total)))
    host, slots = rt.store.host, rt.store.plan.host_slots
    registered = [(ptr - host.data_ptr(), size) for what, ptr, size in fake.calls]
    assert slots == 18 and registered == [(i * 4 * blob, min(4, slots - 4 * i) * blob) for i in range(5)]
    total = slots + rt.store.plan.experts_total
    assert reports[:6] == [(0, total), (4, total), (8, total), (12, total), (16, total), (18, total)]
    assert reports[6:] == [(slots + i, total) for i in range(rt.store.plan.experts_total + 1)]
    rt.close()
    assert fake.registered == {}


def test_the_bandwidth_probe_copies_into_a_slot_of_the_pool_not_beside_it(tiny_checkpoint, reference, monkeypatch):
    """With every device slot holding an expert, the probe takes the slot of the expert the cache policy would
    evict next (which that expert leaves) instead of a scratch blob outside the budget; generating afterwards
    is unchanged."""
    from offload.profile import record

    rt = offload.load(tiny_checkpoint, device="cpu", context=256, vram=budget(tiny_checkpoint, 3))
    store = rt.store
    ids = rt.encode(PROMPT)
    prefill(rt.model, torch.tensor(ids))
    assert not store.dev_table.free
    lru = store.dev_table.policy.victim(store.dev_table.slot_of, set())
    targets = []
    real = record.copy_bandwidth
    monkeypatch.setattr(record, "copy_bandwidth", lambda src, dst, min_s: (targets.append(dst), real(src, dst, min_s))[1])
    assert record.measure_h2d(store, min_s=0) > 0
    assert targets[0].untyped_storage().data_ptr() == store.dev.untyped_storage().data_ptr()
    assert lru not in store.dev_table and len(store.dev_table) == 2
    logits = [prefill(rt.model, torch.tensor(ids))]
    for i, token in enumerate(reference[0][:-1]):
        logits.append(decode_one(rt.model, token, len(ids) + i))
    assert torch.equal(torch.stack(logits), reference[1])
