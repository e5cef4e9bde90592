"""`load()` and `Runtime`: a checkpoint, its tokenizer, the model forward and the expert store, wired together."""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Iterator

import psutil
import torch
from torch.torch_version import TorchVersion

from lut import TABLE_MODEL_TYPES
from lut.serve import TableStore
from quant.blob import is_count
from quant.errors import UserError

from .formats.checkpoint import Checkpoint
from .formats.converted import PARTIAL_MARKER, dense_format, read_info, read_quantized, stored_shapes
from .generate import CachedTokens, Sampling, generate_ids
from .models import EXPERT_MODEL_TYPES, family, open_checkpoint
from .models.linear import linear
from .models.transformer import Transformer
from .store import ExpertStore, check_options
from .store.cache import DEFAULT_POLICY, POLICIES, Context
from .store.memory import check_table_vram
from .store.prior import find as find_prior
from .store.sources import open_source
from .tokenizer import StreamDecoder, Tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The oldest torch the code runs on (pyproject.toml's floor says the same; tests/test_runtime.py checks both):
# attention passes enable_gqa to scaled_dot_product_attention, new in torch 2.5.
TORCH_FLOOR = "2.5"


def check_torch() -> None:
    """An older torch fails deep in the first forward (a TypeError from SDPA): refuse it by name instead."""
    if TorchVersion(torch.__version__) < TORCH_FLOOR:  # compared as versions: "2.10" is newer than "2.5"
        raise UserError(f"torch {torch.__version__} is older than the {TORCH_FLOOR} moe-offload needs "
                        f"(scaled_dot_product_attention's enable_gqa): pip install 'torch>={TORCH_FLOOR}'")


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """'demo' (or nothing) names the small model shipped with the package; anything else is a folder."""
    if model is None or str(model) == "demo":
        from .demo import DEMO_DIR

        return DEMO_DIR
    if not str(model).strip():  # Path("") is the current folder: a model would be looked for there unasked
        raise UserError("the model path is empty; name a model folder (or 'demo')")
    path = Path(model).expanduser()
    if os.path.isfile(path / PARTIAL_MARKER):  # False, not an error, where the folder cannot be read
        raise UserError(f"{path}: an unfinished conversion (moe-offload convert stopped before it was done); "
                        f"run the conversion again")
    return path


def check_device_name(device: str) -> None:
    """--device names a kind of device this runtime knows (whether this machine has one is another matter)."""
    if not isinstance(device, str) or (device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:")):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")


def check_dtype_name(dtype: str) -> None:
    if dtype != "auto" and (not isinstance(dtype, str) or dtype not in DTYPES):
        raise UserError(f"--dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")


def check_context(context: int) -> None:
    if not is_count(context) or context <= 0:
        raise UserError(f"--context must be a positive number of tokens, got {context!r}")


def resolve_device(device: str) -> torch.device:
    check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (this torch build or machine has none)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """'auto': float32 on CPU (fast and exact there); on a GPU the checkpoint's half type, else float16."""
    check_dtype_name(dtype)
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if checkpoint_dtype == "bfloat16" else torch.float16


class DenseWeights:
    """A folder's dense weights, read once each at the compute dtype onto the compute device; with a dense
    format (bits, group size) the attention projections stay quantized there (`convert --dense-bits`)."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, fmt: tuple[int, int] | None):
        self.ckpt, self.device, self.dtype, self.fmt = ckpt, device, dtype, fmt
        self.quantized = family(ckpt.config).attention_shapes(ckpt.config) if fmt else {}
        self.read: dict[str, torch.Tensor] = {}  # by name: a tensor asked for twice (a tied head) is one tensor

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.read:
            self.read[name] = self.ckpt.read(name, dtype=self.dtype, device=self.device)
        return self.read[name]

    def proj(self, name: str):
        if name in self.quantized:
            return read_quantized(self.ckpt, name, self.quantized[name], self.fmt, self.device)
        return self(name)


def stored_dense_shapes(ckpt: Checkpoint, fmt: tuple[int, int] | None) -> dict[str, tuple[int, ...]]:
    """The family's dense tensors as this folder stores them (attention quantized when `fmt` is given)."""
    fam = family(ckpt.config)
    return stored_shapes(fam.dense_shapes(ckpt.config), fam.attention_shapes(ckpt.config), fmt)


def build_model(ckpt: Checkpoint, store, device: torch.device, dtype: torch.dtype, context: int,
                dense_format: tuple[int, int] | None = None) -> Transformer:
    """Load every dense weight onto the device and build the family's forward around `store`: the
    ExpertStore (routed experts behind tiers and caches, given the model's routers for prefetch) or lut's
    TableStore (Mixture-of-Lookup-Experts tables)."""
    cfg = ckpt.config
    model = family(cfg).build(cfg, DenseWeights(ckpt, device, dtype, dense_format), store, context)
    if isinstance(store, ExpertStore):
        store.attach(model.routers(), lambda: [*model.dense_tensors(), *model.cache.tensors(), model.cos, model.sin])
    return model


def open_checked(path: str | os.PathLike | None):
    """A model folder with routed experts (a Hub checkpoint or a `convert` output) and its expert source,
    with every tensor the model needs checked present with its shape (headers only): (checkpoint, source,
    conversion record or None)."""
    ckpt = open_checkpoint(resolve_model_path(path), EXPERT_MODEL_TYPES)
    try:
        source = open_source(ckpt, torch.float32)
        info = read_info(ckpt.path)
        ckpt.validate({**stored_dense_shapes(ckpt, dense_format(info)), **source.expected_shapes()})
    except BaseException:
        ckpt.close()
        raise
    return ckpt, source, info


def warm_up_kernels(model: Transformer, store) -> None:
    """Run each kind of one-token matmul once now, on zeros: on a GPU the fused Triton kernels compile (or
    load from Triton's cache) and lazily loaded cuBLAS kernels load here, at load, instead of inside the
    first decode step, where a second or more would be charged to that token, to tokens/s and to a
    profile. Results are computed and dropped: no cache, slot table or counter of the store changes."""
    attn = model.blocks[0].attn
    zeros = lambda n: torch.zeros(1, n, dtype=model.dtype, device=model.device)  # noqa: E731  one token
    with torch.no_grad():
        linear(zeros(model.cfg.hidden_size), attn.qkv.wq)
        linear(zeros(attn.wo.shape[1]), attn.wo)  # [D, heads x value dim]
        if isinstance(store, ExpertStore) and store.dev_views:
            # Device slot 0 holds no expert yet (the pool fills on demand): any bytes do for a warm-up.
            store.source.compute(store.dev_views[0], zeros(model.cfg.hidden_size))
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)  # done before a copy may fill slot 0


