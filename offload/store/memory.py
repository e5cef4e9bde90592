"""Byte budgets: the plan of what lives where under --vram/--ram (sizes are parsed by quant.units)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import psutil
import torch

import quant
from quant.errors import UserError
from quant.expert import GPU_ROW_BLOCK_ELEMS, ROW_BLOCK_ELEMS

from ..models import family
from ..models.config import ModelConfig


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def default_ram_budget() -> int:
    """What the machine can spare for pinned experts: 80% of the memory available now."""
    return int(psutil.virtual_memory().available * 0.8)


# Default --vram on a GPU: what is free less this much. Memory the caching allocator never sees arrives after
# the plan: cuBLAS/cuBLASLt handles and their lazily loaded kernels, Triton's modules, the CPU-expert probe.
# bench/gpu_session.sh measures what they took (`headroom` in its record); this keeps room for it.
DEFAULT_HEADROOM = 1 << 30


@dataclass(frozen=True)
class MemoryPlan:
    """How the device budget splits: dense weights + KV cache + workspace margin + staging + expert slots."""

    device: str
    vram_budget: int
    ram_budget: int
    dense_bytes: int
    kv_bytes: int
    margin_bytes: int
    blob_bytes: int
    experts_total: int
    experts_per_token: int
    device_slots: int
    host_slots: int
    workspace: Workspace | None = None  # what margin_bytes is made of (None: a margin given as a number)
    staging_bytes: int = 0  # sparse experts: the partial copies' staging rows (offload/store/partial.py)

    @property
    def expert_pool_bytes(self) -> int:
        return self.device_slots * self.blob_bytes

    def as_dict(self) -> dict:
        """The plan's numbers (the workspace's parts are `workspace.as_dict()`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "workspace"}
        return out | {"expert_pool_bytes": self.expert_pool_bytes}

    @classmethod
    def make(cls, device: str, vram: int | None, ram: int | None, dense_bytes: int, kv_bytes: int,
             margin_bytes: int, blob_bytes: int, experts_total: int, experts_per_token: int,
             free_device_bytes: int | None, workspace: Workspace | None = None,
             device_experts: bool = True, staging_bytes: int = 0) -> "MemoryPlan":
        """Check the budgets and size both expert pools; raise UserError with the numbers when they cannot work.
        `device_experts` False (`--cpu-experts all`): no expert slot on the device, every expert is computed
        from the host tier. `staging_bytes`: what partial copies stage on the device besides the slots."""
        fixed = dense_bytes + kv_bytes + margin_bytes + staging_bytes
        slot = blob_bytes if device_experts else 0
        default = vram is None
        if default:
            # Default: what the device has free less a headroom (CUDA), or room for every expert (CPU slot pool).
            vram = (max(0, free_device_bytes - DEFAULT_HEADROOM) if free_device_bytes is not None
                    else fixed + experts_total * slot)
        if vram < fixed + slot:
            what = (f"what the GPU has free ({human(free_device_bytes)}) less {human(DEFAULT_HEADROOM)} of headroom "
                    f"for CUDA's libraries ({human(vram)})" if default else f"--vram {human(vram)}")
            staging = f" + staging ({human(staging_bytes)})" if staging_bytes else ""
            raise UserError(f"{what} cannot hold the dense part ({human(dense_bytes)}) + KV cache "
                            f"({human(kv_bytes)}) + workspace ({human(margin_bytes)}){staging} + one expert "
                            f"({human(slot)}): need at least {human(fixed + slot)}")
        device_slots = min(experts_total, (vram - fixed) // blob_bytes) if device_experts else 0
        if ram is None:
            ram = default_ram_budget()
        if ram <= 0:
            raise UserError(f"--ram must be positive, got {ram}")
        least = max(2, experts_per_token)
        if ram < least * blob_bytes:
            raise UserError(f"--ram {human(ram)} cannot hold {least} experts ({human(least * blob_bytes)}), the least "
                            f"the host tier needs to stream one layer's experts from disk")
        host_slots = min(experts_total, ram // blob_bytes)
        return cls(device, vram, ram, dense_bytes, kv_bytes, margin_bytes, blob_bytes, experts_total,
                   experts_per_token, int(device_slots), int(host_slots), workspace, staging_bytes)


def device_bytes_free(device) -> int:
    """What a CUDA device can still give this process: free on the device, plus what torch's caching
    allocator holds reserved but unused (a runtime loaded before this one and dropped leaves its blocks)."""
    import torch

    reserved_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + reserved_unused


def device_capability(device) -> tuple[int, int] | None:
    """A CUDA device's compute capability (it decides the attention kernel), or None where torch cannot
    read one (a CPU build told there is a GPU): the plan then assumes sm_80 or newer."""
    try:
        return torch.cuda.get_device_capability(device)
    except (AssertionError, RuntimeError):
        return None


# ---- what the device tier must hold besides experts (one definition, used by the store and by `inspect`) ----

def dense_bytes(cfg: ModelConfig, itemsize: int, dense_format: tuple[int, int] | None = None) -> int:
    """Every weight that is not a routed expert (embeddings, attention, norms, routers, lm_head, a family's
    shared parts), at `itemsize`; with a dense format (bits, group size), the attention projections as
    quantized bytes."""
    fam = family(cfg)
    quantized = fam.attention_shapes(cfg) if dense_format else {}
    total = 0
    for name, shape in fam.dense_shapes(cfg).items():
        if name in quantized:
            total += quant.quantized_nbytes(shape, *dense_format)
        else:
            n = 1
            for s in shape:
                n *= s
            total += n * itemsize
    return total


def kv_bytes(cfg: ModelConfig, context: int, itemsize: int) -> int:
    """What the context sizes on the device: the preallocated KV cache, keys and values [L, K, S, Hd], and
    the rotary tables cos, sin [S, Hd]; a family with its own cache (DeepSeek's latent one) says its own."""
    # A MoLE table folder's config (lut.MoLEConfig) names no family: it has the plain cache.
    own = getattr(family(cfg), "kv_bytes", None) if hasattr(cfg, "model_type") else None
    if own is not None:
        return own(cfg, context, itemsize)
    S = min(context, cfg.max_position_embeddings)
    return 2 * (cfg.num_hidden_layers * cfg.num_key_value_heads + 1) * S * cfg.head_dim * itemsize


def check_table_vram(store, context: int) -> None:
    """A MoLE table folder's --vram must hold what its device always holds: the dense part (every tensor of
    the folder), the KV cache, and a decode step's table rows [L, N, D]. A prompt's rows (up to the table
    store's `step_bytes` of records per step) come on top during prefill."""
    if store.vram_budget is None:
        return
    cfg, size = store.cfg, store.dtype.itemsize
    parts = {"the dense part": store.dense_bytes(), "KV cache": kv_bytes(cfg, context, size),
             "one token's table rows": cfg.num_hidden_layers * cfg.num_local_experts * cfg.hidden_size * size}
    need = sum(parts.values())
    if store.vram_budget < need:
        raise UserError(f"--vram {human(store.vram_budget)} cannot hold "
                        + " + ".join(f"{k} ({human(v)})" for k, v in parts.items()) + f": need at least {human(need)}")


# ---- the workspace: what a prefill builds on the device besides weights, KV cache and expert slots -------

# Library workspaces that torch's matmuls take from the caching allocator, once per (handle, stream) running
# them (the compute stream only: copies use no library): cuBLAS's is 32 MiB on sm_90 and 8 MiB before it
# (CUBLAS_WORKSPACE_CONFIG's default), cuBLASLt's up to as much again. Counted at the larger sizes.
CUBLAS_WORKSPACE = 32 << 20
CUBLASLT_WORKSPACE = 32 << 20
# The caching allocator rounds blocks up (large ones to 2 MiB segments) and cannot always reuse a freed
# block for a larger request: slack for that fragmentation.
ALLOCATOR_SLACK = 256 << 20
# The most that one prefill forward's quadratic attention temporaries (the math kernel's float32 scores
# [H, C, S], masks [C, S]) may take: a longer prompt is prefilled in chunks of fewer tokens.
QUADRATIC_BYTES = 1 << 30
# torch's CPU attention kernel: per thread, a block of scores against every key (measured: ~320 bytes per
# key, whatever the head dim) and partial outputs; half types also convert keys and values to float32.
CPU_ATTENTION_PER_KEY = 512
CPU_ATTENTION_PER_THREAD = 64 << 10
# Dequantizing a block of weights (quant.quantize.dequantize_parts) holds float32 codes, codes - zero and
# the scaled result at once: 12 bytes per weight, plus the block at the compute dtype.
DEQUANT_BYTES_PER_WEIGHT = 12
HALF = (torch.float16, torch.bfloat16)


def beyond_window(cfg: ModelConfig, tokens: int) -> bool:
    """Whether a prompt of `tokens` reaches past the sliding window of a layer that has one (attention then
    passes a mask)."""
    return any((w := cfg.window(i)) is not None and tokens > w for i in range(cfg.num_hidden_layers))


def attention_backend(cfg: ModelConfig, dtype: torch.dtype, device_type: str, context: int,
                      capability: tuple[int, int] | None = None) -> str:
    """The kernel torch's scaled_dot_product_attention runs a prefill's attention with, called as
    offload/models/attention.py calls it (grouped query heads, a causal prompt or an explicit mask):

      cpu        torch's CPU kernel (any dtype, masks and grouped heads): blocked, no [T, S] scores
      flash      fp16/bf16 on sm_80 or newer, head dim a multiple of 8 up to 256, and no mask (a prompt
                 within the sliding window): memory linear in the tokens
      efficient  where every query head has its own key head (torch runs grouped heads on flash and math
                 only), on any GPU torch supports: linear, plus a [T, S] bias when masked
      math       everything else (float32 with grouped heads, GPUs before sm_80, masks): float32 scores
                 [H, T, S] and keys and values expanded per head, which chunked prefill keeps bounded

    `capability`: the GPU's (major, minor); None plans for sm_80 or newer (planning without the GPU)."""
    if device_type == "cpu":
        return "cpu"
    masked = beyond_window(cfg, context)
    if (dtype in HALF and (capability or (8, 0)) >= (8, 0) and cfg.head_dim % 8 == 0 and cfg.head_dim <= 256
            and not masked):
        return "flash"
    if cfg.num_attention_heads == cfg.num_key_value_heads and cfg.head_dim % 8 == 0:
        return "efficient"
    return "math"


@dataclass(frozen=True)
class AttentionCost:
    """What an attention kernel allocates for C queries against S keys, in bytes:
    pair * C * S + per_query * C + per_key * S + fixed."""

    kernel: str
    pair: int = 0
    per_query: int = 0
    per_key: int = 0
    fixed: int = 0

    def bytes(self, C: int, S: int) -> int:
        return self.pair * C * S + self.per_query * C + self.per_key * S + self.fixed


def attention_cost(kernel: str, cfg: ModelConfig, dtype: torch.dtype, masked: bool, window: bool,
                   threads: int) -> AttentionCost:
    """The temporaries of `kernel` for a prefill's attention, as offload/models/attention.py calls it: `masked`
    when it passes a mask (a chunk after the first, a prompt after a reused prefix, a prompt longer than the
    sliding window), `window` when that mask is a sliding window's.

    Every kernel: its output [H, C, Hd] and float32 row statistics [H, C]. The mask attention.py builds is
    bool [C, S], with an int64 distance and a bool comparison on the way for a window; the kernel takes it
    as an additive bias (float32 on the CPU, the dtype for `efficient`, float32 for `math`). The math kernel
    adds, per head, float32 scores, their softmax, its all-masked-rows check (bool) and its result, and
    expands keys and values per head ([H, S, Hd] in the dtype, then float32) beside a scaled copy of the
    keys; the CPU kernel, per thread, a block of scores against every key, and for half types keys and
    values in float32."""
    s, H, K, Hd = dtype.itemsize, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Wq, Wkv = H * Hd, K * Hd
    mask = (1 + (9 if window else 0)) if masked else 0
    bias = {"cpu": 4, "efficient": s, "math": 4, "flash": 0}[kernel] if masked else 0
    cost = AttentionCost(kernel, pair=mask + bias, per_query=Wq * s + 4 * H)
    if kernel == "math":
        expand = (2 * s if H != K else 0) + (8 if s < 4 else 0) + 4
        cost = replace(cost, pair=cost.pair + 13 * H, per_query=cost.per_query + Wq * (12 + s), per_key=Wq * expand)
    if kernel == "cpu":
        cost = replace(cost, per_key=threads * CPU_ATTENTION_PER_KEY + (2 * Wkv * 4 if s < 4 else 0),
                       fixed=threads * CPU_ATTENTION_PER_THREAD)
    return cost


@dataclass(frozen=True)
class Workspace:
    """What a prefill needs on the device besides weights, KV cache and expert slots, in bytes, for the
    attention kernel it was planned for, and how a prompt is cut so that it stays within it.

    Parts (each an upper bound for its phase; their sum is what the plan reserves):
      activations  hidden states, q/k/v and their rotary temporaries, the MoE block's gathered tokens and its
                   expert intermediates [T, F] (all of one forward's tokens routed to one expert, at worst)
      attention    the attention kernel's own temporaries (`AttentionCost`)
      dequant      a block of quantized expert weights, or a whole quantized attention projection
                   (`--dense-bits`), dequantized for a prefill
      library      cuBLAS/cuBLASLt workspaces and the caching allocator's slack (CUDA only)

    `backend` runs a whole prompt at position 0; `masked` runs any forward given a mask (on a GPU with grouped
    query heads: math, which flash hands masks to), sized by `prefill_chunk` into what the plan reserved."""

    backend: str
    chunk_tokens: int     # the most tokens one prefill forward at position 0 takes
    activations: int
    attention: int
    dequant: int
    library: int
    per_token: int        # activations per token of a forward (`activations` = per_token * chunk_tokens + fixed)
    own: AttentionCost
    masked: AttentionCost

    @property
    def total(self) -> int:
        return self.activations + self.attention + self.dequant + self.library

    def prefill_chunk(self, tokens: int, start: int = 0) -> int:
        """Tokens per forward for a prefill of `tokens` after `start` positions already in the KV cache (0, or
        a reused prefix): all of them in one pass where the planned kernel takes them so; else as many as keep
        a chunk's activations and its masked attention against all start + tokens keys within the bytes the
        plan reserved for both (at least 1)."""
        if start == 0 and not self.own.pair and tokens <= self.chunk_tokens:
            return tokens
        keys = start + tokens
        fixed = self.activations - self.per_token * self.chunk_tokens
        room = self.activations + self.attention - fixed - self.masked.bytes(0, keys)
        return max(1, min(tokens, room // (self.per_token + self.masked.bytes(1, keys) - self.masked.bytes(0, keys))))

    def as_dict(self) -> dict:
        return asdict(self) | {"total": self.total}


def plan_workspace(cfg: ModelConfig, context: int, dtype: torch.dtype, device_type: str,
                   capability: tuple[int, int] | None = None, quantized_experts: bool = False,
                   dense_format: tuple[int, int] | None = None, threads: int | None = None,
                   quadratic_bytes: int | None = None) -> Workspace:
    """The Workspace of a prefill of up to `context` tokens (see `Workspace` for its parts, `attention_backend`
    and `attention_cost` for the kernels). Dimension legend: C tokens of one forward, S keys, D hidden, F
    widest ffn, H, K query and key/value heads, Hd head dim, E experts, k experts per token.
    `quadratic_bytes`: what a chunk's quadratic attention may take (default QUADRATIC_BYTES)."""
    quadratic_bytes = quadratic_bytes or QUADRATIC_BYTES
    threads = threads or torch.get_num_threads()
    s = dtype.itemsize
    S = min(context, cfg.max_position_embeddings)
    D, H, K, Hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    Wq, Wkv = H * Hd, K * Hd
    F = max(cfg.intermediate_size, cfg.shared_intermediate_size, cfg.dense_intermediate_size)
    backend = attention_backend(cfg, dtype, device_type, S, capability)
    window = beyond_window(cfg, S)
    own = attention_cost(backend, cfg, dtype, masked=window, window=window, threads=threads)
    if device_type == "cpu" or backend != "flash":
        masked_kernel = backend
    else:  # flash takes no mask: torch hands a masked call to the next kernel that takes the heads as they are
        masked_kernel = "math" if H != K else "efficient"
    masked = attention_cost(masked_kernel, cfg, dtype, masked=True, window=window, threads=threads)

    # Where attention grows with tokens x keys, prompts run in chunks: the largest at P = sqrt(B / pair).
    if own.pair:
        C = max(1, min(S, math.isqrt(quadratic_bytes // own.pair)))
        # A prompt's chunks keep their [C, P] part within the budget; a 1-token chunk against every key, at worst.
        attention = max(quadratic_bytes, own.pair * S) + own.bytes(C, S) - own.pair * C * S
    else:
        C, attention = S, own.bytes(S, S)

    # Live activations of one forward, the larger of its two phases, plus the residual stream and its update.
    qk_norm = (Wq + Wkv) * 8 if cfg.qk_norm else 0  # float32 statistics of q and k, per token
    attn_phase = s * (2 * D + 7 * Wq + 2 * Wkv) + qk_norm
    # An expert's [T, F] intermediates: gate, up and their product; a quantized expert's row blocks of the
    # product and their concatenation come to no more (quant.expert.expert_forward).
    experts = 3 * F * s
    moe_phase = s * 6 * D + experts + E * (s + 8) + 24 * k
    norm_phase = D * (s + 8)
    per_token = 2 * D * s + max(attn_phase, moe_phase, norm_phase)
    activations = per_token * C + cfg.vocab_size * 8  # the last position's logits, float32

    # Dequantized blocks: the expert forward's row blocks (quant.expert), or a whole attention projection.
    cuda = device_type == "cuda"
    dequant = 0
    if quantized_experts:
        block = min(GPU_ROW_BLOCK_ELEMS if cuda else ROW_BLOCK_ELEMS, D * cfg.intermediate_size)
        dequant = (DEQUANT_BYTES_PER_WEIGHT + s) * block
    if dense_format:
        dequant = max(dequant, (DEQUANT_BYTES_PER_WEIGHT + s) * max(Wq, Wkv) * D)
    library = CUBLAS_WORKSPACE + CUBLASLT_WORKSPACE + ALLOCATOR_SLACK if cuda else 0
    return Workspace(backend, C, activations, attention, dequant, library, per_token, own, masked)


def plan_memory(cfg: ModelConfig, itemsize: int, device: str, vram: int | None, ram: int | None, context: int,
                blob_bytes: int, free_device_bytes: int | None = None, dense: int = 0,
                dense_format: tuple[int, int] | None = None, capability: tuple[int, int] | None = None,
                quantized_experts: bool = False, device_experts: bool = True, staging_bytes: int = 0) -> MemoryPlan:
    """The MemoryPlan of a model under these budgets, from its config alone (no weights are read).
    `capability`: the CUDA device's (major, minor), which decides the attention kernel (None: sm_80+);
    `device_experts` and `staging_bytes` as in `MemoryPlan.make`."""
    dtype = {4: torch.float32, 2: torch.float16}[itemsize]  # the attention kernel depends on the width only
    ws = plan_workspace(cfg, context, dtype, torch.device(device).type, capability, quantized_experts, dense_format)
    return MemoryPlan.make(
        device=device, vram=vram, ram=ram, dense_bytes=dense or dense_bytes(cfg, itemsize, dense_format),
        kv_bytes=kv_bytes(cfg, context, itemsize), margin_bytes=ws.total,
        blob_bytes=blob_bytes, experts_total=cfg.experts_total,
        experts_per_token=cfg.num_experts_per_tok, free_device_bytes=free_device_bytes, workspace=ws,
        device_experts=device_experts, staging_bytes=staging_bytes if device_experts else 0)


def expected_traffic(plan: MemoryPlan, layers: int, hit_rate: float, bandwidth: float) -> dict:
    """Bytes an average decode step moves when a fraction `hit_rate` of expert uses hit the device slots.

    Misses copy one blob host->device each. A miss that is not in the host tier is first read from disk;
    with accesses spread evenly over the experts, that is a fraction 1 - host_slots / experts_total of them
    (0 when every expert fits in RAM)."""
    uses = layers * plan.experts_per_token
    misses = uses * (1 - hit_rate)
    h2d = misses * plan.blob_bytes
    disk = h2d * (1 - plan.host_slots / plan.experts_total)
    return {"hit_rate": hit_rate, "expert_uses_per_token": uses, "misses_per_token": misses,
            "bytes_h2d_per_token": int(h2d), "bytes_disk_per_token": int(disk), "bandwidth_bytes_per_s": bandwidth,
            "transfer_bound_s_per_token": h2d / bandwidth}
