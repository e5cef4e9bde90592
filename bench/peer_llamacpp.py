"""llama.cpp through llama-cpp-python: the peer contender of the CPU expert benchmarks, measured on the same
checkpoint and thread count as moe-offload.

What it measures: whole-model greedy decode on the CPU, milliseconds per token (prefill excluded), of a GGUF
converted from a Hugging Face Mixtral-family folder (bench_offload.write_mixtral_slice's slice: real
Mixtral-8x7B dimensions, random bf16 weights) with the conversion script that llama-cpp-python's source
distribution vendors (vendor/llama.cpp/convert_hf_to_gguf.py and its gguf-py), so the converter and the
kernels come from one llama.cpp commit. BF16, F16 and Q8_0 come from the converter (--outtype); Q4_0 and
Q4_K_M from llama.cpp's own quantizer (llama_model_quantize) run on the BF16 file, with llama.cpp's default
recipe for that type (its rules may keep a few tensors, such as output.weight, at a wider type).

A benchmark peer only: never imported by the runtime or the tests, and not a dependency in pyproject.toml.
Built and measured here with llama-cpp-python 0.3.36 (its vendored ggml 0.25.3), from PyPI's source
distribution, Python 3.11, gcc 12, on the project's 2-core Sapphire Rapids machine:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
      -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
      -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
      -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 10 pip install llama-cpp-python==0.3.36 --no-binary llama-cpp-python

Why those flags: with the default GGML_NATIVE=ON, -march=native turns on AMX on a CPU that has it, and the
AMX buffer type then takes the quantized weights, a path reported to crash on quantized GGUFs on these
machines (not retried here: this build has no AMX).
Llama(...) of this version has no use_extra_bufts argument to turn it off at load (and that switch would also
turn off the CPU_REPACK buffer, llama.cpp's fast Q4_0 layout, understating it), so the build names every ISA
extension of the CPU except AMX instead. LLAVA and the tools are off only to shorten a ~15-minute build.
The converter also imports sentencepiece (`pip install sentencepiece`), even for a folder without a
tokenizer.model, and needs transformers, numpy and torch, which the test extras already bring.

    python bench/peer_llamacpp.py --folder /tmp/mixtral-slice --threads 2   # Q8_0 and Q4_0

On the 1-layer slice, 16 tokens, a quiet machine: Q8_0 30 ms/token and Q4_0 25 ms/token at 2 threads (54 and
47 at 1 thread). Measure it quiet: llama.cpp's threads meet at a barrier after every graph node, so when
another process takes one of the 2 cores, 2 threads fall to ~200 ms/token while 1 thread barely moves.

Converted files are cached under --cache (GBs: keep them out of the repository). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

# What the converter writes itself (its --outtype), and what llama.cpp's quantizer makes from the BF16 file.
CONVERTER_TYPES = {"BF16": "bf16", "F16": "f16", "Q8_0": "q8_0"}
QUANTIZER_TYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}

# The converter names a BPE pre-tokenizer by the hash of the tokens it gives a fixed text, and refuses hashes it
# does not list. The demo tokenizer (offload/demo_model, copied into every bench slice) is GPT-2's byte-level
# BPE, so its hash maps to llama.cpp's "gpt-2" (a name the converter itself gives other hashes; llama.cpp's
# vocabulary loader refuses names it does not know, "gpt2" among them). Recompute the hash with the converter's
# get_vocab_base_pre if that tokenizer changes.
PRE_TOKENIZER_HASHES = {"964895c3671c29defb94bfadd40ac46404c7809ed63af15c0182dc0019043071": "gpt-2"}
_HASH_LINE = "chkhsh = sha256(str(chktok).encode()).hexdigest()\n"


def available() -> str | None:
    """The installed llama-cpp-python's version, or None where it does not import."""
    try:
        import llama_cpp
    except (ImportError, OSError):  # OSError: the package is there but its shared library does not load
        return None
    return llama_cpp.__version__


def _require() -> str:
    version = available()
    if version is None:
        raise RuntimeError("llama-cpp-python is not installed: build it as this module's docstring says")
    return version


def _converter(cache: Path, version: str) -> Path:
    """A scratch copy of the converter of the installed version's source distribution, with the demo
    tokenizer's pre-tokenizer hash added; returns its convert_hf_to_gguf.py. The installed package carries no
    converter, and nothing installed is edited: the copy lives under the cache folder."""
    root = cache / f"converter-{version}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    sdist = cache / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}",
                        "--no-binary", ":all:", "--no-deps", "--quiet", "-d", str(cache)], check=True)
    vendored = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    part = root.with_name(root.name + ".part")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(vendored) and (
            m.name == vendored + "convert_hf_to_gguf.py" or m.name.startswith(vendored + "conversion/")
            or m.name.startswith(vendored + "gguf-py/"))]
        for m in members:
            m.name = m.name[len(vendored):]
        tar.extractall(part, members=members, filter="data")
    base = part / "conversion" / "base.py"
    text = base.read_text()
    if text.count(_HASH_LINE) != 1:
        raise RuntimeError(f"{base}: the line `{_HASH_LINE.strip()}` that the pre-tokenizer patch follows is "
                           "not there exactly once; update peer_llamacpp._converter for this llama.cpp")
    for name in PRE_TOKENIZER_HASHES.values():
        if f'res = "{name}"' not in text:
            raise RuntimeError(f"{base}: the converter never names the pre-tokenizer {name!r}; llama.cpp may not load it")
    at = text.index(_HASH_LINE)
    indent = text[text.rindex("\n", 0, at) + 1:at]
    added = "".join(f'{indent}if chkhsh == "{h}":\n{indent}    return "{name}"\n'
                    for h, name in PRE_TOKENIZER_HASHES.items())
    base.write_text(text.replace(_HASH_LINE, _HASH_LINE + added))
    os.replace(part, root)
    return script


