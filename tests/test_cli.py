"""The command line as a user runs it: generate (text and --json), inspect, demo, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import offload
from conftest import REPO, inspect_json, make_checkpoint, run_cli


def test_generate_json_is_one_object_with_tokens_and_stats(tiny_checkpoint):
    result = run_cli("generate", tiny_checkpoint, "The quick brown fox", "--max-new-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)  # exactly one JSON object and nothing else on stdout
    assert set(record) == {"text", "tokens", "prompt_tokens", "stats"}
    assert len(record["tokens"]) == 12 and record["prompt_tokens"] > 1
    assert record["stats"]["device"] == "cpu"
    # The same greedy tokens through the Python API.
    rt = offload.load(tiny_checkpoint, device="cpu")
    text = "".join(rt.generate("The quick brown fox", max_new_tokens=12))
    assert rt.last["tokens"] == record["tokens"] and text == record["text"]


def test_a_prompt_of_dash_is_read_from_stdin(tiny_checkpoint):
    prompt = "The quick brown fox\njumps over the lazy dog"  # several lines, as from a file
    piped = run_cli("generate", tiny_checkpoint, "-", "-n", "6", "--json", stdin=prompt + "\n")
    given = run_cli("generate", tiny_checkpoint, prompt, "-n", "6", "--json")
    assert piped.returncode == given.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["tokens"] == json.loads(given.stdout)["tokens"]
    empty = run_cli("generate", tiny_checkpoint, "-", stdin="")
    assert empty.returncode == 2 and "the prompt is empty" in empty.stderr


def cli_bytes(*args: str, stdin: bytes = b"", stdout=subprocess.PIPE,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Like run_cli, in bytes (for input and output that are not UTF-8), with a stdout and environment to give."""
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, cwd=REPO, timeout=300, env=os.environ | (env or {}))


@pytest.mark.parametrize("env", [{}, {"PYTHONIOENCODING": "utf-8:strict"}])  # stdin decoding leniently, strictly
@pytest.mark.parametrize("command", ["generate", "profile"])
def test_a_prompt_on_stdin_that_is_not_utf8_is_one_line(tiny_checkpoint, tmp_path, command, env):
    out = ["--out", tmp_path / "prof"] if command == "profile" else []
    result = cli_bytes(command, tiny_checkpoint, "-", "-n", "2", *out, stdin=b"The quick \xff fox", env=env)
    err = result.stderr.decode()
    assert result.returncode == 2 and result.stdout == b"" and "Traceback" not in err
    assert err.startswith("moe-offload: error: the prompt is not valid UTF-8") and len(err.splitlines()) == 1


@pytest.mark.parametrize("args", [("generate", "{ckpt}", "The \udce9"), ("demo", "The \udce9", "-n", "2")])
def test_a_prompt_argument_that_is_not_utf8_is_one_line(tiny_checkpoint, args):
    result = run_cli(*(a.format(ckpt=tiny_checkpoint) for a in args))  # passed to the process as byte 0xe9
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr == "moe-offload: error: the prompt is not valid UTF-8 (at character 4); convert it to " \
                            "UTF-8 (e.g. iconv -t UTF-8)\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_full_stdout_is_one_line_not_a_traceback(tiny_checkpoint, json_flag):
    with open("/dev/full", "wb") as full:
        result = cli_bytes("generate", tiny_checkpoint, "The quick", "-n", "2", *json_flag, stdout=full)
    err = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in err
    assert err == "moe-offload: error: cannot write to stdout (No space left on device); free space there or " \
                  "redirect the output elsewhere\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [("inspect", "{ckpt}"), ("inspect", "{ckpt}", "--json"), ("--help",)])
def test_a_full_stdout_for_the_other_commands_is_one_line(tiny_checkpoint, args):
    with open("/dev/full", "wb") as full:
        result = cli_bytes(*(a.format(ckpt=tiny_checkpoint) for a in args), stdout=full)
    err = result.stderr.decode()
    assert result.returncode != 0 and "Traceback" not in err and len(err.splitlines()) <= 1


