"""`moe-offload profile` and the memory plan of `inspect`: the artifacts exist and are valid, profiling does
not change tokens, the reported peak device memory stays within --vram, and the numbers add up.

The demo model when its folder is there, else the tiny random checkpoint of conftest."""

from __future__ import annotations

import json

import pytest
import torch

import offload
from conftest import run_cli
from offload.demo import DEMO_DIR
from offload.inspect import memory_plan
from offload.profile import ARTIFACTS, TIME_PARTS, profile, profile_runtime
from offload.profile.profiler import copy_time_hidden, exposed_time, merged, overlap_length, total_length
from offload.profile.run import write
from offload.profile.schema import load_schema, schema_errors

PROMPT = "The for statement is used to iterate"
NEW = 8
PNGS = ("latency.png", "layers.png", "breakdown.png", "memory.png")


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):
    return DEMO_DIR if (DEMO_DIR / "config.json").exists() else tiny_checkpoint


@pytest.fixture(scope="module")
def budgets(folder):
    """A --vram with room for 3 experts (so experts are copied and evicted) and a --ram of 4 experts (so
    some are read from disk again): every track of the trace has work."""
    plan = offload.load(folder, device="cpu", context=256).store.plan
    return {"vram": plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + 3 * plan.blob_bytes,
            "ram": 4 * plan.blob_bytes}