def to_gguf(hf_folder: Path, out_dir: Path, quant: str) -> Path:
    """The GGUF of `hf_folder` at `quant` (BF16, F16, Q8_0, Q4_0, Q4_K_M), converted once and cached in
    `out_dir` as <folder name>.<quant>.gguf; a later call with the same names returns the cached file."""
    quant = quant.upper()
    if quant not in CONVERTER_TYPES and quant not in QUANTIZER_TYPES:
        raise ValueError(f"quant {quant!r}: choose one of {sorted(CONVERTER_TYPES) + sorted(QUANTIZER_TYPES)}")
    version = _require()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{hf_folder.name}.{quant.lower()}.gguf"
    if out.is_file():
        return out
    # Written under another name and renamed when complete, so that a stopped conversion is never reused.
    part = out.with_name(out.name + ".part")
    if quant in CONVERTER_TYPES:
        subprocess.run([sys.executable, str(_converter(out_dir, version)), str(hf_folder), "--outfile", str(part),
                        "--outtype", CONVERTER_TYPES[quant]], check=True)
    else:
        import llama_cpp

        source = to_gguf(hf_folder, out_dir, "BF16")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[quant])
        params.nthread = os.cpu_count() or 1
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(part).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize {source} -> {quant} failed with {rc}")
    os.replace(part, out)
    return out


def _ftype_name(llm) -> str:
    import llama_cpp

    names = {v: k.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix("LLAMA_FTYPE_")
             for k, v in vars(llama_cpp).items() if k.startswith("LLAMA_FTYPE_") and isinstance(v, int)}
    ftype = int(llm.metadata.get("general.file_type", -1))
    return names.get(ftype, str(ftype))


def _greedy(llm, prompt: list[int], new_tokens: int) -> list[float]:
    """Prefill `prompt`, then decode `new_tokens` greedy tokens one at a time; returns each step's seconds."""
    import llama_cpp
    import numpy as np

    llm.reset()  # the next eval drops the KV cache from position 0
    llm.eval(prompt)
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        # The last evaluated position's logits, [V]: argmax is greedy decoding without a sampler chain.
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        llm.eval([int(logits.argmax())])
        steps.append(time.perf_counter() - t0)
    return steps


def decode_ms_per_token(gguf: Path, threads: int, prompt_tokens: list[int] | str, new_tokens: int) -> dict:
    """Greedy decode of `new_tokens` tokens after `prompt_tokens` (ids, or text for the GGUF's tokenizer) on
    `threads` threads: one warm-up run of the same tokens (weights paged in, buffers sized), then one timed
    run, wall clock per decode step, prefill excluded. Also llama.cpp's own eval-time counter of that run."""
    version = _require()
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                          use_mmap=True, verbose=False)
    try:
        prompt = (llm.tokenize(prompt_tokens.encode(), add_bos=True) if isinstance(prompt_tokens, str)
                  else list(prompt_tokens))
        if len(prompt) + new_tokens > llm.n_ctx():
            raise ValueError(f"{len(prompt)} prompt + {new_tokens} new tokens exceed n_ctx {llm.n_ctx()}")
        _greedy(llm, prompt, new_tokens)
        llama_cpp.llama_perf_context_reset(llm.ctx)
        steps = _greedy(llm, prompt, new_tokens)
        perf = llama_cpp.llama_perf_context(llm.ctx)
        steps_ms = sorted(s * 1e3 for s in steps)
        return {
            "ms_per_token": sum(steps_ms) / len(steps_ms),
            "ms_per_token_median": steps_ms[len(steps_ms) // 2],
            # llama.cpp's counter: the single-token evals' time inside llama_decode, no Python around it.
            "llama_eval_ms_per_token": perf.t_eval_ms / perf.n_eval if perf.n_eval else None,
            "prefill_ms": perf.t_p_eval_ms,
            "tokens": new_tokens,
            "prompt_tokens": len(prompt),
            "threads": threads,
            "version": version,
            "quant": _ftype_name(llm),
            "gguf": str(gguf),
            "gguf_bytes": gguf.stat().st_size,
            "system_info": llama_cpp.llama_print_system_info().decode(),
        }
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, required=True, help="a Hugging Face Mixtral-family folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/llamacpp-gguf"),
                    help="where converted GGUFs are kept (GBs; outside the repository)")
    ap.add_argument("--quants", default="Q8_0,Q4_0")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    from common import PROMPT, load_average, save_record

    if available() is None:
        sys.exit("llama-cpp-python is not installed: see this module's docstring for the build")
    records = []
    for quant in args.quants.split(","):
        gguf = to_gguf(args.folder, args.cache, quant)
        r = decode_ms_per_token(gguf, args.threads, PROMPT, args.new_tokens) | {"load_average": load_average()}
        records.append(r)
        print(f"llama.cpp {r['version']} {quant}: {r['ms_per_token']:.1f} ms/token (llama.cpp's counter "
              f"{r['llama_eval_ms_per_token']:.1f}), {r['tokens']} tokens, {r['threads']} threads, "
              f"load {r['load_average']}", flush=True)
    if args.out is not None:
        save_record({"folder": str(args.folder), "records": records}, args.out)
    else:
        print(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