def test_a_stdout_that_cannot_encode_the_text_gets_replacements(tiny_checkpoint):
    result = cli_bytes("generate", tiny_checkpoint, "The café fox", "-n", "4", env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(b"The caf? fox")


def test_a_closed_pipe_ends_the_run_quietly(tiny_checkpoint):
    """`moe-offload generate ... | head`: once the reader has gone, stop without a word."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = cli_bytes("generate", tiny_checkpoint, "The quick", "-n", "4", stdout=write)
    finally:
        os.close(write)
    assert result.returncode == 1 and result.stderr == b""


def test_generate_streams_text(tiny_checkpoint):
    result = run_cli("generate", tiny_checkpoint, "Experts are", "-n", "8", "--temperature", "0.8", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Experts are") and "tok/s" in result.stderr


def test_chat_template_is_applied(tiny_checkpoint):
    rt = offload.load(tiny_checkpoint, device="cpu")
    plain, chat = rt.encode("fox"), rt.encode("fox", chat=True)
    assert rt.tokenizer.decode(chat).startswith("[INST] fox [/INST]") and chat[0] == 1 and chat != plain


def test_bfloat16_checkpoint_loads_and_generates(tmp_path):
    make_checkpoint(tmp_path, dtype=torch.bfloat16)
    result = run_cli("generate", tmp_path, "The lazy dog", "-n", "10", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["tokens"]) == 10
    result = run_cli("generate", tmp_path, "The lazy dog", "-n", "4", "--dtype", "bfloat16", "--json")
    assert result.returncode == 0, result.stderr


def test_inspect_counts_dense_and_expert_parameters(tiny_checkpoint):
    info = inspect_json(tiny_checkpoint)
    assert info["model_type"] == "mixtral"
    assert info["params_experts"] == 3 * 6 * 3 * 64 * 96
    assert info["bytes_per_expert"] == 3 * 64 * 96 * 4
    assert info["params_dense"] + info["params_experts"] == info["params_total"]


@pytest.mark.parametrize("args, needle", [
    (("generate", "/no/such/folder", "hi"), "no such model folder"),
    (("generate", "{ckpt}", ""), "prompt is empty"),
    (("generate", "{ckpt}", "hi", "--top-p", "0"), "--top-p"),
    (("generate", "{ckpt}", "hi", "--device", "tpu"), "--device"),
    (("generate", "{ckpt}", "hi", "-t", "nan"), "--temperature"),
    (("generate", "{ckpt}", "hi", "-n", "many"), "Invalid value for '--max-new-tokens'"),
    (("generate", "{ckpt}", "hi", "--bogus"), "No such option: --bogus (see 'moe-offload generate --help')"),
    (("convert", "{ckpt}"), "Missing argument 'dst'"),
    (("frobnicate",), "No such command 'frobnicate'"),
    (("inspect", "{ckpt}", "--bandwidth", "fast"), "--bandwidth 'fast' is not a size"),  # checked without --vram too
    (("inspect", "{ckpt}", "--hit-rate", "2"), "--hit-rate must be between 0 and 1"),
    (("inspect", "{ckpt}", "--bandwidth", ""), "--bandwidth '' is not a size"),
    (("inspect", "{ckpt}", "--device", "gpu"), "--device must be auto, cpu or cuda"),  # no plan asked for
    (("inspect", "{ckpt}", "--dtype", "int8"), "--dtype must be auto"),
    (("inspect", "{ckpt}", "--context", "-5"), "--context must be a positive number of tokens, got -5"),
    (("profile", "{ckpt}", "hi", "--out", ""), "--out is empty"),  # not the current folder
])
def test_bad_input_is_one_line_and_exit_2(tiny_checkpoint, args, needle):
    result = run_cli(*(a.format(ckpt=tiny_checkpoint) for a in args))
    assert result.returncode == 2
    assert needle in result.stderr and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_profile_out_that_is_a_file_is_refused_before_the_run_and_left_alone(tiny_checkpoint, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    result = run_cli("profile", tiny_checkpoint, "--out", target, "-n", "2", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"moe-offload: error: --out {target}: exists and is not a folder"
    assert target.read_text() == "my notes"


def test_running_out_of_gpu_memory_is_one_line_and_exit_2(capsys):
    import typer

    from cli.main import user_errors

    message = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which "
               "1.20 GiB is free. Including non-PyTorch memory, this process has 77.90 GiB memory in use.")

    @user_errors
    def load():
        raise torch.cuda.OutOfMemoryError(message)

    with pytest.raises(typer.Exit) as exit_:
        load()
    assert exit_.value.exit_code == 2
    err = capsys.readouterr().err
    assert err == "moe-offload: error: CUDA out of memory. Tried to allocate 2.00 GiB; lower --vram or --context\n"


def test_no_command_shows_the_help():
    result = run_cli()
    assert result.returncode == 0 and "Usage: moe-offload" in result.stdout and "generate" in result.stdout


# ---- sampling options through the command line -----------------------------------------------------------

def sampled_through_the_cli(folder, *options: str) -> tuple[list[int], list[torch.Tensor]]:
    """The tokens `generate --json` samples with `options`, and the model's logits [V] at each of those steps
    (teacher-forced through the Python API on the same tokens)."""
    from offload.generate import decode_one, prefill

    result = run_cli("generate", folder, "The quick brown fox", "-n", "12", "--json", *options)
    assert result.returncode == 0, result.stderr
    tokens = json.loads(result.stdout)["tokens"]
    rt = offload.load(folder, device="cpu", context=64)
    ids = rt.encode("The quick brown fox")
    logits = [prefill(rt.model, torch.tensor(ids))]
    for i, token in enumerate(tokens[:-1]):
        logits.append(decode_one(rt.model, token, len(ids) + i))
    return tokens, logits


def test_top_k_through_the_cli_draws_only_among_the_k_most_likely(tiny_checkpoint):
    tokens, logits = sampled_through_the_cli(tiny_checkpoint, "--temperature", "1.5", "--top-k", "3", "--seed", "4")
    assert all(t in logits[i].topk(3).indices.tolist() for i, t in enumerate(tokens))
    assert any(t != int(logits[i].argmax()) for i, t in enumerate(tokens))  # it sampled, it was not greedy


def test_top_p_through_the_cli_draws_only_from_the_nucleus(tiny_checkpoint):
    from test_generate import drawable

    tokens, logits = sampled_through_the_cli(tiny_checkpoint, "--temperature", "1.5", "--top-p", "0.5", "--seed", "4")
    nuclei = [drawable(torch.softmax(step.double(), -1).tolist(), 1.5, 0, 0.5) for step in logits]
    assert all(t in nucleus for t, nucleus in zip(tokens, nuclei))
    assert any(len(nucleus) > 1 for nucleus in nuclei) and any(t != int(step.argmax()) for t, step in zip(tokens, logits))


def test_the_seed_through_the_cli_gives_the_python_apis_tokens(tiny_checkpoint):
    from offload.generate import Sampling

    result = run_cli("generate", tiny_checkpoint, "The quick brown fox", "-n", "12", "--json", "--temperature", "1",
                     "--seed", "5")
    assert result.returncode == 0, result.stderr
    rt = offload.load(tiny_checkpoint, device="cpu")
    ids = rt.encode("The quick brown fox")
    assert json.loads(result.stdout)["tokens"] == list(rt.generate_ids(ids, 12, Sampling(temperature=1.0, seed=5)))
    assert json.loads(result.stdout)["tokens"] != list(rt.generate_ids(ids, 12, Sampling(temperature=1.0, seed=0)))