class Runtime:
    """A loaded model ready to generate. `generate()` streams text; `stats()` says what it cost."""

    def __init__(self, ckpt: Checkpoint, model: Transformer, tokenizer: Tokenizer, store: ExpertStore):
        self.ckpt, self.model, self.tokenizer, self.store = ckpt, model, tokenizer, store
        self.last: dict = {}
        self.active: object | None = None  # the generation that owns the KV cache now
        self.cached = CachedTokens()  # which tokens that KV cache holds: a prompt starting with them reuses them
        self.closed = False

    @property
    def config(self):
        return self.ckpt.config

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                     reuse_prefix: bool = False) -> Iterator[int]:
        """Yield generated ids; timing lands in `stats()` (also when the caller stops early). A request that
        cannot run (closed runtime, empty prompt, beyond the context) raises here, before the first token.

        One generation at a time: they share the KV cache, so starting another ends this one (its next
        step raises UserError) rather than letting both continue on each other's keys and values.

        `reuse_prefix`: prefill only the prompt tokens after those the KV cache holds from the generation
        before (a chat's history); same tokens as a cold run. `stats()["prompt_tokens_reused"]` counts them."""
        self._check_open()
        # The memory plan's workspace holds a prefill of its chunk size: a longer prompt goes in chunks.
        plan = getattr(self.store, "plan", None)  # an expert store's; a table store plans no workspace
        chunk = plan.workspace.prefill_chunk if plan is not None and plan.workspace else None
        tokens = generate_ids(self.model, prompt_ids, max_new_tokens, sampling, self.tokenizer.eos_ids, chunk,
                              self.cached, reuse_prefix)
        return self._timed(prompt_ids, tokens)

    def _check_open(self) -> None:
        if self.closed:
            raise UserError("this runtime was closed; load the model again to generate")

    def _timed(self, prompt_ids: list[int], tokens: Iterator[int]) -> Iterator[int]:
        """`tokens` (a generation not yet started), timed into `self.last`, and ended if another starts."""
        self._check_open()  # again: it may have closed between the call and the first next()
        me = self.active = object()
        self.store.reset_stats()
        t0 = time.perf_counter()
        first = last = None
        n = 0
        try:
            for token in tokens:
                last = time.perf_counter()
                first = first or last
                n += 1
                yield token
                self._check_open()  # closed between two tokens: its files are, and the store's tiers may be
                if self.active is not me:
                    raise UserError("another generation started on this runtime while this one was running; "
                                    "they share one KV cache, so this one stopped (finish one before the next)")
        finally:
            if self.active is me:
                self.active = None
                end = time.perf_counter()
                first, last = first or end, last or end
                # The first token comes from prefill; decode speed counts the tokens after it, up to the last
                # one yielded (a step that sampled end-of-sequence produced no token).
                decode_s = last - first
                self.last = {
                    "prompt_tokens": len(prompt_ids), "prompt_tokens_reused": self.cached.reused, "new_tokens": n,
                    "prefill_s": round(first - t0, 6),
                    "decode_s": round(decode_s, 6),
                    "tokens_per_s": round((n - 1) / decode_s, 3) if n > 1 and decode_s > 0 else 0.0,
                }

    def generate(self, prompt: str, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                 chat: bool = False) -> Iterator[str]:
        """Yield text pieces as tokens are generated; a request that cannot run raises here, as in generate_ids."""
        ids = self.encode(prompt, chat)
        return self._pieces(ids, self.generate_ids(ids, max_new_tokens, sampling))

    def _pieces(self, ids: list[int], tokens: Iterator[int]) -> Iterator[str]:
        decoder = StreamDecoder(self.tokenizer, ids)
        for token in tokens:
            piece = decoder.push(token)
            if piece:
                yield piece
        self.last["tokens"] = decoder.ids

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if not prompt or not prompt.strip():
            raise UserError("the prompt is empty")
        return self._in_vocab(self.tokenizer.encode(prompt, chat=chat))

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A conversation [{"role", "content"}, ...] through the model's chat template, as prompt ids."""
        return self._in_vocab(self.tokenizer.encode_messages(messages))

    def _in_vocab(self, ids: list[int]) -> list[int]:
        vocab = self.config.vocab_size
        if ids and max(ids) >= vocab:
            raise UserError(f"{self.ckpt.path / 'tokenizer.json'}: the prompt encodes to id {max(ids)}, beyond the "
                            f"model's vocab_size {vocab} (config.json): tokenizer and weights do not belong together")
        return ids

    def stats(self) -> dict:
        out = dict(self.last)
        out.pop("tokens", None)
        out.update(self.store.stats())
        out["threads"] = torch.get_num_threads()
        return out

    def close(self) -> None:
        """Stop the store's reader, close every file the runtime holds open (also on `with ... as rt`), and
        give back the memory it holds: the store's pinned host tier and device slot pool, the model's weights
        and KV cache. A notebook keeps `rt` referenced after its `with` block, and a second `load` in the same
        process needs that memory. `stats()` still answers afterwards."""
        self.closed = True
        self.store.close()
        self.ckpt.close()
        self.model = None  # a generation started before and run after stops at its first step (_timed)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def physical_cores() -> int:
    """The machine's physical cores: the CLI's default --threads."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """Use `threads` CPU threads for torch and the CPU expert kernels (quant.cpu_kernels reads torch's
    count) in this thread. Returns the count set."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"--threads must be a whole number >= 1, got {threads!r}")
    torch.set_num_threads(threads)
    return threads


