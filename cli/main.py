"""moe-offload: run Mixtral-class Mixture-of-Experts models on one memory-constrained GPU."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Optional, TextIO

import typer

from cli.errors import user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run Mixtral-class Mixture-of-Experts models on one memory-constrained GPU, "
                       "streaming experts between disk, pinned RAM and the GPU.")


def _generate(model: Optional[str], prompt: Optional[str], max_new_tokens: int, temperature: float, top_k: int,
              top_p: float, seed: Optional[int], chat: bool, device: str, dtype: str, as_json: bool,
              context: int, vram: Optional[str] = None, ram: Optional[str] = None, prefetch: int = 1,
              cpu_experts: str = "auto", cache_policy: str = "context", threads: Optional[int] = None,
              routing_prior: str = "auto") -> None:
    import offload
    from offload.generate import Sampling

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if max_new_tokens < 1:
        raise offload.UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    from cli.progress import progress_bar

    with progress_bar("reading experts into RAM", transient=True, disable=as_json) as progress:
        rt = offload.load(model, device=device, dtype=dtype, context=context, vram=vram, ram=ram, prefetch=prefetch,
                          cpu_experts=cpu_experts, policy=cache_policy, routing_prior=routing_prior,
                          threads=_threads(threads), progress=progress)
    pieces = []
    out = sys.stderr if as_json else sys.stdout
    stream = rt.generate(prompt, max_new_tokens=max_new_tokens, sampling=sampling, chat=chat)  # checks the request
    if not as_json:
        _write(out, prompt)
    for piece in stream:
        pieces.append(piece)
        if not as_json:
            _write(out, piece)
    if as_json:
        stats = rt.stats()
        record = {"text": "".join(pieces), "tokens": rt.last.get("tokens", []),
                  "prompt_tokens": stats.pop("prompt_tokens"), "stats": stats}
        _write(sys.stdout, json.dumps(record) + "\n")
    else:
        _write(out, "\n")
        s = rt.stats()
        typer.echo(f"[{s['new_tokens']} tokens, {s['tokens_per_s']:.2f} tok/s, prefill {s['prefill_s']:.3f}s, "
                   f"device {s['device']}]", err=True)


def _threads(threads: Optional[int]) -> int:
    """--threads, default the physical cores."""
    from offload.runtime import physical_cores

    return physical_cores() if threads is None else threads


def _write(out: TextIO, text: str) -> None:
    """Write `text` and flush it, so the user sees each piece as it is generated. A character the stream's
    encoding lacks (PYTHONIOENCODING=ascii) comes out as '?' rather than ending the run; a stream that takes
    nothing more (a full disk) is a one-line error; a broken pipe (`| head`) goes on to click, which exits quietly."""
    from offload import UserError

    try:
        try:
            out.write(text)
        except UnicodeEncodeError:  # raised before anything is written: the whole text is encoded first
            out.write(text.encode(out.encoding, "replace").decode(out.encoding))
        out.flush()
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise
        where = getattr(out, "name", "the output").strip("<>")
        raise UserError(f"cannot write to {where} ({exc.strerror or exc}); free space there or redirect the "
                        f"output elsewhere") from None


GEN_OPTIONS = dict(
    max_new_tokens=typer.Option(64, "--max-new-tokens", "-n", help="Stop after this many new tokens."),
    temperature=typer.Option(0.0, "--temperature", "-t", help="0 = greedy; higher = more random."),
    top_k=typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = all)."),
    top_p=typer.Option(1.0, "--top-p", help="Sample from the smallest set with this much probability."),
    seed=typer.Option(None, "--seed", help="Seed for sampling (same seed, same text)."),
    chat=typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    device=typer.Option("auto", "--device", help="auto | cpu | cuda"),
    dtype=typer.Option("auto", "--dtype", help="auto | float32 | float16 | bfloat16 (auto: float32 on CPU, half on GPU)"),
    as_json=typer.Option(False, "--json", help="Print exactly one JSON object (text, tokens, stats) on stdout."),
    context=typer.Option(2048, "--context", help="Longest prompt + generation, in tokens (sizes the KV cache)."),
    vram=typer.Option(None, "--vram", help="Device memory budget, e.g. 12GiB, 512MiB, 1.5GB or bytes "
                                           "(default: free GPU memory; on CPU, room for every expert)."),
    ram=typer.Option(None, "--ram", help="Pinned host RAM for experts (default: 80% of available RAM); "
                                         "smaller than the experts = stream them from disk."),
    prefetch=typer.Option(1, "--prefetch", help="Router-ahead prefetch, layers ahead (0 = off)."),
    cpu_experts=typer.Option("auto", "--cpu-experts", help="auto | never | always | all: compute a missed expert "
                                                          "on the CPU instead of copying it (auto: when measured "
                                                          "cheaper); all: keep every expert in RAM and compute it "
                                                          "there, the GPU holding only dense weights and the KV cache."),
    cache_policy=typer.Option("context", "--cache-policy", help="Which expert leaves a full device cache: context "
                                                                "(the least urgent, its next uses learned from what "
                                                                "followed the same tokens before), cycle (the one "
                                                                "whose next use, in the layer cycle, is expected "
                                                                "farthest away), lru or lfu."),
    routing_prior=typer.Option("auto", "--routing-prior", help="Where the context policy starts from: a file "
                                                               "written by `moe-offload prior` (which experts "
                                                               "followed each token on calibration text), or "
                                                               "none (default: the model folder's "
                                                               "routing-prior.safetensors when it has one)."),
    threads=typer.Option(None, "--threads", help="CPU threads for torch and the CPU expert kernels "
                                                 "(default: the physical cores)."),
)


@app.command()
@user_errors
def generate(
    model: Optional[str] = typer.Argument(None, help="Model folder (Hugging Face Mixtral layout), or 'demo'. "
                                                     "With a single argument, it is the prompt and the demo model runs."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt text; '-' reads it from stdin."),
    max_new_tokens: int = GEN_OPTIONS["max_new_tokens"], temperature: float = GEN_OPTIONS["temperature"],
    top_k: int = GEN_OPTIONS["top_k"], top_p: float = GEN_OPTIONS["top_p"], seed: Optional[int] = GEN_OPTIONS["seed"],
    chat: bool = GEN_OPTIONS["chat"], device: str = GEN_OPTIONS["device"], dtype: str = GEN_OPTIONS["dtype"],
    as_json: bool = GEN_OPTIONS["as_json"], context: int = GEN_OPTIONS["context"],
    vram: Optional[str] = GEN_OPTIONS["vram"], ram: Optional[str] = GEN_OPTIONS["ram"],
    prefetch: int = GEN_OPTIONS["prefetch"], cpu_experts: str = GEN_OPTIONS["cpu_experts"],
    cache_policy: str = GEN_OPTIONS["cache_policy"], routing_prior: str = GEN_OPTIONS["routing_prior"],
    threads: Optional[int] = GEN_OPTIONS["threads"],
) -> None:
    """Generate text from PROMPT with MODEL, streaming it to the terminal (PROMPT '-': read it from stdin)."""
    if prompt is None:
        model, prompt = "demo", model
    prompt = _read_prompt(prompt)
    if prompt is None or not prompt.strip():
        from offload import UserError

        raise UserError("the prompt is empty (usage: moe-offload generate [MODEL] PROMPT)")
    _generate(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, chat, device, dtype, as_json, context,
              vram, ram, prefetch, cpu_experts, cache_policy, threads, routing_prior)


def _read_prompt(prompt: Optional[str]) -> Optional[str]:
    """The prompt itself, or for '-' the text on stdin (a long prompt, a file: `... - < prompt.txt`); one that
    is not valid UTF-8 is refused here, before the model loads."""
    from offload import UserError
    from offload.tokenizer import check_utf8

    if prompt == "-":
        try:
            prompt = sys.stdin.read().removesuffix("\n")
        except UnicodeDecodeError as exc:  # outside the C locale stdin decodes strictly (in it, see check_utf8)
            raise UserError(f"the prompt is not valid {exc.encoding.upper()} (byte {exc.start} of stdin: "
                            f"{exc.reason}); convert it to {exc.encoding.upper()}") from None
        except OSError as exc:
            raise UserError(f"cannot read the prompt from stdin ({exc})") from None
    if prompt is not None:
        check_utf8(prompt)
    return prompt


@app.command()
@user_errors
def demo(
    prompt: str = typer.Argument("The for statement", help="The prompt text."),
    max_new_tokens: int = GEN_OPTIONS["max_new_tokens"], temperature: float = GEN_OPTIONS["temperature"],
    top_k: int = GEN_OPTIONS["top_k"], top_p: float = GEN_OPTIONS["top_p"], seed: Optional[int] = GEN_OPTIONS["seed"],
    device: str = GEN_OPTIONS["device"], as_json: bool = GEN_OPTIONS["as_json"],
    vram: Optional[str] = GEN_OPTIONS["vram"], ram: Optional[str] = GEN_OPTIONS["ram"],
    prefetch: int = GEN_OPTIONS["prefetch"], threads: Optional[int] = GEN_OPTIONS["threads"],
) -> None:
    """Generate with the small Mixtral-architecture model shipped in the package (no download)."""
    from offload.tokenizer import check_utf8

    check_utf8(prompt)
    _generate("demo", prompt, max_new_tokens, temperature, top_k, top_p, seed, False, device, "auto", as_json, 2048,
              vram, ram, prefetch, threads=_threads(threads))


@app.command()
@user_errors
def inspect(
    model: str = typer.Argument("demo", help="Model folder, or 'demo'."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Plan memory for this device budget (e.g. 12GiB): "
                                                             "what lives where, how many expert slots fit."),
    ram: Optional[str] = typer.Option(None, "--ram", help="Plan memory for this pinned host RAM budget."),
    hit_rate: Optional[float] = typer.Option(None, "--hit-rate", help="Device-slot hit rate for the expected bytes "
                                                                      "per token (default 0.5)."),
    bandwidth: Optional[str] = typer.Option(None, "--bandwidth", help="Host->device bandwidth for the transfer bound "
                                                                      "(default 25GB: PCIe 4.0 x16 in practice)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (cuda plans for a GPU even without one)."),
    dtype: str = GEN_OPTIONS["dtype"], context: int = GEN_OPTIONS["context"],
) -> None:
    """Describe a model: layers, experts, parameters dense vs experts, bytes per expert, dense bytes on the GPU;
    with --vram/--ram (or --hit-rate/--bandwidth), the memory plan under those budgets."""
    from offload.inspect import check_plan_options, describe, memory_plan
    from quant.units import parse_bytes

    check_plan_options(device, dtype, context)  # also when no plan is asked for: a wrong value is still wrong
    info = describe(model)
    plan = None
    if any(option is not None for option in (vram, ram, hit_rate, bandwidth)):
        plan = memory_plan(model, vram=vram, ram=ram, device=device, dtype=dtype, context=context,
                           hit_rate=0.5 if hit_rate is None else hit_rate,
                           bandwidth=parse_bytes("25GB" if bandwidth is None else bandwidth, "--bandwidth"))
    if as_json:
        typer.echo(json.dumps(info | ({"memory_plan": plan} if plan else {}), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=info["path"], show_header=False)
    for key, value in info.items():
        if key == "path":
            continue
        text = _human_bytes(value) if key.startswith("bytes") else (f"{value:,}" if isinstance(value, int) else str(value))
        table.add_row(key.replace("_", " "), text)
    console = Console()
    console.print(table)
    if plan:
        console.print(_plan_table(plan))


def _plan_table(plan: dict):
    from rich.table import Table

    d, h, k, t = plan["device_tier"], plan["host_tier"], plan["disk"], plan["per_token"]
    b = _human_bytes
    table = Table(title=f"memory plan: {plan['device']}, {plan['dtype']}, context {plan['context']}")
    table.add_column("where")
    table.add_column("what")
    table.add_column("bytes", justify="right")
    table.add_row("device", "dense weights (embeddings, attention, norms, routers, lm_head)", b(d["dense_bytes"]))
    table.add_row("device", "KV cache", b(d["kv_bytes"]))
    ws = d["workspace"]
    table.add_row("device", f"workspace (prefill of up to {ws['chunk_tokens']} tokens, {ws['backend']} attention"
                            f"{', sm_80+ assumed' if ws['assumed_sm80'] else ''})", b(d["workspace_bytes"]))
    table.add_row("device", f"{d['expert_slots']} of {plan['experts_total']} expert slots x {b(plan['blob_bytes'])}",
                  b(d["expert_pool_bytes"]))
    table.add_row("device", f"unused of the {b(d['budget'])} budget", b(d["unused_bytes"]))
    table.add_row("host RAM", f"{h['expert_slots']} expert slots{' (pinned)' if h['pinned'] else ''}, "
                              f"budget {b(h['budget'])}", b(h["bytes"]))
    table.add_row("disk", f"{k['experts_streamed']} experts streamed from the shards on use", b(k["bytes"]))
    note = " (every expert on the device)" if plan["all_experts_on_device"] else ""
    table.add_row("per token", f"at hit rate {t['hit_rate']:.0%}{note}: {t['misses_per_token']:.1f} of "
                               f"{t['expert_uses_per_token']} expert uses copied host->device", b(t["bytes_h2d_per_token"]))
    table.add_row("per token", "read from disk (accesses spread evenly)", b(t["bytes_disk_per_token"]))
    table.add_row("per token", f"transfer bound at {t['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s",
                  f"{t['transfer_bound_s_per_token'] * 1e3:.2f} ms")
    return table


@app.command()
@user_errors
def profile(
    model: Optional[str] = typer.Argument(None, help="Model folder (Hugging Face Mixtral layout), or 'demo' (default)."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt text (default: 'The for statement'); '-' reads it from stdin."),
    out: str = typer.Option("profile", "--out", help="Folder for profile.json, trace.json and the PNG plots."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Stop after this many new tokens."),
    temperature: float = GEN_OPTIONS["temperature"], top_k: int = GEN_OPTIONS["top_k"],
    top_p: float = GEN_OPTIONS["top_p"], seed: Optional[int] = GEN_OPTIONS["seed"], chat: bool = GEN_OPTIONS["chat"],
    device: str = GEN_OPTIONS["device"], dtype: str = GEN_OPTIONS["dtype"], context: int = GEN_OPTIONS["context"],
    vram: Optional[str] = GEN_OPTIONS["vram"], ram: Optional[str] = GEN_OPTIONS["ram"],
    prefetch: int = GEN_OPTIONS["prefetch"], cpu_experts: str = GEN_OPTIONS["cpu_experts"],
    cache_policy: str = GEN_OPTIONS["cache_policy"], routing_prior: str = GEN_OPTIONS["routing_prior"],
    threads: Optional[int] = GEN_OPTIONS["threads"],
) -> None:
    """Generate with timing on; write a JSON profile, PNG plots and a Perfetto trace; say what bounds the run."""
    from offload.generate import Sampling
    from cli.progress import progress_bar
    from offload.profile import DEFAULT_PROMPT, summary_rows
    from offload.profile import profile as run_profile

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    text = _read_prompt(prompt) if prompt is not None else DEFAULT_PROMPT
    with progress_bar("reading experts into RAM", transient=True) as progress:
        result = run_profile(model, text, out, max_new_tokens, sampling, chat=chat, device=device, dtype=dtype,
                             context=context, vram=vram, ram=ram, prefetch=prefetch, cpu_experts=cpu_experts,
                             policy=cache_policy, routing_prior=routing_prior, threads=_threads(threads),
                             progress=progress)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"moe-offload profile: {result.record['model']}", show_header=False)
    for label, value in summary_rows(result.record):
        table.add_row(label, value)
    console = Console()
    console.print(table)
    console.print(f"[bold]verdict:[/bold] {result.record['verdict']['text']}", highlight=False)
    console.print("wrote " + ", ".join(str(f) for f in result.files), highlight=False)


@app.command()
@user_errors
def convert(
    src: str = typer.Argument(..., help="Source Mixtral folder (or 'demo')."),
    dst: str = typer.Argument(..., help="Destination folder (must not exist, or be an earlier conversion of SRC)."),
    bits: str = typer.Option("4", "--bits", help="Expert bits: 8, 4, 3 or 2 (group-wise), or mxfp4 (4-bit floats, "
                                                 "a power-of-two scale per 32: gpt-oss's format)."),
    group_size: int = typer.Option(64, "--group-size", help="Weights per scale/zero group (must divide the rows)."),
    dense_bits: int = typer.Option(16, "--dense-bits", help="Attention projections: 16 (fp16), or 8 or 4 bits "
                                                            "(group 64), kept quantized on the GPU. Embeddings, "
                                                            "norms, routers and lm_head stay fp16."),
    sparse: Optional[float] = typer.Option(None, "--sparse", help="Sparse experts (FloE): drop this fraction "
                                                                  "(in [0, 1)) of each expert's neurons on the "
                                                                  "calibration text; a miss then moves the up "
                                                                  "projection (at --bits) and only the neurons it "
                                                                  "activates."),
    chunk_bits: Optional[int] = typer.Option(None, "--chunk-bits", help="With --sparse: bits of each neuron's gate "
                                                                        "row and down column (16, 8, 4, 3, 2; "
                                                                        "default --bits)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="With --sparse: a UTF-8 text file to "
                                                                          "calibrate the thresholds on (default: "
                                                                          "the demo model's training text, "
                                                                          "pydoc_data.topics)."),
    predictor_rank: Optional[int] = typer.Option(None, "--predictor-rank", help="With --sparse: rank of the neuron "
                                                                                "predictors that let prefetch copy "
                                                                                "a guessed expert's likely neurons "
                                                                                "early (default 32; 0: none)."),
) -> None:
    """Write a copy of SRC with quantized expert blobs, which `generate` runs directly."""
    from cli.progress import progress_bar
    from offload.convert import convert as run_convert
    from offload.runtime import resolve_model_path

    existed = Path(dst).exists()  # convert accepts an existing DST only as a finished, intact earlier run
    with progress_bar("converting experts") as progress:
        out = run_convert(resolve_model_path(src), dst, bits=int(bits) if bits.isdigit() else bits,
                          group_size=group_size, dense_bits=dense_bits, progress=progress,
                          sparse=sparse, chunk_bits=chunk_bits, calibration=calibration,
                          predictor_rank=predictor_rank)
    typer.echo(f"{out}: already converted from {src} with these settings; nothing to do" if existed
               else f"wrote {out}", err=True)


@app.command()
@user_errors
def prior(
    model: str = typer.Argument(..., help="Model folder (or 'demo')."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="A UTF-8 text file like the text the "
                                                                          "model will generate (default: the demo "
                                                                          "model's training text, "
                                                                          "pydoc_data.topics)."),
    tokens: int = typer.Option(131072, "--tokens", help="Calibration tokens to count at most."),
    out: Optional[str] = typer.Option(None, "--out", help="Where to write it (default: "
                                                          "MODEL/routing-prior.safetensors, which runs of MODEL "
                                                          "then use)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file at the destination."),
    device: str = GEN_OPTIONS["device"],
) -> None:
    """Learn which experts follow each token on calibration text, so the context cache policy starts warm:
    a token met for the first time in a run is then weighed by what followed it there."""
    from cli.progress import progress_bar
    from offload import UserError
    from offload.calibrate import calibration_text, routing_prior
    from offload.demo import DEMO_DIR
    from offload.runtime import resolve_model_path
    from offload.store.prior import FILE

    src = resolve_model_path(model)
    if not Path(src).is_dir():
        raise UserError(f"{model}: no such model folder")
    if out is None and Path(src).resolve() == DEMO_DIR.resolve():
        raise UserError("the demo model's folder is part of the package and ships its prior; pass --out to write "
                        "one elsewhere (and --routing-prior to use it)")
    dst = Path(out) if out is not None else Path(src) / FILE
    if tokens < 2:
        raise UserError(f"--tokens must be at least 2, got {tokens}")
    if dst.exists() and not force:
        raise UserError(f"{dst} exists; pass --force to replace it, or --out elsewhere")
    if not dst.parent.is_dir():
        raise UserError(f"--out {dst}: no folder {dst.parent}")
    text, name = calibration_text(calibration)
    with progress_bar("routing the calibration text", unit="windows") as progress:
        learned = routing_prior(src, text, name, tokens, progress, device=device)
    try:
        learned.save(dst)
    except OSError as exc:
        raise UserError(f"cannot write {dst} ({exc.strerror or exc})") from None
    typer.echo(f"wrote {dst}: {len(learned)} distinct tokens of {learned.meta['tokens']} calibration tokens", err=True)


THREADS = GEN_OPTIONS["threads"]


@app.command()
@user_errors
def serve(
    model: str = typer.Argument("demo", help="Model folder, or 'demo'."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: loopback only; "
                                                         "0.0.0.0 serves the network)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait while one generates; more "
                                                          "get 503 with Retry-After."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1 "
                                                                  "routes (default: $MOE_OFFLOAD_API_KEY, which "
                                                                  "keeps the key out of the process list)."),
    max_body: str = typer.Option("4MiB", "--max-body", help="Largest request body; larger ones get 413."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name clients use (default: the folder's name)."),
    threads: Optional[int] = THREADS,
    device: str = GEN_OPTIONS["device"], dtype: str = GEN_OPTIONS["dtype"], context: int = GEN_OPTIONS["context"],
    vram: Optional[str] = GEN_OPTIONS["vram"], ram: Optional[str] = GEN_OPTIONS["ram"],
    prefetch: int = GEN_OPTIONS["prefetch"], cpu_experts: str = GEN_OPTIONS["cpu_experts"],
    cache_policy: str = GEN_OPTIONS["cache_policy"], routing_prior: str = GEN_OPTIONS["routing_prior"],
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /metrics, /health), one generation at a time."""
    from cli.progress import progress_bar
    from offload.serve.app import serve as run_server
    from quant.units import parse_bytes

    with progress_bar("reading experts into RAM", transient=True) as progress:
        run_server(model, host, port, max_queue=max_queue, api_key=api_key, name=name, threads=_threads(threads),
                   max_body=parse_bytes(max_body, "--max-body"), progress=progress,
                   ready=lambda url: typer.echo(f"moe-offload: serving {model} at {url}", err=True),
                   device=device, dtype=dtype, context=context, vram=vram, ram=ram, prefetch=prefetch,
                   cpu_experts=cpu_experts, policy=cache_policy, routing_prior=routing_prior)


