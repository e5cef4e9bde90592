"""cli/errors.py: the GPU running out of memory is one line and exit status 2, however torch reports it."""

from __future__ import annotations

import pytest
import torch
import typer

from cli.errors import user_errors

# What torch raises when memory runs out below its caching allocator, as the messages read in torch 2.5-2.13.
DRIVER_LEVEL = {
    "CUDA error: out of memory": "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at "
                                 "some other API call, so the stacktrace below might be incorrect.\nFor debugging "
                                 "consider passing CUDA_LAUNCH_BLOCKING=1\nCompile with `TORCH_USE_CUDA_DSA` to enable "
                                 "device-side assertions.\n",
    "CUBLAS_STATUS_ALLOC_FAILED": "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cublasCreate": "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`",
    "CUDA driver error": "CUDA driver error: out of memory",
    "Triton": "Triton Error [CUDA]: out of memory",
}


def fail_with(exc: BaseException):
    @user_errors
    def command():
        raise exc

    return command


@pytest.mark.parametrize("name", sorted(DRIVER_LEVEL))
def test_a_driver_level_out_of_memory_is_one_line_and_exit_2(name, capsys):
    accelerator_error = getattr(torch, "AcceleratorError", RuntimeError)  # what newer torch raises for CUDA errors
    for kind in {RuntimeError, accelerator_error}:
        with pytest.raises(typer.Exit) as exit_:
            fail_with(kind(DRIVER_LEVEL[name]))()
        assert exit_.value.exit_code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("moe-offload: error: ")
        assert DRIVER_LEVEL[name].splitlines()[0] in err and "lower --vram or --context" in err


def test_the_allocators_out_of_memory_keeps_its_first_two_sentences(capsys):
    exc = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                      "of 23.64 GiB of which 1.19 GiB is free. Of the allocated memory ...")
    with pytest.raises(typer.Exit) as exit_:
        fail_with(exc)()
    assert exit_.value.exit_code == 2
    assert capsys.readouterr().err == ("moe-offload: error: CUDA out of memory. Tried to allocate 2.00 GiB; "
                                       "lower --vram or --context\n")


@pytest.mark.parametrize("exc", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                 RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("out of memory")])
def test_other_errors_are_bugs_and_keep_their_traceback(exc):
    with pytest.raises(type(exc)):
        fail_with(exc)()
