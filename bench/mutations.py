"""Can the tests fail? Break the code on purpose, one mutation at a time, and run the tests that should notice.

Each mutation below is a small patch (a unique piece of text in one file and what replaces it) applied to a
temporary copy of the repository, then the tests named with it run there (`python -m pytest -x`); a mutation is
CAUGHT when they fail, NOT CAUGHT when they pass. Before any mutation, every test named runs once on the
unmutated copy and must pass, so a failure is the mutation's doing. The list is issue 26's audit: bugs that
passed the suite before it, each paired with the tests written to catch it (run alone, so each entry shows
that those tests catch it on their own, not that something else in the suite happens to).

    python bench/mutations.py                 # every mutation, on the committed tree (git HEAD)
    python bench/mutations.py --worktree      # on the working tree as it is, uncommitted changes included
    python bench/mutations.py --only seed     # the mutations whose name contains "seed"

Prints one line per mutation and a summary; exits 1 if a mutation was not caught, its text is no longer in
the code (the list needs updating), or the unmutated tests fail. Not part of the test run: it runs its tests
once per mutation, a few minutes in all. Nothing is timed and no record is written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    item: str          # issue 26's item
    path: str          # file to patch, relative to the repository
    old: str           # text that must occur exactly once in it
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions


SAMPLING_TESTS = ("tests/test_generate.py", "-k", "top_k_and_top_p_allow or seed")
CLI_SAMPLING = ("tests/test_cli.py", "-k", "through_the_cli")
HELD_OUT = ("tests/test_quant.py", "-k", "held_out_text")
FORMULA = ("tests/test_quant.py", "-k", "formats_formula")
HALF = ("tests/test_model.py", "-k", "half_precision")
GREEDY = "tests/test_model.py::test_greedy_generation_is_identical_for_32_tokens"
LOGITS = "tests/test_model.py::test_logits_match_transformers_after_prefill_and_16_decode_steps"
PER_LAYER = ("tests/test_store.py", "-k", "per_layer_cache")
EIGHT_BIT_VS_HQQ = tuple(f"tests/test_quant.py::test_error_is_no_worse_than_hqq_at_no_more_bits[8-64-{kind}]"
                         for kind in ("gaussian", "student_t3"))
LAYERS_DO_NOTHING = ("    def __call__(self, x, token_ids, pos, cache, cos, sin):\n",
                     "    def __call__(self, x, token_ids, pos, cache, cos, sin):\n        return x\n")

MUTATIONS = [
    Mutation("top-k removed", "1", "offload/generate.py", "    if s.top_k:\n", "    if False:\n", SAMPLING_TESTS),
    Mutation("top-p drops the token that crosses top_p", "1", "offload/generate.py",
             "drop = torch.cumsum(sorted_p, 0) - sorted_p >= s.top_p", "drop = torch.cumsum(sorted_p, 0) >= s.top_p",
             SAMPLING_TESTS),
    Mutation("seed ignored: always seed 0", "1", "offload/generate.py",
             "torch.Generator().manual_seed(s.seed)", "torch.Generator().manual_seed(0)", SAMPLING_TESTS),
    Mutation("seed ignored: the global generator", "1", "offload/generate.py",
             "generator = torch.Generator().manual_seed(s.seed)", "generator = None", SAMPLING_TESTS),
    Mutation("CLI drops --top-k and --top-p", "1", "cli/main.py",
             "    from offload.generate import Sampling\n\n"
             "    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)",
             "    from offload.generate import Sampling\n\n"
             "    sampling = Sampling(temperature=temperature, seed=seed)", CLI_SAMPLING),
    Mutation("CLI drops --seed", "1", "cli/main.py",
             "    from offload.generate import Sampling\n\n"
             "    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)",
             "    from offload.generate import Sampling\n\n"
             "    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)", CLI_SAMPLING),
    Mutation("dequantize returns zeros", "2", "quant/quantize.py", "    return w.flatten(-2).to(dtype)",
             "    return torch.zeros_like(w.flatten(-2)).to(dtype)", HELD_OUT),
    Mutation("every dequantized weight x1.2", "2", "quant/quantize.py", "    return w.flatten(-2).to(dtype)",
             "    return (1.2 * w).flatten(-2).to(dtype)", HELD_OUT),
    Mutation("RMSNorm returns zeros for non-float32 input", "3", "offload/models/norms.py", "    xf = x.float()\n",
             "    if x.dtype != torch.float32:\n        return torch.zeros_like(x)\n    xf = x.float()\n", HALF),
    Mutation("decoder layers compute nothing (greedy, untied GQA)", "4", "offload/models/transformer.py",
             *LAYERS_DO_NOTHING, (GREEDY + "[gqa4-e6-top2-untied]",)),
    Mutation("decoder layers compute nothing (greedy, sliding window)", "4", "offload/models/transformer.py",
             *LAYERS_DO_NOTHING, (GREEDY + "[headdim-window-e3-top2]",)),
    Mutation("decoder layers compute nothing (logits, tied)", "4", "offload/models/transformer.py",
             *LAYERS_DO_NOTHING, (LOGITS + "[mha-e4-top1-tied]",)),
    Mutation("dequantize x1.5", "6", "quant/quantize.py",
             "    return dequantize_parts(q.q, q.scale, q.zero, q.shape[1], q.bits, q.group_size, dtype)",
             "    return 1.5 * dequantize_parts(q.q, q.scale, q.zero, q.shape[1], q.bits, q.group_size, dtype)",
             FORMULA),
    Mutation("dequantize_parts x1.5", "6", "quant/quantize.py", "    return w.flatten(-2).to(dtype)",
             "    return (1.5 * w).flatten(-2).to(dtype)", FORMULA),
    Mutation("8-bit quantizer worse than HQQ (clips 10% of every group's range)", "7", "quant/quantize.py",
             "    8: (1.0, 0.97, 0.94),", "    8: (0.9,),", EIGHT_BIT_VS_HQQ),
    Mutation("slot pool allocated at 3x its planned size", "5", "offload/store/store.py",
             "self.dev = torch.empty((self.plan.device_slots, N)", "self.dev = torch.empty((3 * self.plan.device_slots, N)",
             ("tests/test_memory.py", "-k", "device_tier_holds")),
    Mutation("KV cache allocated at twice the context", "5", "offload/models/transformer.py",
             "cfg.num_key_value_heads, cfg.head_dim, max_seq,", "cfg.num_key_value_heads, cfg.head_dim, 2 * max_seq,",
             ("tests/test_memory.py", "-k", "device_tier_holds")),
    Mutation("per_layer_cache ignored by the store", "8", "offload/store/store.py",
             "layers = cfg.num_hidden_layers if per_layer_cache else 0", "layers = 0", PER_LAYER),
    Mutation("per-layer slot table ignores the layer's share", "8", "offload/store/cache.py",
             "if self.layer_count.get(layer, 0) >= self._layer_share(layer):", "if False:", PER_LAYER),
    Mutation("HQQLinear reference never actually called", "8", "tests/hqq_ref.py",
             '    """The same through HQQLinear with BaseQuantizeConfig (hqq\'s layer path, fp16 compute), as a '
             'cross-check."""\n',
             '    """The same through HQQLinear with BaseQuantizeConfig (hqq\'s layer path, fp16 compute), as a '
             'cross-check."""\n    return hqq_dequantize(weight, bits, group_size)\n',
             ("tests/test_quant.py", "-k", "stronger_setting")),
]