def prior_for(folder, choice, cfg, policy: str):
    """The routing prior of a run (offload/store/prior.py), for the context policy of a model with routed
    experts only: otherwise the folder's is not read, and one named is refused."""
    tables = cfg.model_type in TABLE_MODEL_TYPES
    if not tables and isinstance(POLICIES.get(policy), type) and issubclass(POLICIES[policy], Context):
        return find_prior(folder, choice, cfg)
    if choice not in (None, "auto", "none"):
        raise UserError("--routing-prior: a lookup-table folder routes no tokens to experts; leave it out" if tables
                        else f"--routing-prior is where the context cache policy starts from; --cache-policy "
                             f"{policy} does not read one")
    return None


def load(path: str | os.PathLike | None = "demo", device: str = "auto", dtype: str = "auto",
         context: int = 2048, progress=None, threads: int | None = None, **store_options) -> Runtime:
    """Open a model folder of any family in offload.models (or 'demo') for generation. Extra options go to
    the expert store. `threads`: CPU threads (`set_threads`); None leaves torch's count as it is (a caller
    that set it keeps it). `routing_prior`: where the context cache policy starts from (offload/store/prior.py):
    'auto' (the default: the folder's routing-prior.safetensors when it has one), 'none', or a file.

    When every expert fits in the host RAM budget, they are all read in now; `progress(done, total)` is
    called before the first and after each. On a GPU the host tier is page-locked first (seconds for tens
    of GB), counted by the same `progress` a host slot at a time, ahead of the experts."""
    check_torch()
    if threads is not None:
        set_threads(threads)
    ckpt = open_checkpoint(resolve_model_path(path))
    cfg = ckpt.config
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, cfg.torch_dtype)
    check_context(context)
    context = min(context, cfg.max_position_embeddings)
    tokenizer = Tokenizer(ckpt.path, cfg.bos_token_id, cfg.eos_token_id)
    prior_choice = store_options.pop("routing_prior", "auto")
    store = None
    try:
        prior = prior_for(ckpt.path, prior_choice, cfg, store_options.get("policy", DEFAULT_POLICY))
        if cfg.model_type in TABLE_MODEL_TYPES:
            # Mixture-of-Lookup-Experts tables instead of routed experts. The expert store's options have nothing to act on here, but a wrong value is still refused, and
            # a name neither store takes is a TypeError, as for a Mixtral folder.
            check_options(**{k: store_options[k] for k in ("prefetch", "cpu_experts", "policy") if k in store_options})
            experts_only = (inspect.signature(ExpertStore).parameters.keys()
                            - inspect.signature(TableStore).parameters.keys())
            store = TableStore(ckpt, dev, dt, **{k: v for k, v in store_options.items() if k not in experts_only})
            check_table_vram(store, context)
        else:
            store = ExpertStore(ckpt, dev, dt, context=context, progress=progress, routing_prior=prior,
                                **store_options)
        fmt = dense_format(read_info(ckpt.path))
        ckpt.validate({**stored_dense_shapes(ckpt, fmt), **store.expected_shapes()})
        model = build_model(ckpt, store, dev, dt, context, fmt)
        if isinstance(store, ExpertStore):
            store.fill_host(progress)
        if dev.type == "cuda":
            warm_up_kernels(model, store)
    except BaseException:  # a bad folder or budget, a failed read, Ctrl-C: nothing stays open
        if store is not None:
            store.close()
        ckpt.close()
        raise
    return Runtime(ckpt, model, tokenizer, store)
