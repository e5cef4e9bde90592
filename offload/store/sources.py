"""Where experts come from on disk, and how an expert blob is computed once it is in a tier.

A source reads expert (layer, e) into a blob buffer (a host slot) and knows the blob's layout and how to
run it, and how the folder stores its attention projections (`dense_format`: None for plain weights).
`CheckpointExperts` reads a Hugging Face checkpoint's separate w1/w2/w3 tensors (named by the model's
family); `FusedExperts` reads each expert's slice of tensors that hold a whole layer's experts (gpt-oss, float
or MXFP4 as shipped); `BlobFileExperts` reads whole quantized blobs written by `moe-offload convert`.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch

import quant
from quant import cpu_kernels, mxfp4
from quant import sparse as quant_sparse
from quant.blob import DTYPE_NAMES, BlobLayout
from quant.errors import UserError
from quant.files import pread_exactly

from ..formats.checkpoint import Checkpoint
from ..formats.converted import EXPERTS_FILE, FILE_HEADER, INFO_FILE, dense_format, read_experts_header, read_info
from ..models import expert_shapes, family
from ..models.moe import expert_ffn
from .predictor import FILE as PREDICTOR_FILE
from .predictor import NeuronPredictor

Key = tuple[int, int]  # (layer, expert)


class CheckpointExperts:
    """Reads unquantized experts from the Hugging Face shards into blob buffers (3 preads per expert)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype):
        cfg = ckpt.config
        ckpt.validate(expert_shapes(cfg))  # headers only: a folder missing experts fails here, naming the tensor
        self.ckpt, self.dtype = ckpt, dtype
        self.names = family(cfg).expert_names
        self.dense_format = None
        self.layout = BlobLayout.dense(cfg.hidden_size, cfg.intermediate_size, dtype)
        first = (cfg.moe_layers[0], 0)
        self.file_dtype = ckpt.locations[self.names(*first)[0]].dtype
        for key in ((i, e) for i in cfg.moe_layers for e in range(cfg.num_local_experts)):
            for name in self.names(*key):
                loc = ckpt.locations[name]
                if loc.dtype != self.file_dtype or not loc.dtype.is_floating_point:
                    raise UserError(f"{loc.file}: tensor {name} is {loc.dtype}; every expert weight must be a "
                                    f"float of one dtype (expert {first} is {self.file_dtype})")
        # Same dtype on disk as in compute: read straight into the blob. Otherwise stage and convert.
        self.direct = self.file_dtype == dtype

    def read_into(self, key: Key, blob: torch.Tensor) -> int:
        """Fill `blob` (a host slot, header already written) with expert `key`; returns bytes read from disk."""
        views = self.layout.views(blob)
        total = 0
        for part, name in zip(("w1", "w2", "w3"), self.names(*key)):
            rec = self.layout.record(part)
            if self.direct:
                self.ckpt.read_into(name, blob[rec.offset:rec.offset + rec.nbytes])
            else:
                views[part].copy_(self.ckpt.read(name))
            total += self.ckpt.locations[name].nbytes
        return total

    def compute(self, views: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if x.dtype == views["w1"].dtype and cpu_kernels.supports_half(x, x.dtype):  # bf16/fp16 on the CPU
            return cpu_kernels.hexpert(x, views["w1"], views["w2"], views["w3"])
        return expert_ffn(x, views["w1"].to(x.dtype), views["w2"].to(x.dtype), views["w3"].to(x.dtype))

    def expected_shapes(self) -> dict:
        """The tensors the experts are read from (the routers are the family's dense tensors)."""
        return expert_shapes(self.ckpt.config)


class FusedExperts:
    """Reads experts stored fused per layer ([E, ...] tensors: gpt-oss) into blob buffers: expert e's slice of
    each tensor, one pread per tensor, straight into the blob where the stored dtype is the blob's (MXFP4
    blocks and scales always: they are never widened on disk or in RAM)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype):
        cfg = ckpt.config
        ckpt.validate(expert_shapes(cfg))
        self.ckpt, self.dtype, self.family = ckpt, dtype, family(cfg)
        self.dense_format = None
        self.tensors = {i: self.family.expert_tensors(cfg, i) for i in cfg.moe_layers}
        first = self.tensors[cfg.moe_layers[0]]
        file_dtypes = {rec: ckpt.locations[name].dtype for rec, (name, _) in first.items()}
        self.layout = self.family.expert_layout(cfg, dtype, file_dtypes["gate_up.bias"])
        for names in self.tensors.values():
            for rec, (name, _) in names.items():
                loc = ckpt.locations[name]
                want = self.layout.record(rec).dtype
                if loc.dtype != file_dtypes[rec] or (want == "uint8") != (loc.dtype == torch.uint8):
                    raise UserError(f"{loc.file}: tensor {name} is {loc.dtype}; expected "
                                    f"{'uint8 (MXFP4)' if want == 'uint8' else 'a float'} of one dtype in every layer "
                                    f"(layer {cfg.moe_layers[0]} has {file_dtypes[rec]})")
        # Per record: read straight into the blob (same dtype on disk as in the blob) or stage and convert.
        self.direct = {rec: DTYPE_NAMES[file_dtypes[rec]] == self.layout.record(rec).dtype for rec in first}

    def read_into(self, key: Key, blob: torch.Tensor) -> int:
        """Fill `blob` (a host slot, header already written) with expert `key`; returns bytes read from disk."""
        layer, e = key
        views = self.layout.views(blob)
        total = 0
        for rec, (name, shape) in self.tensors[layer].items():
            r = self.layout.record(rec)
            loc = self.ckpt.locations[name]
            if self.direct[rec]:
                self.ckpt.read_slice_into(name, e, blob[r.offset:r.offset + r.nbytes])
            else:
                staged = torch.empty(loc.nbytes // loc.shape[0], dtype=torch.uint8)
                views[rec].copy_(self.ckpt.read_slice_into(name, e, staged).view(loc.dtype).view(shape))
            total += loc.nbytes // loc.shape[0]
        return total

    def compute(self, views: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self.family.expert_forward(self.layout, views, x)

    def expected_shapes(self) -> dict:
        return expert_shapes(self.ckpt.config)


class BlobFileExperts:
    """Reads quantized expert blobs from a converted folder's experts.bin: one pread per expert."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, info: dict):
        cfg = ckpt.config
        self.ckpt, self.dtype = ckpt, dtype
        self.dense_format = dense_format(info)
        self.path = ckpt.path / EXPERTS_FILE
        index = read_experts_header(self.path)
        # Blobs of the layers with experts only, in layer order: a model's dense layers have none.
        self.index_of = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        if (index["layers"], index["experts"]) != (len(cfg.moe_layers), cfg.num_local_experts):
            raise UserError(f"{self.path}: holds {index['layers']} x {index['experts']} experts, config.json says "
                            f"{len(cfg.moe_layers)} x {cfg.num_local_experts} (layers with experts x experts)")
        self.stride, self.base, self.experts = index["stride"], FILE_HEADER, index["experts"]
        with open(self.path, "rb") as f:
            f.seek(self.base)
            self.layout = BlobLayout.parse(f.read(65536), source=f"{self.path} (expert 0,0)")
        if self.layout.nbytes != index["blob_bytes"] or self.layout.nbytes > self.stride:
            raise UserError(f"{self.path}: blob size {self.layout.nbytes} does not match its index")
        expected = converted_layout(cfg, info["bits"], info["group_size"], info.get("sparse"))
        if self.layout != expected:
            raise UserError(f"{self.path}: blob layout does not match config.json and {info['bits']}-bit, "
                            f"group {info['group_size']} experts")
        self.header = self.layout.header()
        # Sparse experts may have neuron predictors (offload/store/predictor.py), which router-ahead prefetch uses.
        self.predictor = None
        if info.get("predictor") is not None:
            record = info["predictor"]
            if info.get("sparse") is None or not isinstance(record, dict) or record.get("file") != PREDICTOR_FILE:
                raise UserError(f"{ckpt.path / INFO_FILE}: field 'predictor' is {json.dumps(info['predictor'])}; this "
                                f"build reads neuron predictors of sparse experts from {PREDICTOR_FILE}")
            self.predictor = NeuronPredictor.load(ckpt.path, cfg)

    def read_into(self, key: Key, blob: torch.Tensor) -> int:
        layer, e = key
        offset = self.base + (self.index_of[layer] * self.experts + e) * self.stride
        pread_exactly(self.ckpt.fileno(self.path), memoryview(blob.numpy()), offset, self.path,  # closed with ckpt
                      f"expert {key}")
        # Every blob carries the same header; a mismatch means the file is corrupt at this expert.
        if bytes(blob[: len(self.header)].numpy()) != self.header:
            raise UserError(f"{self.path}: corrupt blob header at expert {key}")
        return blob.numel()

    def compute(self, views: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return quant.expert_forward(self.layout, views, x)

    def compute_group(self, views: list[dict[str, torch.Tensor]], xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """`compute` of several experts, expert i on xs[i], with the same results (the CPU kernels run a
        layer's quantized experts in one call)."""
        return quant.experts_forward(self.layout, views, xs)

    def expected_shapes(self) -> dict:
        """None: every expert is in experts.bin, whose header and layout were checked above."""
        return {}


def converted_layout(cfg, bits: int | str, group_size: int, sparse: dict | None = None) -> BlobLayout:
    """The blob layout `convert` writes for this config's experts: group-wise `bits`, or MXFP4 (a gpt-oss
    expert's fused gate_up and down with their biases, float32; any other family's w1, w2, w3); with `sparse`
    (the record's settings), sparse blobs: the up projection at `bits`, neuron chunks at its chunk_bits."""
    if sparse is not None:
        return quant_sparse.sparse_layout(cfg.hidden_size, cfg.intermediate_size, bits, group_size,
                                          sparse["chunk_bits"], group_size)
    if bits != "mxfp4":
        return quant.expert_layout(cfg.hidden_size, cfg.intermediate_size, bits, group_size)
    fam = family(cfg)
    if hasattr(fam, "expert_tensors"):
        return fam.expert_layout(replace(cfg, mxfp4=True), torch.float32, torch.float32)
    return mxfp4.expert_layout(cfg.hidden_size, cfg.intermediate_size)


def open_source(ckpt: Checkpoint, dtype: torch.dtype):
    """The expert source of a folder: quantized blobs if it was converted, else the checkpoint's tensors."""
    if (ckpt.path / INFO_FILE).is_file():
        return BlobFileExperts(ckpt, dtype, read_info(ckpt.path))
    if hasattr(family(ckpt.config), "expert_tensors"):
        return FusedExperts(ckpt, dtype)
    return CheckpointExperts(ckpt, dtype)