def copy_tree(dst: Path, worktree: bool) -> None:
    """The committed tree (git archive HEAD) or the working tree's tracked and untracked, not ignored, files."""
    if not worktree:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
        return
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():  # a tracked file deleted in the working tree is left out
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def pytest(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    """Run the tests in `root`; (exit status, the first failing test's id or the last line of the output)."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *tests],
                                cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    lines = result.stdout.strip().splitlines()
    failed = [line.removeprefix("FAILED ") for line in lines if line.startswith("FAILED ")]
    return result.returncode, (failed[0] if failed else (lines[-1] if lines else result.stderr.strip()[-300:]))


def apply(root: Path, m: Mutation) -> bool:
    """Patch the copy; False if the text to replace is not in the file exactly once."""
    path = root / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        return False
    path.write_text(text.replace(m.old, m.new))
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worktree", action="store_true", help="mutate the working tree as it is, not git HEAD")
    ap.add_argument("--only", default=None, help="only the mutations whose name contains this text")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or args.only in m.name]
    if not chosen:
        sys.exit(f"mutations: no mutation's name contains {args.only!r}")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        copy_tree(base, args.worktree)
        where = subprocess.run([sys.executable, "-c", "import offload, quant; print(offload.__file__, quant.__file__)"],
                               cwd=base, env={**os.environ, "PYTHONPATH": str(base)}, capture_output=True, text=True)
        if not all(p.startswith(str(base)) for p in where.stdout.split()) or where.returncode:
            sys.exit(f"mutations: the copy does not import its own packages: {where.stdout}{where.stderr}")
        print(f"{'HEAD' if not args.worktree else 'working tree'} of {REPO}, copied to {base}", flush=True)
        for tests in dict.fromkeys(m.tests for m in chosen):
            status, last = pytest(base, tests, args.timeout)
            if status != 0:
                sys.exit(f"mutations: the unmutated tests fail ({' '.join(tests)}): {last}")
        print("unmutated: every named test passes", flush=True)
        results = []
        for m in chosen:
            root = Path(tmp) / "mutant"
            shutil.copytree(base, root)
            start = time.perf_counter()
            if not apply(root, m):
                verdict, detail = "STALE", f"the text to replace is not in {m.path} exactly once"
            else:
                status, detail = pytest(root, m.tests, args.timeout)
                verdict = "caught" if status == 1 else ("NOT CAUGHT" if status == 0 else f"ERROR (pytest exit {status})")
            shutil.rmtree(root)
            results.append(verdict)
            print(f"[item {m.item:>2}] {m.name:<66} {verdict:<10} {time.perf_counter() - start:5.0f} s  {detail}",
                  flush=True)
    caught = results.count("caught")
    print(f"\n{caught} of {len(results)} mutations caught")
    sys.exit(0 if caught == len(results) else 1)


if __name__ == "__main__":
    main()
