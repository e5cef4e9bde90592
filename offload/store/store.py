"""The expert store: disk -> pinned host RAM -> device slots, behind the model's one expert seam.

Where an expert's bytes come from and go, for one use of expert (layer, e):

    device slot hit?  -> compute on the device slot (after waiting on that slot's copy event only)
    host slot hit?    -> copy host slot -> a device slot on the copy stream (or compute on the CPU, when the
                         measured CPU cost beats the copy and the device's compute: --cpu-experts; with
                         --cpu-experts all, every expert is computed on the CPU from its host slot, as
                         llama.cpp's --n-cpu-moe does, and the device holds no expert slot)
    neither           -> the reader thread preads the expert from the safetensors shards into a host slot,
                         then as above (only when the host tier is smaller than the model: when every expert
                         fits, `fill_host` reads them all at load and the disk is never touched again)

Each expert is one contiguous blob (quant.blob.BlobLayout) in every tier, so one copy moves it. Device
slots are one tensor [slots, blob bytes] allocated once; their typed views are made once; nothing is
allocated per token on the copy path. Router-ahead prefetch (`prepare`) applies the routers of the next K
layers to the current hidden state and starts copies of the experts they would pick.

Without CUDA the "device" tier is a CPU slot pool with the same budgets and code, minus streams and events.

Dimension legend: T tokens, D hidden, F expert ffn, N blob bytes.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from quant import cpu_kernels, pinned, sparse
from quant.errors import UserError
from quant.units import parse_bytes

from ..formats.checkpoint import Checkpoint
from .cache import DEFAULT_POLICY, LRU, POLICIES, Cycle, SlotTable, make_policy
from .partial import PartialSlots, staging_nbytes, staging_streams
from .prior import describe
from .memory import device_bytes_free, device_capability, human, plan_memory
from .reader import Reader
from .sources import open_source
from .timing import median_time

Key = tuple[int, int]  # (layer, expert)
# --cpu-experts: auto (misses on the CPU when measured cheaper), never, always (every decode miss on the CPU),
# all (every expert kept in host RAM and computed there, prefill too; the device holds no expert slot).
CPU_EXPERTS = ("auto", "never", "always", "all")


class Stats:
    """Counters of one generation. hits + misses = expert uses; bytes are what actually moved."""

    # prefetch_wasted: prefetched copies evicted before any use (their bytes moved for nothing: bytes_prefetch_wasted,
    # for a sparse expert its base and the chunks guessed with it); prefetch_skipped: router-ahead guesses not
    # copied because their measured accuracy would not repay them. Sparse experts: chunk_guesses, chunks a neuron
    # predictor had a guess copy bring (their bytes are in bytes_h2d); of those, chunk_guess_hits were needed by a
    # use before their slot was filled again, chunk_guess_wasted were not (the rest are still unused in a slot).
    FIELDS = ("expert_hits", "expert_misses", "prefetch_issued", "prefetch_hits", "prefetch_wasted",
              "prefetch_skipped", "cpu_expert_calls", "bytes_h2d", "bytes_disk", "bytes_prefetch_wasted",
              "chunk_guesses", "chunk_guess_hits", "chunk_guess_wasted")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        for f in self.FIELDS:
            setattr(self, f, 0)
        self.per_layer: dict[int, dict[str, int]] = {}

    def layer(self, layer: int, field: str, n: int = 1) -> None:
        row = self.per_layer.setdefault(layer, {"hits": 0, "misses": 0, "prefetch_hits": 0, "bytes_h2d": 0})
        row[field] += n

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}


def check_options(prefetch: int = 0, cpu_experts: str = "auto", policy: str = DEFAULT_POLICY) -> None:
    """The expert store's options, checked where they are given (a table folder has no experts to apply
    them to, but a wrong value is still wrong)."""
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise UserError(f"--prefetch must be 0 (off) or a number of layers ahead, got {prefetch!r}")
    if cpu_experts not in CPU_EXPERTS:
        raise UserError(f"--cpu-experts must be {', '.join(CPU_EXPERTS[:-1])} or {CPU_EXPERTS[-1]}, "
                        f"got {cpu_experts!r}")
    if policy not in POLICIES:
        raise UserError(f"--cache-policy must be one of {', '.join(POLICIES)}, got {policy!r}")


class ExpertStore:
    """Owns every expert of the model across the three tiers; the MoE blocks call `prepare` and `run`."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, vram=None, ram=None,
                 prefetch: int = 0, cpu_experts: str = "auto", policy: str = DEFAULT_POLICY, context: int = 2048,
                 dense_bytes: int = 0, pin: bool | None = None, per_layer_cache: bool = False,
                 progress: Callable[[int, int], None] | None = None, routing_prior=None):
        cfg = ckpt.config
        self.cfg, self.ckpt, self.device, self.dtype = cfg, ckpt, device, dtype
        check_options(prefetch, cpu_experts, policy)
        self.prefetch, self.cpu_experts, self.policy = prefetch, cpu_experts, policy
        # offload/store/prior.py: where the context policy starts from (set below to None where nothing reads it)
        self.routing_prior = routing_prior
        self.source = open_source(ckpt, dtype)
        self.layout = self.source.layout
        self.cuda = device.type == "cuda"
        self.stats_ = Stats()
        # offload.profile.Profiler while `moe-offload profile` runs; None otherwise, so timing costs one `if`.
        self.profiler = None
        self.measured: dict | None = None  # the costs `--cpu-experts auto` compared on a GPU
        self.peak_before = 0  # CUDA: the allocator's peak before its counters were last reset by the profiler
        self.routers: dict = {}  # layer -> the model's router, for router-ahead prefetch (`attach`)
        self.model_tensors: Callable[[], list[torch.Tensor]] | None = None  # the model's device tensors (`attach`)

        free = device_bytes_free(device) if self.cuda else None
        vram = parse_bytes(vram, "--vram")
        # Here, not in the plan: `inspect` and the benchmarks plan budgets larger than what is free right now.
        if free is not None and vram is not None and vram > free:
            raise UserError(f"--vram {human(vram)} is more than {device} has free ({human(free)}); "
                            f"lower it, or leave it out to use what is free")
        self.plan = plan_memory(
            cfg, dtype.itemsize, str(device), vram=vram, ram=parse_bytes(ram, "--ram"),
            context=context, blob_bytes=self.layout.nbytes, dense=dense_bytes, dense_format=self.source.dense_format,
            free_device_bytes=free, capability=device_capability(device) if self.cuda else None,
            quantized_experts=self.layout.kind != "dense", device_experts=cpu_experts != "all",
            staging_bytes=staging_nbytes(self.layout, self.cuda))
        N = self.layout.nbytes

        # Host tier: pinned when a GPU will DMA from it (pageable memory would force a staging copy), to the
        # byte (quant.pinned: torch's pin_memory=True would round it up to a power of two).
        # Page-locking tens of GB takes seconds: `progress` counts it a host slot at a time, then `fill_host`
        # goes on counting from there, an expert at a time, to one total.
        pin = self.cuda if pin is None else pin
        fill = self.plan.experts_total if self.plan.host_slots >= self.plan.experts_total else 0
        report = (lambda done, total: progress(done, total + fill)) if progress and pin else None
        self.host = pinned.empty((self.plan.host_slots, N), pin, device=device, progress=report)
        self.progress_base = self.plan.host_slots if report else 0  # units `progress` has counted before fill_host
        self.held_at_close: int | None = None
        header = torch.frombuffer(bytearray(self.layout.header()), dtype=torch.uint8)
        self.host[:, : self.layout.header_nbytes] = header
        self.host_views = [self.layout.views(self.host[s]) for s in range(self.plan.host_slots)]
        # The host tier is touched out of the layer order (the reader thread, CPU experts): a policy that
        # runs on the layer cycle's clock has none there, so it keeps LRU.
        host_policy = LRU if issubclass(POLICIES[policy], Cycle) else POLICIES[policy]
        self.host_table = SlotTable(self.plan.host_slots, host_policy())
        self.host_reads: dict[Key, Future] = {}      # disk reads in flight, by key
        self.host_busy: dict[int, object] = {}       # host slot -> event of an H2D copy still reading it
        self.reader = Reader()
        self.lock = threading.Lock()                 # guards host_table/host_reads against the reader thread

        # Device tier: one allocation for every slot, made here and never again.
        self.dev = torch.empty((self.plan.device_slots, N), dtype=torch.uint8, device=device)
        self.dev_views = [self.layout.views(self.dev[s]) for s in range(self.plan.device_slots)]
        layers = cfg.num_hidden_layers if per_layer_cache else 0
        if layers and self.plan.device_slots < layers * cfg.num_experts_per_tok:
            raise UserError(f"a per-layer cache needs at least {layers * cfg.num_experts_per_tok} device slots")
        # A device tier with a slot for every expert never evicts: there a policy would only keep count (the
        # context policy's counting is the costly part), and every policy keeps the same experts.
        evicts = self.plan.device_slots < self.plan.experts_total
        chosen = (lambda: make_policy(policy, routing_prior)) if evicts else LRU
        if not evicts:
            self.routing_prior = None
        self.dev_table = SlotTable(self.plan.device_slots, chosen(), per_layer=layers)
        self.prefetched: set[Key] = set()            # on the device by prefetch, not used since
        # Router-ahead accuracy, measured on every guess (copied or not) when its layer runs:
        # (layer, layers ahead, rank among the router's picks) -> [guesses used, guesses]. A guess is copied
        # only when this says it pays for itself (`_worth_copying`).
        self.guess_outcomes: dict[tuple[int, int, int], list[int]] = {}
        self.pending_guesses: dict[int, list[tuple[int, int, int]]] = {}  # layer -> (ahead, rank, expert)
        # What copying guesses costs beyond the copies prefetch-off would make, counted exactly: `shadow` is the
        # device table prefetch-off would have (same slots, same policy), fed the same layer steps; its misses
        # are the copies that run would make, `copies` this one's (demand and guesses). Routing never depends
        # on the cache, so the two runs ask for the same experts.
        self.shadow = (SlotTable(self.plan.device_slots, chosen(), per_layer=layers)
                       if self.prefetch and self.plan.device_slots else None)
        self.shadow_misses = self.copies = 0
        # Guess copies queued or running on a GPU, oldest first: (key, event recorded after the copy). At most
        # one layer's worth at a time, so a miss of the next layer shares the copy engine with few of them.
        self.guess_copies: list[tuple[Key, object]] = []
        self.max_guess_copies = cfg.num_experts_per_tok
        self.plan_of: dict[Key, tuple[str, int | None]] = {}  # this layer's plan, from prepare() to run()
        if self.cuda:
            # Copies run on their own stream; a slot's `ready` event marks its copy done (compute waits on
            # it, not on the whole stream), its `free` event marks the last kernel that read it (the copy
            # stream waits on it before overwriting the slot).
            # Two copy streams: copies of experts a layer needs now, and router-ahead guesses, so that a copy
            # needed now is never queued behind a guess in one stream's order (guesses further ahead with
            # --prefetch 2, wrong ones). Priorities order kernels, not copies: a GPU with one copy engine
            # still finishes a guess copy it has started first, which is why guesses in flight are few
            # (`max_guess_copies`) and never evict what the next layers hold (`_prefetch`).
            self.copy_stream = torch.cuda.Stream(device, priority=-1)
            self.guess_stream = torch.cuda.Stream(device, priority=0)
            for stream in self.copy_streams():
                # The slot pool was allocated on the compute stream: copies start after the work queued
                # there (the block may have just been freed by it), and the pool's memory is not handed out
                # again, when the store is freed, before a copy stream's writes into it are done.
                stream.wait_stream(torch.cuda.current_stream(device))
                self.dev.record_stream(stream)
            self.ready = [torch.cuda.Event() for _ in range(self.plan.device_slots)]
            self.free = [torch.cuda.Event() for _ in range(self.plan.device_slots)]
        # Sparse experts: a device slot holds the base and only the neuron chunks used or guessed
        # (offload/store/partial.py), staged per copy stream; a folder's neuron predictors say which chunks a
        # guess copy brings (offload/store/predictor.py). Results never depend on them: only bytes and timing do.
        self.partial, self.predictor = None, None
        if self.layout.kind == sparse.KIND:
            streams = self.copy_streams() if self.cuda else [None]
            self.partial = PartialSlots(self.layout, self.dev, self.host, self.cuda, device,
                                        streams[:staging_streams(self.cuda, self.plan.device_slots)])
            self.predictor = getattr(self.source, "predictor", None)
        self.cpu_wins = self._decide_cpu_experts()

    # ---- the model's seam ---------------------------------------------------------------------------

    def expected_shapes(self) -> dict:
        return self.source.expected_shapes()

    def attach(self, routers: dict, device_tensors: Callable[[], list[torch.Tensor]] | None = None) -> None:
        """The model's routers by layer (`Transformer.routers()`), which prefetch applies ahead of time, and
        what lists the model's own tensors on the device (dense weights, KV cache, rotary tables), which
        `held_device_bytes` measures."""
        self.routers = routers
        self.model_tensors = device_tensors

    def copy_streams(self) -> list:
        """The CUDA streams copies run on: experts needed now, router-ahead guesses."""
        return [self.copy_stream, self.guess_stream]

    def layers_ahead(self, layer: int) -> list[int]:
        """The next `prefetch` layers after `layer` that have routed experts (dense layers have nothing to fetch)."""
        return [nxt for nxt in sorted(self.routers) if nxt > layer][:self.prefetch]

    def guess(self, layer: int, h: torch.Tensor) -> list[torch.Tensor]:
        """Router-ahead guesses for one decode step: the expert ids [T, k] each of the next layers' routers
        picks for layer `layer`'s hidden state h [T, D], left on the device; the MoE block brings them to the
        host with its own routing (one transfer) and hands them to `prepare`. None for a prefill."""
        if not self.prefetch or h.shape[0] != 1:
            return []
        return [self.routers[nxt].choose(h) for nxt in self.layers_ahead(layer)]

    def prepare(self, layer: int, h: torch.Tensor, experts: list[int], guesses: list[list[int]] | None = None,
                tokens: list[int] | None = None) -> None:
        """Plan this layer's experts (hit / copy / CPU), start every move, then prefetch the next K layers
        (`guesses`: `guess(layer, h)` brought to the host; a caller without them costs a transfer more;
        `tokens`: the step's token ids, which the cache policy learns routing from, when known)."""
        needed = [(layer, e) for e in experts]
        decode = h.shape[0] == 1
        self.plan_of: dict[Key, tuple[str, int | None]] = {}
        self.dev_table.visit(layer, experts, tokens)  # the cache policy's clock: the layer cycle
        if self.shadow is not None:  # the prefetch-off table: count the copies that run would make
            self.shadow_misses += len(needed) - self.shadow.demand_step(layer, experts, tokens)
        self._score_guesses(layer, experts)
        if self.profiler:
            self.profiler.route(layer, experts, decode, tokens)
        for key in needed:
            slot = self.dev_table.lookup(key)
            if slot is not None:
                self.plan_of[key] = ("hit", slot)
                continue
            # Every disk read first, so they overlap with the copies below; only into slots that hold no other
            # expert of this layer (a prefill may need more experts than the host tier has slots: reading
            # one over another not yet copied would read that one twice). The rest are read as they are copied.
            self._start_host(key, protected=set(needed))
            # A decode miss runs on the CPU once the CPU is chosen (measured cheaper, or `always`; prefill
            # reuses each expert across many tokens, so copying wins there), whether or not its read has
            # finished: a CPU expert rounds differently from the GPU one, and timing must not change the
            # tokens (for the same reason prefetch then only reads ahead into RAM).
            if (decode and self.cpu_wins) or self.cpu_experts == "all":
                self.plan_of[key] = ("cpu", None)
        for key in needed:
            if key not in self.plan_of:
                # None when every slot holds an expert of this layer: then it is loaded when it runs. Slots a
                # guess is still being copied into are kept: overwriting one would wait for that guess.
                protected = set(needed) | {k for k, _ in self._guesses_in_flight()}
                self.plan_of[key] = ("miss", self._to_device(key, protected=protected, prefetch=False))
        if self.prefetch and decode:
            if guesses is None:
                guesses = [g.flatten().tolist() for g in self.guess(layer, h)]
            self._prefetch(layer, guesses, set(needed), h)

    # A guess is copied only when its measured accuracy p (`guess_outcomes`) says it pays for itself: a right
    # guess moves the bytes its miss would have moved anyway, a wrong one moves them for nothing, so p must
    # beat even odds; and the copies this run has made beyond what prefetch-off's would have (`shadow`: wrong
    # guesses, and the misses their evictions and a right guess's early ones caused) may add at most
    # WASTE_SHARE to them. Until a kind of guess has been scored GUESS_WARMUP times it is not copied. A guess
    # for a layer further ahead holds its slot longer before its use (the policy keeps it until its layer has
    # run), so it must be surer: FARTHER more per layer (measured, bench/bench_cache.py: with 0, --prefetch 2
    # got fewer hits than 1 on both trained models; with 0.2, as many).
    MIN_GUESS_ACCURACY = 0.5
    WASTE_SHARE = 0.05
    GUESS_WARMUP = 8
    FARTHER = 0.2

    def _score_guesses(self, layer: int, experts: list[int]) -> None:
        """Layer `layer` runs `experts`: score the guesses earlier layers made for it (copied or not)."""
        used = set(experts)
        pending = self.pending_guesses.pop(layer, ())
        for ahead, rank, e in pending:
            tally = self.guess_outcomes.setdefault((layer, ahead, rank), [0, 0])
            tally[0] += e in used
            tally[1] += 1

    def guess_accuracy(self, layer: int, ahead: int, rank: int) -> float | None:
        """The measured share of guesses of this kind, made for an expert not on the device, that their layer
        used, counted as if two more had been wrong (a few lucky guesses do not look sure: at large budgets the
        guesses a copy would be for are few); None before GUESS_WARMUP."""
        used, total = self.guess_outcomes.get((layer, ahead, rank), (0, 0))
        return used / (total + 2) if total and total >= self.GUESS_WARMUP else None

    def _worth_copying(self, key: Key, p: float | None, ahead: int, keep: set) -> bool:
        """Copy a guess used with probability p, `ahead` layers from now? Not unless it beats even odds and
        the run's copies stay within WASTE_SHARE over prefetch-off's (counting this one's expected waste); and
        never into a slot whose expert the policy expects to be used sooner than the guess (ahead / p layer
        steps, its expected wait)."""
        if p is None or p <= self.MIN_GUESS_ACCURACY + self.FARTHER * (ahead - 1):
            return False
        if self.copies - self.shadow_misses + 1 - p > self.WASTE_SHARE * (self.shadow_misses + 1):
            return False
        next_use = getattr(self.dev_table.policy, "next_use", None)
        if next_use is None or self.dev_table.free:
            return True
        victim = self.dev_table.policy.victim(self.dev_table.slot_of, keep)
        return victim is not None and next_use(victim) > ahead / p

    def _prefetch(self, layer: int, guesses: list[list[int]], needed: set, h: torch.Tensor | None = None) -> None:
        """Router-ahead: the residual stream changes slowly, so layer L+j's router applied to layer L's
        hidden state picks most of the experts L+j will use (`guesses`, one list per layer ahead, the
        router's best pick first). Guesses already in host RAM are copied to the device now, a few at a
        time, when they pay for themselves (`_worth_copying`); the others are read from disk into RAM (never
        blocking this thread). A guess never evicts this layer's experts, another guess, or an expert of
        the next layer (the likeliest to be used next: a guess two layers ahead, or a wrong one, must not
        push them out). A sparse guess of the next layer also brings the chunks its neuron predictor guesses
        from h [1, D], this layer's input (`_guess_chunks`)."""
        ahead = self.layers_ahead(layer)
        if not ahead:
            return
        h_host = None
        keep = set(needed) | {k for k, _ in self._guesses_in_flight()} | self.dev_table.keys_of_layer(ahead[0])
        for distance, (nxt, guess) in enumerate(zip(ahead, guesses), start=1):
            for rank, e in enumerate(dict.fromkeys(guess)):
                key = (nxt, e)
                if key in self.dev_table:
                    keep.add(key)
                    continue
                # Scored when nxt runs; only the guesses a copy would be for: with most experts resident, the few
                # that are not are the rarely used ones, and a guess of one is right far less often.
                self.pending_guesses.setdefault(nxt, []).append((distance, rank, e))
                with self.lock:
                    in_ram = key in self.host_table and key not in self.host_reads
                # With the CPU chosen for misses, a guess is only read into RAM: copying it only when its read
                # happened to finish would make timing decide which experts run on the GPU (another rounding).
                if not in_ram or self.cpu_wins:
                    self._start_host(key, protected=needed, ahead=nxt - layer)
                elif len(self._guesses_in_flight()) < self.max_guess_copies:
                    if not self._worth_copying(key, self.guess_accuracy(nxt, distance, rank), distance, keep):
                        self.stats_.prefetch_skipped += 1
                        continue
                    chunks = None
                    if self.predictor is not None and h is not None and self.predictor.predicts(nxt, layer):
                        if h_host is None:  # [1, D]; h is ready (the block brought its routing over after it)
                            h_host = h.detach().to("cpu", torch.float32)
                        chunks = self.predictor.predict(nxt, e, h_host)
                    if self._to_device(key, protected=keep, prefetch=True, chunks=chunks) is not None:
                        self.stats_.prefetch_issued += 1
                        keep.add(key)

    def _guesses_in_flight(self) -> list[tuple[Key, object]]:
        """Guess copies still queued or running (GPU only; on a CPU a copy is done when it returns)."""
        self.guess_copies = [(k, done) for k, done in self.guess_copies if not done.query()]
        return self.guess_copies

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert (layer, expert) on x [t, D], as planned by `prepare`."""
        key = (layer, expert)
        kind, slot = self._count_use(key)
        if kind == "cpu":
            return self._run_on_cpu(key, x)
        if slot is None:  # a miss `prepare` found no slot for (every slot held this layer's experts)
            slot = self._to_device(key, protected=set(), prefetch=False)
        self.prefetched.discard(key)
        prof = self.profiler
        waited = prof.mark() if prof else None  # marks on the compute stream: the wait below is the copy stall
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        started = prof.mark() if prof else None
        if self.partial is not None:
            y = self._run_sparse(key, slot, x)
        else:
            y = self.source.compute(self.dev_views[slot], x)
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        if prof:
            prof.expert(key, kind, waited, started, prof.mark())
        return y

    def _count_use(self, key: Key) -> tuple[str, int | None]:
        """Take `key`'s plan from `prepare` and count its use (hit or miss, a prefetch's hit)."""
        kind, slot = self.plan_of.pop(key)
        s = self.stats_
        if kind == "hit":
            s.expert_hits += 1
            s.layer(key[0], "hits")
            if key in self.prefetched:
                s.prefetch_hits += 1
                s.layer(key[0], "prefetch_hits")
        else:
            s.expert_misses += 1
            s.layer(key[0], "misses")
        return kind, slot

    def run_group(self, layer: int, experts: list[int], x: torch.Tensor) -> list[torch.Tensor]:
        """`run` of several experts of one layer on one token's x [1, D] (a decode step), with the same results.

        The experts computed on the CPU from slots that nothing can take before they run (a CPU slot pool whose
        slots `prepare` planned; a host tier that holds every expert, under --cpu-experts) go to the source's
        `compute_group` together: the CPU kernels run a layer's quantized experts in one call, where a
        fine-grained model's 8 small experts a token would pay 8 thread regions. The others go through `run`."""
        group = getattr(self.source, "compute_group", None)
        plans = [self.plan_of.get((layer, e)) for e in experts]
        host_all = self.plan.host_slots >= self.plan.experts_total
        together = [i for i, (kind, slot) in enumerate(plans)
                    if (kind == "cpu" and host_all) or (kind != "cpu" and slot is not None and not self.cuda)]
        # A device miss without a slot is loaded when it runs, over a slot it picks then: nothing runs together.
        if (group is None or self.partial is not None or len(together) < 2
                or any(kind != "cpu" and slot is None for kind, slot in plans)):
            return [self.run(layer, e, x) for e in experts]
        out: list = [None] * len(experts)
        for i, e in enumerate(experts):
            if i not in together:
                out[i] = self.run(layer, e, x)
        x_cpu = x.to("cpu")  # [1, D]; on a GPU this waits for the compute stream to produce x
        views, xs = [], []
        for i in together:
            key = (layer, experts[i])
            kind, slot = self._count_use(key)
            if kind == "cpu":
                views.append(self._cpu_views(key))
            else:
                self.prefetched.discard(key)
                views.append(self.dev_views[slot])
            xs.append(x_cpu)
        prof = self.profiler
        t0 = time.perf_counter() if prof else 0.0
        ys = group(views, xs)
        if prof:  # one call for the group: each expert is charged an equal share of its time
            share = (time.perf_counter() - t0) / len(together)
            for j, i in enumerate(together):
                key, start = (layer, experts[i]), t0 + j * share
                if plans[i][0] == "cpu":
                    prof.cpu_expert(key, start, start + share)
                else:
                    prof.expert(key, plans[i][0], start, start, start + share)
        for i, y in zip(together, ys):
            out[i] = y.to(x.device, non_blocking=True)
        return out

    def _run_sparse(self, key: Key, slot: int, x: torch.Tensor) -> torch.Tensor:
        """A sparse expert on its device slot: the up projection (in the slot's base) decides the active neurons
        (their count crosses to the host: a sync), the chunks the slot lacks are copied in, then the expert runs
        over exactly those neurons. What it computes depends on x and the threshold only, never on what the slot
        held before."""
        v, mask, idx = sparse.active_neurons(self.layout, self.dev_views[slot], x)
        needed = idx.cpu()
        missing = self.partial.missing(slot, needed)
        self.stats_.chunk_guess_hits += self.partial.use(slot, needed)
        if missing.numel():
            host = self._host_slot(key)
            if self.cuda:
                compute = torch.cuda.current_stream(self.device)
                with torch.cuda.stream(self.copy_stream):
                    # The copy stream's order after the up projection just queued (the slot's rows it places are
                    # read by no kernel: they were not held), and compute after the placement.
                    self.copy_stream.wait_stream(compute)
                    moved = self.partial.copy_chunks(slot, host, missing)
                    self.ready[slot].record(self.copy_stream)
                compute.wait_event(self.ready[slot])
            else:
                moved = self.partial.copy_chunks(slot, host, missing)
            self.stats_.bytes_h2d += moved
            self.stats_.layer(key[0], "bytes_h2d", moved)
        return sparse.forward_active(self.layout, x, v, mask, idx, self.partial.rows(slot))

    # ---- tiers ---------------------------------------------------------------------------------------

    def _start_host(self, key: Key, protected: set = frozenset(), ahead: int = 0) -> Future | None:
        """Make sure `key` is in (or on its way to) a host slot; a future of its host slot.

        A caller that passes `protected` gets None when no host slot may be evicted now; otherwise it waits
        for an in-flight read or copy to release a slot (they always finish). `ahead`: how many layers
        ahead the expert is wanted (0: now), the disk read's priority."""
        while True:
            with self.lock:
                fut = self.host_reads.get(key)
                if fut is not None:
                    self.reader.promote(fut, ahead)
                    return fut
                slot = self.host_table.lookup(key)
                if slot is not None:
                    fut = Future()
                    fut.set_result(slot)
                    return fut
                # Never evict a slot a read is filling or an H2D copy is still reading.
                for s, event in list(self.host_busy.items()):
                    if event.query():
                        del self.host_busy[s]
                busy = set(self.host_reads) | {self.host_table.key_of[s] for s in self.host_busy} | set(protected)
                got = self.host_table.assign(key, busy)
                if got is not None:
                    fut = self.reader.submit(ahead, self._read, key, got[0])
                    self.host_reads[key] = fut
                    return fut
                if protected:
                    return None
                waiting = list(self.host_reads.values())
                oldest = next(iter(self.host_busy.items()), None)
            # Every host slot is busy: wait for the first of them to come free, then try again: the oldest
            # copy queued (likely the first done); a disk read only when no copy is queued.
            t0 = time.perf_counter() if self.profiler else 0.0
            if oldest is not None:
                slot, event = oldest
                event.synchronize()
                with self.lock:
                    if self.host_busy.get(slot) is event:
                        del self.host_busy[slot]
            elif waiting:
                waiting[0].exception()  # wait for it; its own user re-raises any error
            if self.profiler:  # every host slot was busy: time spent waiting for the host tier
                self.profiler.host_wait(key, t0, time.perf_counter())

    def _read(self, key: Key, slot: int) -> int:
        """Reader thread: wait until no copy reads this host slot any more, then pread the expert into it."""
        with self.lock:
            event = self.host_busy.pop(slot, None)
        if event is not None:
            event.synchronize()
        prof = self.profiler
        t0 = time.perf_counter() if prof else 0.0
        try:
            n = self.source.read_into(key, self.host[slot])
        except BaseException:
            with self.lock:
                self.host_reads.pop(key, None)
                self.host_table.remove(key)
            raise
        with self.lock:
            self.stats_.bytes_disk += n
            self.host_reads.pop(key, None)
        if prof:
            prof.disk(key, t0, time.perf_counter(), n)
        return slot

    def _host_slot(self, key: Key) -> int:
        """The host slot holding `key`, waiting for its disk read if one is under way (profiled as a wait;
        an expert already in RAM costs no wait)."""
        try:
            read = self._start_host(key)
            if read.done() or not self.profiler:
                return read.result()
            t0 = time.perf_counter()
            slot = read.result()
            self.profiler.host_wait(key, t0, time.perf_counter())
            return slot
        except UserError:
            raise
        except OSError as exc:
            raise UserError(f"reading expert {key}: {exc}") from None

    def _to_device(self, key: Key, protected: set, prefetch: bool, chunks: torch.Tensor | None = None) -> int | None:
        """Copy `key` from its host slot into a device slot (evicting LRU); None if nothing may be evicted.
        `chunks`: a sparse guess's predicted neurons [n], copied with its base."""
        got = self.dev_table.assign(key, protected, use=not prefetch)
        if got is None:
            return None
        slot, evicted = got
        if evicted in self.prefetched:  # copied by a guess and never used: those bytes moved for nothing
            self.prefetched.discard(evicted)
            self.stats_.prefetch_wasted += 1
            self.stats_.bytes_prefetch_wasted += (self.layout.nbytes if self.partial is None
                                                  else self.partial.held_bytes(slot))
        self.copies += 1
        if evicted in self.plan_of:
            # Fewer slots than this layer's experts: the evicted one (hit or copied) is loaded again when it runs.
            self.plan_of[evicted] = ("miss", None)
        try:
            self._fill_slot(key, slot, prefetch, chunks)
        except BaseException:
            # A failed read or copy (or Ctrl-C while waiting for one): the slot does not hold `key`, and a
            # runtime used again afterwards must not take it for a hit.
            self.dev_table.remove(key)
            raise
        return slot

    def _fill_slot(self, key: Key, slot: int, prefetch: bool, chunks: torch.Tensor | None = None) -> None:
        """Copy `key` from its host slot (read from disk first if it is not there) into device slot `slot`, with
        a sparse guess's predicted `chunks` (`_guess_chunks`)."""
        host = self._host_slot(key)
        prof = self.profiler
        stream = (self.guess_stream if prefetch else self.copy_stream) if self.cuda else None
        if self.cuda:
            with torch.cuda.stream(stream):
                # The slot may still be read by a kernel queued on the compute stream, or written by its
                # previous copy on the other copy stream: wait for both.
                stream.wait_event(self.free[slot])
                stream.wait_event(self.ready[slot])
                started = prof.mark(stream) if prof else None
                moved = self._h2d(slot, host) + self._guess_chunks(slot, host, chunks)
                self.ready[slot].record(stream)
                done = torch.cuda.Event()
                done.record(stream)
                with self.lock:
                    self.host_busy.pop(host, None)  # re-inserted last: the dict stays in the order queued
                    self.host_busy[host] = done
            if prefetch:
                self.guess_copies.append((key, done))
        else:
            started = prof.mark() if prof else None
            moved = self._h2d(slot, host) + self._guess_chunks(slot, host, chunks)
        if prof:
            prof.copy(key, prefetch, started, prof.mark(stream), moved)
        self.stats_.bytes_h2d += moved
        self.stats_.layer(key[0], "bytes_h2d", moved)
        if prefetch:
            self.prefetched.add(key)

    def scratch_slot(self) -> torch.Tensor:
        """A device slot a caller may overwrite now (the bandwidth probe), inside the budget: a free slot, else
        that of the expert the cache policy would evict next, which leaves the slot table (its next use copies
        it again). On a GPU, once no queued kernel reads the slot and no copy writes it."""
        if self.dev_table.free:
            slot = self.dev_table.free[-1]
        else:
            victim = self.dev_table.policy.victim(self.dev_table.slot_of, set())
            slot = self.dev_table.remove(victim)
            self.prefetched.discard(victim)
        if self.cuda:
            self.free[slot].synchronize()
            self.ready[slot].synchronize()
        return self.dev[slot]

    def _h2d(self, slot: int, host: int) -> int:
        """Queue the copy of host slot `host` into device slot `slot` on the current (copy) stream; the bytes
        it moves: the whole blob, or a sparse expert's base (its chunks follow when it runs: `_run_sparse`)."""
        if self.partial is not None:
            moved, wasted = self.partial.fill(slot, host)
            self.stats_.chunk_guess_wasted += wasted
            return moved
        self.dev[slot].copy_(self.host[host], non_blocking=True)
        return self.layout.nbytes

    def _guess_chunks(self, slot: int, host: int, chunks: torch.Tensor | None) -> int:
        """After a guess's base (same stream): the chunks its neuron predictor guessed, if the stream's staging
        is free (a guess never makes the host wait); the bytes moved. The expert's uses copy what is still
        missing, so a wrong guess costs bytes only."""
        if chunks is None or not chunks.numel() or not self.partial.staging_free():
            return 0
        moved = self.partial.guess_chunks(slot, host, chunks)
        self.stats_.chunk_guesses += moved // self.partial.C
        return moved

    def fill_host(self, progress: Callable[[int, int], None] | None = None) -> None:
        """When every expert fits in the host tier, read them all into it now, so no token waits on the disk.

        For `load`, before the first generation: nothing else touches the host tier yet (an expert is in
        `host_table` here before its bytes are). A few preads run at once (they release the GIL; a fast NVMe
        drive needs more than one in flight). `progress(done, total)` before the first expert and after each.
        With a smaller host tier this does nothing: that tier is an LRU the reader thread fills on demand, and
        filling it now would only read experts that get evicted."""
        cfg, plan = self.cfg, self.plan
        if plan.host_slots < plan.experts_total:
            return
        keys = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_local_experts)]
        todo: list[tuple[Key, int]] = []
        pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="expert-fill")
        try:
            for key in keys:
                if key not in self.host_table:
                    todo.append((key, self.host_table.assign(key)[0]))  # a free slot: nothing is evicted
            base = self.progress_base  # host slots page-locked: counted first, by the same progress
            if progress:
                progress(base, base + len(todo))
            reads = [pool.submit(self.source.read_into, key, self.host[slot]) for key, slot in todo]
            for done, read in enumerate(reads, 1):
                self.stats_.bytes_disk += read.result()
                if progress:
                    progress(base + done, base + len(todo))
        except BaseException:
            # Ctrl-C or a bad shard: drop what is still queued (an exiting process would otherwise wait for
            # every read), and forget every expert of this fill, so none is used half-read.
            pool.shutdown(wait=True, cancel_futures=True)
            for key, _ in todo:
                self.host_table.remove(key)
            raise
        pool.shutdown()

    # ---- computing a miss on the CPU -----------------------------------------------------------------

    def _decide_cpu_experts(self) -> bool:
        """Measure, on this machine, a batch-1 expert on the CPU (with the hidden state's round trip to it and
        back, as `_run_on_cpu` makes it) against one blob's host->device copy and its compute on the device.
        Every expert of a model has one blob kind (its layout), so the one measurement decides every layer."""
        if self.cpu_experts != "auto" or not self.cuda:
            return self.cpu_experts in ("always", "all")
        scratch = pinned.empty(self.layout.nbytes, pin=True, device=self.device).zero_()
        views = self.layout.views(scratch)
        x = torch.zeros(1, self.cfg.hidden_size, dtype=self.dtype, device=self.device)

        def on_cpu():
            return self.source.compute(views, x.to("cpu")).to(self.device, non_blocking=True)

        def copy():
            return self.dev[0].copy_(scratch, non_blocking=True)

        def on_device():
            return self.source.compute(self.dev_views[0], x)

        sync = lambda: torch.cuda.synchronize(self.device)  # noqa: E731
        self.measured = {"blob_kind": f"{self.layout.kind} {self.layout.bits}-bit", "cpu_kernels": cpu_kernels.path(),
                         "cpu_expert_s": median_time(on_cpu, sync), "h2d_blob_s": median_time(copy, sync),
                         "device_expert_s": median_time(on_device, sync)}
        return self.measured["cpu_expert_s"] < self.measured["h2d_blob_s"] + self.measured["device_expert_s"]

    def _cpu_views(self, key: Key) -> dict[str, torch.Tensor]:
        """The host slot views of `key` (read from disk first if need be) for a computation on the CPU, counted."""
        host = self._host_slot(key)
        with self.lock:  # the reader thread changes the host table (a failed read removes its expert)
            self.host_table.lookup(key)
        self.stats_.cpu_expert_calls += 1
        return self.host_views[host]

    def _run_on_cpu(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        views = self._cpu_views(key)
        x_cpu = x.to("cpu")  # [t, D]; on a GPU this waits for the compute stream to produce x
        t0 = time.perf_counter() if self.profiler else 0.0
        y = self.source.compute(views, x_cpu)
        if self.profiler:
            self.profiler.cpu_expert(key, t0, time.perf_counter())
        return y.to(x.device, non_blocking=True)

    # ---- accounting ------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        with self.lock:
            reading = list(self.host_reads.values())
        for read in reading:  # a prefetch read of the last run still in flight would count in the next one
            read.exception()
        with self.lock:  # the reader thread adds to the counters
            self.stats_.reset()
        # The experts an earlier run prefetched and never used stay in their slots, but a hit on one now is
        # not this run's prefetch hit: it issued none of them.
        self.prefetched.clear()
        self.shadow_misses = self.copies = 0
        self.peak_before = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def reset_device_peak(self) -> None:
        """Reset the allocator's peak counters (the profiler samples a peak per token) without losing the
        peak of the run so far, which `peak_device_bytes` keeps reporting."""
        self.peak_before = self.peak_device_bytes()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_device_bytes(self) -> int:
        if self.cuda:
            return max(self.peak_before, int(torch.cuda.max_memory_allocated(self.device)))
        # CPU slot pool: no allocator counts the "device" tier, so measure what it holds (held at close, after).
        return self.held_device_bytes() if self.held_at_close is None else self.held_at_close

    def held_device_bytes(self) -> int:
        """Bytes the device tier holds now, measured from the tensors (each storage counted once, whole):
        the expert slot pool and the model's tensors given to `attach`. Not the plan's numbers: a pool or a
        cache allocated larger than planned shows here."""
        tensors = [self.dev] if self.dev is not None else []
        if self.partial is not None:
            tensors += self.partial.device_tensors()
        if self.model_tensors is not None:
            tensors += self.model_tensors()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
        return sum(storages.values())

    def stats(self) -> dict:
        out = self.stats_.as_dict()
        out.update({
            "peak_vram_bytes": self.peak_device_bytes(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device": str(self.device),
            "vram_budget": self.plan.vram_budget, "ram_budget": self.plan.ram_budget,
            "device_slots": self.plan.device_slots, "host_slots": self.plan.host_slots,
            "blob_bytes": self.layout.nbytes, "prefetch": self.prefetch, "cache_policy": self.policy,
            "routing_prior": describe(self.routing_prior),
            "cpu_experts": (self.cpu_experts if not self.cuda or self.cpu_experts == "all"
                            else ("on" if self.cpu_wins else "off")),
            "cpu_expert_costs": self.measured,  # what decided --cpu-experts auto on a GPU; None otherwise
        })
        return out

    def close(self) -> None:
        """Stop the reader and give back both tiers: the pinned host tier (unlocked now, not whenever the
        runtime object is collected: a notebook keeps it referenced) and the device's slot pool, so a second
        load in this process finds that memory. The store cannot run experts afterwards; `stats` still works."""
        self.reader.shutdown()
        if self.dev is None:
            return
        if self.cuda:
            # Copies nobody waited for (wrong router-ahead guesses) may still read the host tier and write the
            # pool: both are freed only after they end.
            for stream in self.copy_streams():
                stream.synchronize()
        self.held_at_close = self.held_device_bytes()
        host, self.host, self.host_views = self.host, None, []
        pinned.release(host)
        del host
        self.dev, self.dev_views, self.partial = None, [], None
        self.routers, self.model_tensors = {}, None  # the model's tensors: the runtime drops the model
        if self.cuda:
            self.ready, self.free = [], []
            torch.cuda.empty_cache()  # the pool's blocks back to the driver, not only to torch's cache