@pytest.fixture(scope="module")
def profiled(folder, budgets, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    result = profile(folder, PROMPT, out, max_new_tokens=NEW, device="cpu", context=256, prefetch=1, **budgets)
    return result, out


def test_profile_writes_json_trace_and_plots(profiled):
    _, out = profiled
    import matplotlib.image

    assert (out / "profile.json").stat().st_size > 0
    for name in PNGS:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
        assert image.std() > 0, f"{name} is blank"
    trace = json.loads((out / "trace.json").read_text())
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert {"host thread", "disk reader thread", "CPU experts"} <= names
    used = {e["cat"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {"host", "compute", "copy", "disk"} <= used
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            assert e["ts"] >= 0 and e["dur"] >= 0


def test_profile_json_validates_against_the_schema(profiled):
    _, out = profiled
    record = json.loads((out / "profile.json").read_text())
    schema = load_schema()
    assert schema_errors(record, schema) == []
    # The check is not vacuous: it catches a missing field, a wrong type and an unknown value.
    broken = json.loads(json.dumps(record))
    del broken["totals"]["tokens_per_s"]
    broken["per_token"][0]["latency_s"] = "slow"
    broken["verdict"]["bound"] = "luck"
    errors = schema_errors(broken, schema)
    assert any("tokens_per_s" in e for e in errors)
    assert any("latency_s" in e for e in errors)
    assert any("luck" in e for e in errors)


def test_profiling_does_not_change_tokens(profiled, folder, budgets):
    result, _ = profiled
    rt = offload.load(folder, device="cpu", context=256, prefetch=1, **budgets)
    assert rt.store.profiler is None
    plain = list(rt.generate_ids(rt.encode(PROMPT), NEW))
    assert result.record["tokens"] == plain
    assert result.record["totals"]["new_tokens"] == len(plain)


def test_profiling_a_warm_runtime_counts_only_its_own_run(folder, budgets):
    rt = offload.load(folder, device="cpu", context=256, prefetch=1, **budgets)
    ids = rt.encode(PROMPT)
    list(rt.generate_ids(ids, NEW))  # a warm cache and nonzero counters before profiling
    record = profile_runtime(rt, ids, 4).record
    assert schema_errors(record, load_schema()) == []
    assert sum(r["expert_hits"] + r["expert_misses"] for r in record["per_token"]) \
        == record["totals"]["expert_hits"] + record["totals"]["expert_misses"]
    assert rt.store.profiler is None


def test_peak_device_memory_stays_within_the_vram_budget(profiled, budgets):
    t = profiled[0].record["totals"]
    assert 0 < t["peak_vram_allocated_bytes"] <= t["peak_vram_reserved_bytes"] <= budgets["vram"]
    assert profiled[0].record["settings"]["vram_budget"] == budgets["vram"]
    assert t["pinned_bytes"] == 0 and t["host_tier_bytes"] <= budgets["ram"]  # CPU: nothing is pinned


def test_profile_numbers_add_up(profiled):
    record = profiled[0].record
    t, rows, layers = record["totals"], record["per_token"], record["per_layer"]
    for key, per_layer_key in (("expert_hits", "hits"), ("expert_misses", "misses"),
                               ("prefetch_hits", "prefetch_hits"), ("bytes_h2d", "bytes_h2d"),
                               ("bytes_disk", "bytes_disk"), ("prefetch_issued", "prefetch_issued")):
        assert sum(r[per_layer_key] for r in layers) == t[key], key
    for key in ("expert_hits", "expert_misses", "prefetch_hits", "bytes_h2d", "bytes_disk", "cpu_expert_calls"):
        assert sum(r[key] for r in rows) == t[key], key
    assert t["expert_misses"] > 0 and t["bytes_disk"] > 0  # the budgets made the store copy and read
    for r in rows:
        assert sum(r[p] for p in TIME_PARTS) == pytest.approx(r["latency_s"], rel=1e-6, abs=1e-9) \
            or r["dense_s"] == 0  # dense is the remainder (clamped at 0 when waits overlap)
    assert t["decode_tokens"] == len(rows) - 1
    assert t["tokens_per_s"] == pytest.approx(t["decode_tokens"] / sum(r["latency_s"] for r in rows[1:]))
    assert t["time_to_first_token_s"] == rows[0]["latency_s"]
    assert record["verdict"]["bound"] in ("transfer", "compute", "CPU experts", "disk")
    assert sum(record["verdict"]["shares"].values()) == pytest.approx(1)


def test_memory_plan_is_the_stores_plan_and_adds_up(folder, budgets):
    rt = offload.load(folder, device="cpu", context=256, **budgets)
    plan = memory_plan(folder, device="cpu", context=256, hit_rate=0.25, bandwidth=10e9, **budgets)
    assert plan["plan"] == rt.store.plan.as_dict()  # the same arithmetic, without loading weights
    d, h, k, blob = plan["device_tier"], plan["host_tier"], plan["disk"], plan["blob_bytes"]
    assert d["dense_bytes"] + d["kv_bytes"] + d["workspace_bytes"] + d["expert_pool_bytes"] + d["unused_bytes"] \
        == d["budget"] == budgets["vram"]
    assert d["expert_slots"] == 3 and d["expert_pool_bytes"] == 3 * blob and 0 <= d["unused_bytes"] < blob
    assert h["expert_slots"] == 4 and h["bytes"] <= h["budget"]
    assert h["expert_slots"] + k["experts_streamed"] == plan["experts_total"]
    cfg = rt.config
    uses = cfg.num_hidden_layers * cfg.num_experts_per_tok
    per_token = plan["per_token"]
    assert per_token["bytes_h2d_per_token"] == int(0.75 * uses * blob)
    assert per_token["transfer_bound_s_per_token"] == pytest.approx(0.75 * uses * blob / 10e9)
    assert per_token["bytes_disk_per_token"] <= per_token["bytes_h2d_per_token"]
    everything = memory_plan(folder, device="cpu", context=256, vram=10**10, ram=10**10)
    assert everything["all_experts_on_device"] and everything["per_token"]["bytes_h2d_per_token"] == 0


def test_cli_profile_and_inspect_plan(folder, budgets, tmp_path):
    result = run_cli("profile", folder, "Exceptions are", "-n", "3", "--device", "cpu", "--context", "256",
                     "--vram", str(budgets["vram"]), "--out", tmp_path / "p")
    assert result.returncode == 0, result.stderr
    assert "verdict:" in result.stdout and "bound" in result.stdout
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"profile.json", "trace.json", *PNGS}
    result = run_cli("inspect", folder, "--vram", str(budgets["vram"]), "--ram", str(budgets["ram"]), "--device", "cpu",
                     "--context", "256", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["memory_plan"]["device_tier"]["expert_slots"] == 3
    result = run_cli("inspect", folder, "--vram", "1KiB")
    assert result.returncode == 2 and "--vram" in result.stderr and "Traceback" not in result.stderr


def test_interval_union_and_intersection():
    spans = [(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (3.0, 4.0), (7.0, 7.0)]
    assert merged(spans) == [(0.0, 4.0), (5.0, 6.0), (7.0, 7.0)]  # touching intervals join
    assert total_length(merged(spans)) == 5.0
    stalls = merged([(1.5, 2.5), (3.5, 5.5), (6.5, 8.0)])
    assert overlap_length(merged(spans), stalls) == pytest.approx(1.0 + 0.5 + 0.5)
    assert overlap_length(stalls, merged(spans)) == overlap_length(merged(spans), stalls)
    assert overlap_length([], stalls) == 0.0


def test_copy_time_is_hidden_only_inside_compute_and_outside_stalls():
    """A copy stream busy 0-4 and 5-9 (the two middle copies overlap), the token's compute span 1-8, the
    compute stream stalled on a copy 2-3 and the host blocked 6-6.5: hidden is 1-2, 3-4, 5-6 and 6.5-8."""
    exposed = exposed_time([(2, 3), (6, 6.5)], [(1, 8)])
    busy, hidden = copy_time_hidden([(0, 2), (1, 4), (5, 9)], exposed)
    assert busy == 8 and hidden == pytest.approx(1 + 1 + 1 + 1.5)
    assert copy_time_hidden([], exposed) == (0, 0)
    assert copy_time_hidden([(2, 3)], exposed_time([(1, 8)], [(1, 8)])) == (1, 0)  # all of it while compute stalled
    # A guess still copying when its token ended (8-9.5) hides under the next token's compute (9-12), as it
    # would unprofiled: only the gap between the tokens (8-9) is exposed.
    assert copy_time_hidden([(8, 9.5)], exposed_time([], [(1, 8), (9, 12)])) == (1.5, pytest.approx(0.5))


def test_copies_on_cpu_are_never_counted_as_hidden_under_compute(profiled):
    """On CPU the compute thread makes the copies itself: copy_s is their union, and none of it is hidden."""
    result = profiled[0]
    rows, t = result.record["per_token"], result.record["totals"]
    copies = [(s.t0, s.t1) for s in result.spans if s.track == "copy"]
    assert sum(r["copy_s"] for r in rows) == pytest.approx(total_length(merged(copies)))
    assert all(r["copy_hidden_s"] == 0 for r in rows)
    assert t["decode_copy_s"] == pytest.approx(sum(r["copy_s"] for r in rows[1:]))
    assert t["decode_copy_s"] > 0 and t["decode_copy_hidden_fraction"] == 0  # the budgets made decode copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_profile_tokens_budget_and_copy_stream(tiny_checkpoint, tmp_path):
    import gc

    plan = offload.load(tiny_checkpoint, device="cuda", dtype="float16", context=256).store.plan
    vram = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + 4 * plan.blob_bytes
    gc.collect()
    torch.cuda.empty_cache()  # the allocator counts the whole process: drop earlier runtimes' blocks
    options = dict(device="cuda", dtype="float16", context=256, vram=vram, prefetch=1, cpu_experts="never")
    result = profile(tiny_checkpoint, PROMPT, tmp_path, max_new_tokens=NEW, **options)
    rt = offload.load(tiny_checkpoint, **options)
    assert result.record["tokens"] == list(rt.generate_ids(rt.encode(PROMPT), NEW))
    t = result.record["totals"]
    assert t["peak_vram_reserved_bytes"] <= vram  # torch's allocator counters, this run only
    assert t["pinned_bytes"] > 0
    copies = [s for s in result.spans if s.track == "copy"]
    assert copies and all(s.t1 >= s.t0 for s in copies)
    assert all(0 <= r["copy_hidden_s"] <= r["copy_s"] for r in result.record["per_token"])
    # The profiler samples the allocator's peak per token; the runtime's own peak still covers the whole run
    # (prefill, the first token, is its largest step), not just the last token.
    again = profile_runtime(rt, rt.encode(PROMPT), NEW)
    assert rt.stats()["peak_vram_bytes"] >= again.record["totals"]["peak_vram_allocated_bytes"]


def with_eos(folder, tmp_path, nth: int):
    """A copy of `folder` whose end-of-sequence id is its `nth` greedy token after PROMPT."""
    import shutil

    rt = offload.load(folder, device="cpu", context=256)
    eos = list(rt.generate_ids(rt.encode(PROMPT), nth + 1))[nth]
    copy = tmp_path / "eos"
    shutil.copytree(folder, copy)
    for name in ("config.json", "generation_config.json"):
        if (copy / name).is_file():
            cfg = json.loads((copy / name).read_text())
            cfg["eos_token_id"] = eos
            (copy / name).write_text(json.dumps(cfg))
    return copy, eos


@pytest.mark.parametrize("nth", [0, 3])
def test_a_run_that_ends_at_end_of_sequence_is_profiled_whole(folder, budgets, tmp_path, nth):
    """The step that samples end-of-sequence ran a forward pass: it is a row (token null), so the rows add
    up to the totals; when it is the first step, the artifacts are still written."""
    copy, eos = with_eos(folder, tmp_path, nth)
    out = tmp_path / "p"
    result = profile(copy, PROMPT, out, max_new_tokens=NEW, device="cpu", context=256, prefetch=1, **budgets)
    record = json.loads((out / "profile.json").read_text())
    assert schema_errors(record, load_schema()) == []
    rows, t = record["per_token"], record["totals"]
    assert len(rows) == nth + 1 and rows[-1]["token"] is None and eos not in record["tokens"]
    assert len(record["tokens"]) == t["new_tokens"] == nth
    assert t["decode_tokens"] == max(0, nth - 1)  # tokens/s counts produced tokens, as Runtime.stats() does
    rt = offload.load(copy, device="cpu", context=256, prefetch=1, **budgets)
    assert record["tokens"] == list(rt.generate_ids(rt.encode(PROMPT), NEW))
    for key in ("expert_hits", "expert_misses", "bytes_h2d", "bytes_disk"):
        assert sum(r[key] for r in rows) == t[key], key
    assert t["expert_misses"] > 0 and t["bytes_disk"] > 0
    assert {p.name for p in out.iterdir()} == {"profile.json", "trace.json", *PNGS}
    assert ("prefill time" if nth == 0 else "decode time") in result.record["verdict"]["text"]


def test_a_warm_runtime_reports_only_the_prefetches_of_its_own_run():
    """Experts an earlier run prefetched and never used are not this run's prefetch hits."""
    plan = offload.load("demo", device="cpu", context=256).store.plan
    for slots, prefetch in ((12, 2), (16, 1), (16, 3), (20, 2)):
        vram = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + slots * plan.blob_bytes
        rt = offload.load("demo", device="cpu", context=256, prefetch=prefetch, vram=vram)
        for prompt in ("The for statement", "Exceptions are raised", "A class definition", "import sys"):
            list(rt.generate_ids(rt.encode(prompt), 16))
            record = profile_runtime(rt, rt.encode("The while statement"), 3).record
            assert schema_errors(record, load_schema()) == []
            for layer in record["per_layer"]:
                assert layer["prefetch_hits"] <= layer["prefetch_issued"], (slots, prefetch, prompt, layer)


def test_no_disk_wait_is_reported_when_every_expert_is_in_ram(folder, budgets):
    rt = offload.load(folder, device="cpu", context=256, prefetch=1, vram=budgets["vram"])  # RAM holds them all
    record = profile_runtime(rt, rt.encode(PROMPT), NEW).record
    t = record["totals"]
    assert t["bytes_disk"] == 0 and t["expert_misses"] > 0
    assert all(r["disk_wait_s"] == 0 for r in record["per_token"])


def test_a_bad_max_new_tokens_is_refused_before_loading_and_leaves_no_folder(tmp_path, monkeypatch):
    import offload.runtime

    monkeypatch.setattr(offload.runtime, "load", lambda *a, **k: pytest.fail("loaded before checking -n"))
    with pytest.raises(offload.UserError, match="--max-new-tokens must be at least 1"):
        profile("demo", PROMPT, tmp_path / "p", max_new_tokens=0)
    assert not (tmp_path / "p").exists()
    monkeypatch.undo()
    with pytest.raises(offload.UserError, match="no such model folder"):
        profile(tmp_path / "missing", PROMPT, tmp_path / "q")
    assert not (tmp_path / "q").exists()  # a failed run removes the empty folder it made


def test_a_profile_replaces_an_earlier_one_whole_or_not_at_all(profiled, tmp_path, monkeypatch):
    import offload.profile.plots

    result, _ = profiled
    out = tmp_path / "prof"
    write(result, out)
    (out / "notes.txt").write_text("mine")
    before = {name: (out / name).read_bytes() for name in ARTIFACTS}
    result.record["model"] = "a second run"  # so its profile.json and plot titles differ from the first

    def plots_then_fail(record, folder):
        (folder / "latency.png").write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C while the plots are written

    monkeypatch.setattr(offload.profile.plots, "write_plots", plots_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write(result, out)
    assert {name: (out / name).read_bytes() for name in ARTIFACTS} == before  # the first profile, whole
    assert sorted(p.name for p in out.iterdir()) == sorted([*ARTIFACTS, "notes.txt"])  # no work folder left
    monkeypatch.undo()
    write(result, out)
    assert json.loads((out / "profile.json").read_text())["model"] == "a second run"
    assert all((out / name).read_bytes() != before[name] for name in ("profile.json", "trace.json"))
    assert (out / "notes.txt").read_text() == "mine"


def test_a_file_of_an_artifacts_name_that_no_profile_wrote_is_left_alone(profiled, tmp_path, monkeypatch):
    import offload.runtime

    result, _ = profiled
    out = tmp_path / "results"
    out.mkdir()
    (out / "trace.json").write_text('{"my": "own trace"}')
    with pytest.raises(offload.UserError, match="trace.json, which is not from a moe-offload profile"):
        write(result, out)
    monkeypatch.setattr(offload.runtime, "load", lambda *a, **k: pytest.fail("ran before checking --out"))
    with pytest.raises(offload.UserError, match="not from a moe-offload profile"):
        profile("demo", PROMPT, out, max_new_tokens=2)
    assert sorted(p.name for p in out.iterdir()) == ["trace.json"]
    assert (out / "trace.json").read_text() == '{"my": "own trace"}'


def test_the_verdict_says_when_its_shares_are_of_overlapping_parts():
    """On a GPU a host-side wait (a CPU expert) can run while the device computes: the parts then add up to
    more than the wall time, and the verdict's shares must not read as shares of decode time."""
    from offload.profile import verdict

    parts = {"dense_s": 0.0, "expert_s": 1.0, "copy_wait_s": 0.5, "disk_wait_s": 0.0, "cpu_expert_s": 0.8}
    record = {"device": {"type": "cuda"}, "totals": {"decode_time_s": parts, "decode_s": 1.6, "decode_tokens": 4,
                                                      "time_per_token_vs_transfer_bound": None, "cpu_expert_calls": 3}}
    assert "which overlap: 1.44x the wall time" in verdict(record)["text"]
    record["totals"]["decode_s"] = 2.3
    assert "overlap" not in verdict(record)["text"]


def test_the_gpu_verdict_says_how_much_copying_hid_under_compute():
    from offload.profile import verdict

    parts = {"dense_s": 0.2, "expert_s": 0.3, "copy_wait_s": 0.5, "disk_wait_s": 0.0, "cpu_expert_s": 0.0}
    totals = {"decode_time_s": parts, "decode_s": 1.0, "decode_tokens": 4, "time_per_token_vs_transfer_bound": 2.0,
              "transfer_bound_s_per_token": 0.125, "h2d_bandwidth_bytes_per_s": 25e9, "cpu_expert_calls": 0,
              "decode_copy_hidden_fraction": 0.375}
    text = verdict({"device": {"type": "cuda"}, "totals": totals})["text"]
    assert text.startswith("transfer-bound (GPU)") and text.endswith(
        "2.0x the transfer bound (125.000 ms at 25.0 GB/s), with 38% of the copying hidden under compute")
    assert "hidden" not in verdict({"device": {"type": "cpu"}, "totals": totals})["text"]  # always 0 on CPU


def test_the_cpu_bandwidth_probe_copies_from_more_than_a_cache_holds(folder, budgets, monkeypatch):
    """One small blob copied again and again comes from the cache, far faster than the cold RAM a miss reads:
    on a CPU the probe takes its copies in turn from COLD_BYTES of distinct blobs."""
    from offload.profile import record as profile_module

    seen = []
    real = profile_module.copy_bandwidth
    monkeypatch.setattr(profile_module, "copy_bandwidth",
                        lambda src, dst, min_s=0.02: seen.append((src.numel(), dst.numel())) or real(src, dst, min_s))
    with offload.load(folder, device="cpu", context=128, **budgets) as rt:
        assert profile_module.measure_h2d(rt.store) > 0
    (source, blob), = seen
    assert blob == rt.store.layout.nbytes and source >= profile_module.COLD_BYTES - blob


def test_profile_records_the_routing_and_the_optimum_on_it(tiny_checkpoint):
    """profile.json's routing: the layer steps the store was asked for, and Belady's optimum on them at the
    run's slot count, which an exhaustive search over every eviction schedule confirms on this small trace."""
    from test_optimum import fewest_misses

    from offload.store.optimum import optimum, rate

    plan = offload.load(tiny_checkpoint, device="cpu", context=256).store.plan
    vram = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + 3 * plan.blob_bytes
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, prefetch=0, vram=vram)
    record = profile_runtime(rt, rt.encode(PROMPT), 4).record
    routing, layers = record["routing"], rt.config.num_hidden_layers
    trace = routing["trace"]
    assert [step[1] for step in trace] == list(range(layers)) * 4  # a prefill and 3 decode steps, layer by layer
    assert [step[0] for step in trace] == [0] * layers + [1] * 3 * layers
    assert routing["device_slots"] == 3 and routing["policy"] == "context"
    # The tokens the cache policy read: the prompt's last ones at the prefill (the contexts' history), then each
    # decode step's input, the token generated before it.
    fed = [rt.encode(PROMPT)[-3:]] + [[t] for t in record["tokens"][:3]]
    assert [step[3] for step in trace] == [ids for ids in fed for _ in range(layers)]
    assert optimum(trace, 3)["misses_all"] == fewest_misses(trace, 3)
    assert routing["optimum_hit_rate"] == rate(optimum(trace, 3))
    assert all(r <= routing["optimum_hit_rate"] for r in routing["replayed_hit_rates"].values())
    assert schema_errors(record, load_schema()) == []
