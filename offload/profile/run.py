"""`moe-offload profile`: load a model, generate with the profiler attached, write the record, the trace
and the plots into one folder, all at once when they are done."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from quant.errors import UserError
from quant.files import work_folder

from .. import runtime
from ..generate import Sampling
from . import plots, trace
from .profiler import Profiler, Span
from .record import build_record, measure_h2d
from .schema import load_schema, schema_errors

DEFAULT_PROMPT = "The for statement"


@dataclass
class Profile:
    """What a profiled run produced: the profile.json record and the trace spans."""

    record: dict
    spans: list[Span]
    files: list[Path] = field(default_factory=list)


def profile_runtime(rt, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                    prompt: str = "", bandwidth: float | None = None) -> Profile:
    """Generate with the profiler attached; tokens are the same as `rt.generate_ids` would give.

    `bandwidth` (bytes/s) is the host->device bandwidth of the transfer bound; default: measured here."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    prof = Profiler(rt)
    probe = bandwidth or measure_h2d(rt.store)
    rt.store.reset_stats()  # counters from zero now (generate_ids resets them too, after begin() has read them)
    rt.store.profiler = prof
    try:
        prof.begin()
        for token in rt.generate_ids(prompt_ids, max_new_tokens, sampling):
            prof.end_token(token)
        if len(prof.tokens) < max_new_tokens:
            prof.end_token(None)  # it stopped at end-of-sequence: that step's forward pass is a row too
        prof.finish()
    finally:
        rt.store.profiler = None
    return Profile(build_record(rt, prof, prompt, prompt_ids, probe), prof.spans)


ARTIFACTS = ("profile.json", "trace.json", "latency.png", "layers.png", "breakdown.png", "memory.png")


def write(result: Profile, out: Path) -> list[Path]:
    """Write profile.json (checked against the schema first), trace.json and the plots into `out`.

    They are written into a hidden folder inside `out` and moved into place only once all are done: a run
    stopped while writing (Ctrl-C, a full disk) leaves `out` as it was, never half of one profile beside
    half of another. In a folder whose profile.json is an earlier profile, its files are replaced; in any
    other, a file of one of those names stops the run (`check_replaceable`)."""
    errors = schema_errors(result.record, load_schema())
    if errors:  # a bug, not a user error: the record and its schema disagree
        raise ValueError("profile record does not match offload/profile/schema.json: " + "; ".join(errors[:5]))
    make_out_dir(out)
    check_replaceable(out)
    try:
        tmp = work_folder(out / "profile")  # out/.profile.tmp-PID: on out's filesystem, so each move is a rename
        try:
            path = tmp / "profile.json"
            path.write_text(json.dumps(result.record, indent=1))
            written = [path, trace.write_trace(result.spans, result.record, tmp / "trace.json"),
                       *plots.write_plots(result.record, tmp)]
            # profile.json last: it is what marks the folder's files as a profile's (`check_replaceable`).
            for f in sorted(written, key=lambda f: f.name == "profile.json"):
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write the profile ({exc.strerror or exc})") from None
    result.files = [out / f.name for f in written]
    return result.files


def check_replaceable(out: Path) -> None:
    """Refuse to overwrite a file in `out` that has an artifact's name but is not from a profile: a profile
    folder is one whose profile.json is a moe-offload profile (or that holds none of the names)."""
    present = [name for name in ARTIFACTS if (out / name).exists()]
    if not present:
        return
    try:
        ours = json.loads((out / "profile.json").read_text()).get("schema", "").startswith("moe-offload-profile")
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"--out {out}: holds {present[0]}, which is not from a moe-offload profile; choose another "
                        f"--out (a profile replaces only its own files)")


def make_out_dir(out: Path) -> None:
    """Create the output folder, or say in one line why it cannot be one."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None


def profile(model: str | None, prompt: str = DEFAULT_PROMPT, out: str | Path = "profile", max_new_tokens: int = 32,
            sampling: Sampling = Sampling(), chat: bool = False, device: str = "auto", dtype: str = "auto",
            context: int = 2048, **store_options) -> Profile:
    """Load MODEL, generate from PROMPT with timing on, and write the artifacts into OUT."""
    if max_new_tokens < 1:  # before loading, which can read every expert
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not str(out).strip():  # Path("") is the current folder: the files would land there unasked
        raise UserError("--out is empty; name the folder for the profile (e.g. --out prof)")
    out = Path(out)
    made = not out.exists()
    make_out_dir(out)  # before the run: a bad --out must not cost a generation
    check_replaceable(out)
    try:
        rt = runtime.load(model, device=device, dtype=dtype, context=context, **store_options)
        try:
            result = profile_runtime(rt, rt.encode(prompt, chat), max_new_tokens, sampling, prompt=prompt)
        finally:
            rt.close()
        write(result, out)
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed leaves no empty folder it made behind
        raise
    return result