@app.command()
@user_errors
def chat(
    model: str = typer.Argument("demo", help="Model folder, or 'demo'."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Longest answer, in tokens."),
    temperature: float = GEN_OPTIONS["temperature"], top_k: int = GEN_OPTIONS["top_k"],
    top_p: float = GEN_OPTIONS["top_p"], seed: Optional[int] = GEN_OPTIONS["seed"],
    system: Optional[str] = typer.Option(None, "--system", help="A system message to start the conversation."),
    threads: Optional[int] = THREADS,
    device: str = GEN_OPTIONS["device"], dtype: str = GEN_OPTIONS["dtype"], context: int = GEN_OPTIONS["context"],
    vram: Optional[str] = GEN_OPTIONS["vram"], ram: Optional[str] = GEN_OPTIONS["ram"],
    prefetch: int = GEN_OPTIONS["prefetch"], cpu_experts: str = GEN_OPTIONS["cpu_experts"],
    cache_policy: str = GEN_OPTIONS["cache_policy"], routing_prior: str = GEN_OPTIONS["routing_prior"],
) -> None:
    """Chat with MODEL in the terminal (its chat template; earlier turns stay in the KV cache). /reset,
    /stats, /exit; Ctrl-C stops an answer. A stdin that is not a terminal is read one message a line."""
    from cli.progress import progress_bar
    from offload.generate import Sampling
    from offload.serve.chat import chat as run_chat

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    # The bar shows while the experts are read in and stops itself when they are, before the chat begins.
    with progress_bar("reading experts into RAM", transient=True) as progress:
        run_chat(model, max_new_tokens=max_new_tokens, sampling=sampling, system=system, threads=_threads(threads),
                 write=lambda text: _write(sys.stdout, text), note=lambda text: typer.echo(text, err=True),
                 progress=progress, device=device, dtype=dtype, context=context, vram=vram, ram=ram,
                 prefetch=prefetch, cpu_experts=cpu_experts, policy=cache_policy, routing_prior=routing_prior)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


from cli.lut_cmd import lut_app; app.add_typer(lut_app, name="lut")  # noqa: E402,E702


def main() -> None:
    """The `moe-offload` command. Typer's own errors (a missing argument, a value that is not a number) come
    out in one line too, like the project's, instead of a usage line and a boxed panel."""
    # click's exception classes, wherever this typer takes click from (newer typers vendor their own copy).
    errors = sys.modules[typer.BadParameter.__module__]
    no_args = getattr(errors, "NoArgsIsHelpError", ())  # click >= 8.2: `moe-offload` alone shows the help
    try:
        code = app(standalone_mode=False, prog_name="moe-offload")
    except no_args as exc:
        if exc.format_message().strip():  # typer's rich help has printed itself already; click's is this text
            typer.echo(exc.format_message())
        sys.exit(0)
    except errors.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "moe-offload"
        message = " ".join(exc.format_message().split())
        typer.echo(f"moe-offload: error: {message} (see '{where} --help')", err=True)
        sys.exit(2)
    except errors.ClickException as exc:
        typer.echo(f"moe-offload: error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C while typer itself runs (parsing, a prompt)
        typer.echo("moe-offload: interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # What is left unwritten is the output itself (a table or the help printed to a full disk): every file
        # the commands write fails as a UserError naming it.
        typer.echo(f"moe-offload: error: cannot write the output ({exc.strerror})", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
