"""`moe-offload lut ...`: Mixture-of-Lookup-Experts commands. Thin: parse, call lut, print."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.errors import user_errors


lut_app = typer.Typer(no_args_is_help=True, help="Mixture of Lookup Experts: turn a MoLE checkpoint's experts "
                                                 "into per-token lookup tables the runtime serves from RAM or disk.")


@lut_app.command()
@user_errors
def build(
    src: Path = typer.Argument(..., help="MoLE checkpoint folder (config.json with model_type 'mole')."),
    dst: Path = typer.Argument(..., help="Table model folder to write (served by `moe-offload generate DST`)."),
    bits: int = typer.Option(16, "--bits", help="Row storage: 16 (float16), 8, 4, 3 or 2 (quantized group-wise "
                                                "through quant.quantize), 32 (float32: exact)."),
    group_size: int = typer.Option(0, "--group-size", help="Values per scale and zero for quantized rows (0: 64, or "
                                                           "the whole row when d is not a multiple of 64)."),
    batch_mem: str = typer.Option("256MiB", "--batch-mem", help="Working memory per batch of token ids (the tables do not depend on it)."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it is an earlier table folder (or a symlink)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Compute every expert's output for every token id and write the table model folder DST."""
    from cli.progress import progress_bar
    from lut.build import build_tables
    from quant.units import parse_bytes

    with progress_bar("tables", unit="token ids", transient=True, disable=as_json) as progress:
        summary = build_tables(src, dst, bits=bits, group_size=group_size or None,
                               batch_bytes=parse_bytes(batch_mem, "--batch-mem"), force=force, progress=progress)
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"wrote {summary['dst']}: {summary['vocab']} ids x {summary['layers']} layers x "
                   f"{summary['experts']} experts x d {summary['hidden']} at {summary['bits']} bits = "
                   f"{summary['table_nbytes']:,} bytes of tables ({summary['record_nbytes']:,} per token), "
                   f"{summary['dense_nbytes']:,} dense, in {summary['seconds']:.1f}s")
