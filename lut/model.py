"""The MoLE model (Mixture of Lookup Experts) and its dense / top-2 MoE baselines, for training and as the
oracle the table model is checked against.

One decoder layer, for hidden state x [T, D] of tokens with ids [T]:

    x = x + attn(norm1(x))                                   Mixtral attention (GQA, rotary, causal)
    h = norm2(x)
    ffn = "mole":  x + shared(h) + sum_j g_j(h) * expert_j(expert_norm(embed[ids]))
                   g = softmax(router(h)) over ALL N experts (no top-k); expert_j sees only the token's
                   raw embedding row, so after training it is a table [V, D]: `lut build` writes it out.
    ffn = "moe":   x + sum_{j in top-k} renormalized softmax(gate(h))_j * expert_j(h)     (Mixtral)
    ffn = "dense": x + ffn(h)

Every expert is a SiLU-gated FFN, w2(silu(w1 x) * w3 x). The experts of a layer are held stacked
([N, F, D]), so one batched matmul runs them all (gpt-fast's layout); the checkpoint names them one by one.

Checkpoint (model.safetensors + config.json, see lut/config.py), Hugging Face names for everything the
runtime's dense part reads, ours for the MoLE block:

    model.embed_tokens.weight                          [V, D]
    model.layers.i.input_layernorm.weight              [D]
    model.layers.i.self_attn.{q,k,v,o}_proj.weight     [H*Hd, D], [K*Hd, D], [K*Hd, D], [D, H*Hd]
    model.layers.i.post_attention_layernorm.weight     [D]
    model.layers.i.mole.shared.{w1,w3}.weight          [Fs, D]   (w2: [D, Fs])
    model.layers.i.mole.router.weight                  [N, D]
    model.layers.i.mole.expert_norm.weight             [D]
    model.layers.i.mole.experts.j.{w1,w3}.weight       [F, D]    (w2: [D, F])
    model.norm.weight                                  [D]
    lm_head.weight                                     [V, D]    (absent when tie_word_embeddings)

The baselines are written under Mixtral's names (`model.layers.i.block_sparse_moe.gate.weight`,
`...block_sparse_moe.experts.e.w1.weight`, model_type "mixtral"; dense = one expert, top-1, zero gate),
so the expert runtime serves them as it serves Mixtral.

Dimension legend: B batch, T tokens, D hidden, H query heads, K kv heads, Hd head dim, N experts,
F expert ffn, Fs shared ffn, U unique token ids, V vocab, L layers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quant.errors import UserError
from quant.files import save_tensors

from .config import MOLE_MODEL_TYPE, MoLEConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- the pieces shared with the table builder and the table store --------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with float32 statistics, as Mixtral (and offload's forward) computes it."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One SiLU-gated FFN: x [..., D]; w1, w3 [F, D]; w2 [D, F]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def expert_outputs(emb: torch.Tensor, norm: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """Every routed MoLE expert of one layer on embedding rows: emb [U, D]; w1, w3 [N, F, D]; w2 [N, D, F]
    -> [U, N, D]. This is what a table row holds: `lut build` calls it on every token id."""
    x = rms_norm(emb, norm, eps)                                     # [U, D]
    a = torch.einsum("ud,nfd->nuf", x, w1)
    b = torch.einsum("ud,nfd->nuf", x, w3)
    return torch.einsum("nuf,ndf->und", F.silu(a) * b, w2)           # [U, N, D]


def router_weights(h: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """MoLE's gate: softmax over all N experts (float32 statistics). h [..., D]; router [N, D] -> [..., N]."""
    return F.softmax(F.linear(h, router), dim=-1, dtype=torch.float32).to(h.dtype)


def mix(shared: torch.Tensor, gates: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """shared(h) + sum_j g_j * expert_j: shared [..., D], gates [..., N], rows [..., N, D] -> [..., D]."""
    return shared + (gates.unsqueeze(-1) * rows).sum(-2)


def rope_tables(cfg: MoLEConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, Hd] ('rotate half' convention, as Mixtral)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


# ---- modules ----------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Full-sequence causal grouped-query attention (training and the oracle; the runtime has the KV cache)."""

    def __init__(self, cfg: MoLEConfig):
        super().__init__()
        self.cfg = cfg
        H, K, Hd, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(D, H * Hd, bias=False)
        self.k_proj = nn.Linear(D, K * Hd, bias=False)
        self.v_proj = nn.Linear(D, K * Hd, bias=False)
        self.o_proj = nn.Linear(H * Hd, D, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, Hd = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, H, Hd).transpose(1, 2)   # [B, H, T, Hd]
        k = self.k_proj(x).view(B, T, K, Hd).transpose(1, 2)   # [B, K, T, Hd]
        v = self.v_proj(x).view(B, T, K, Hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, Hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * Hd))


class Experts(nn.Module):
    """N SiLU-gated FFNs held stacked: w1, w3 [N, F, D]; w2 [N, D, F]."""

    def __init__(self, n: int, dim: int, ffn: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, ffn, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, ffn))
        self.w3 = nn.Parameter(torch.empty(n, ffn, dim))


class MoLEBlock(nn.Module):
    """Shared FFN on h + router-weighted sum of the N embedding-fed experts."""

    def __init__(self, cfg: MoLEConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = Experts(1, cfg.hidden_size, cfg.shared_intermediate_size)
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.expert_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.experts = Experts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, ids: torch.Tensor, embed: torch.Tensor):
        # The experts see only token ids, so run them once per distinct id in the batch and gather.
        uniq, inverse = torch.unique(ids, return_inverse=True)
        e = self.experts
        rows = expert_outputs(embed.index_select(0, uniq), self.expert_norm.weight, e.w1, e.w2, e.w3, self.cfg.rms_norm_eps)
        shared = swiglu(h, self.shared.w1[0], self.shared.w2[0], self.shared.w3[0])
        rows = rows.index_select(0, inverse.flatten()).view(*ids.shape, *rows.shape[1:])  # [B, T, N, D]
        return mix(shared, router_weights(h, self.router.weight), rows), h.new_zeros(())


class MoEBlock(nn.Module):
    """Mixtral's sparse block (top-k of N, renormalized) with the load-balancing loss; N=1, k=1 is dense."""

    def __init__(self, cfg: MoLEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, ids: torch.Tensor, embed: torch.Tensor):
        shape, N, k = h.shape, self.cfg.num_local_experts, self.cfg.num_experts_per_tok
        h = h.reshape(-1, shape[-1])                                       # [BT, D]
        e = self.experts
        if N == 1:
            return swiglu(h, e.w1[0], e.w2[0], e.w3[0]).view(shape), h.new_zeros(())
        probs = F.softmax(self.gate(h), dim=-1, dtype=torch.float32)       # [BT, N]
        weights, chosen = torch.topk(probs, k, dim=-1)                     # [BT, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(h.dtype)
        out = torch.zeros_like(h)
        for j in range(N):
            tok, slot = torch.where(chosen == j)
            if tok.numel():
                y = swiglu(h[tok], e.w1[j], e.w2[j], e.w3[j])
                out.index_add_(0, tok, y * weights[tok, slot, None])
        # Switch/Mixtral balancing: N * sum_j (share of picks to j) * (mean router prob of j); 1 when even.
        share = torch.bincount(chosen.flatten(), minlength=N).float() / chosen.numel()
        aux = N * (share * probs.mean(0)).sum()
        return out.view(shape), aux


class Layer(nn.Module):
    def __init__(self, cfg: MoLEConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.ffn == "mole":
            self.mole = MoLEBlock(cfg)
        else:
            self.block_sparse_moe = MoEBlock(cfg)

    def forward(self, x, ids, embed, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        ffn = self.mole if hasattr(self, "mole") else self.block_sparse_moe
        y, aux = ffn(self.post_attention_layernorm(x), ids, embed)
        return x + y, aux


class Backbone(nn.Module):
    def __init__(self, cfg: MoLEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MoLEForCausalLM(nn.Module):
    """The language model. `forward(ids [B, T])` -> (logits [B, T, V] float32, aux loss scalar)."""

    def __init__(self, cfg: MoLEConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "MoLEForCausalLM":
        """GPT-2 style: normal(0, std), output projections scaled by 1/sqrt(2L), norms 1, gates 0 for dense."""
        g = torch.Generator().manual_seed(seed)
        out_std = std / math.sqrt(2 * self.cfg.num_hidden_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    p.fill_(1.0)
                elif name.endswith("gate.weight") and self.cfg.ffn == "dense":
                    p.zero_()  # one expert: the gate's softmax is 1 whatever it holds
                elif name.endswith("o_proj.weight") or name.endswith(".w2"):
                    p.copy_(torch.randn(p.shape, generator=g) * out_std)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = ids.shape[-1]
        embed = self.model.embed_tokens.weight
        x = F.embedding(ids, embed)                                     # [B, T, D]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.model.layers:
            x, a = layer(x, ids, embed, cos, sin)
            aux = aux + a
        x = self.model.norm(x)
        head = embed if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head).float(), aux / self.cfg.num_hidden_layers

    def param_counts(self) -> dict[str, int]:
        """total, and active_per_token: the weights one token's forward multiplies by (attention, norms,
        the shared FFN and router for MoLE, k experts and the router for MoE, the FFN for dense, lm_head).
        Lookups are not multiplies: the embedding row, and MoLE's routed experts (with their expert_norm),
        which become table rows."""
        cfg = self.cfg
        L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
        total = sum(p.numel() for p in self.parameters())  # a tied lm_head is the embedding, counted once
        one_expert = 3 * D * cfg.intermediate_size
        routed = L * cfg.num_local_experts * one_expert
        if cfg.ffn == "mole":
            active = total - routed - L * D
        else:
            active = total - routed + L * cfg.num_experts_per_tok * one_expert
            if cfg.ffn == "dense":
                active -= L * D  # the unused [1, D] gate kept for the Mixtral layout
        if not cfg.tie_word_embeddings:
            active -= V * D  # the input embedding is a lookup; the separate lm_head is counted
        return {"total": total, "active_per_token": active, "experts_routed": routed,
                "table_values_per_token": L * cfg.num_local_experts * D if cfg.ffn == "mole" else 0}

    # ---- checkpoint names ----------------------------------------------------------------------

    def hub_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under their checkpoint names: stacked experts split one file entry per expert."""
        out = {}
        for name, t in self.state_dict().items():
            if name.endswith(("experts.w1", "experts.w2", "experts.w3", "shared.w1", "shared.w2", "shared.w3")):
                base, w = name.rsplit(".", 1)
                if base.endswith("shared"):
                    out[f"{base}.{w}.weight"] = t[0]
                else:
                    for j in range(t.shape[0]):
                        out[f"{base}.{j}.{w}.weight"] = t[j]
            else:
                out[name] = t
        return {k: v.contiguous() for k, v in out.items()}

    def load_hub_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Inverse of `hub_state_dict`; a missing or misshapen tensor is a UserError naming it."""
        state = {}
        for name, p in self.state_dict().items():
            if name.endswith(("experts.w1", "experts.w2", "experts.w3", "shared.w1", "shared.w2", "shared.w3")):
                base, w = name.rsplit(".", 1)
                names = [f"{base}.{w}.weight"] if base.endswith("shared") else \
                    [f"{base}.{j}.{w}.weight" for j in range(p.shape[0])]
                parts = [_need(tensors, n, tuple(p.shape[1:]), source) for n in names]
                state[name] = torch.stack(parts)
            else:
                state[name] = _need(tensors, name, tuple(p.shape), source)
        self.load_state_dict(state)


@torch.no_grad()
def windowed_nll(model: MoLEForCausalLM, stream: torch.Tensor, seq: int) -> float:
    """Mean next-token NLL (nats) over `stream` [N] cut into consecutive windows of `seq` tokens."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(stream) - 1, seq):
        window = stream[start:start + seq + 1]
        logits, _ = model(window[None, :-1])
        total += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
        count += len(window) - 1
    return total / count


def checkpoint_shapes(cfg: MoLEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of this config's checkpoint with its shape (from a weightless model)."""
    with torch.device("meta"):
        model = MoLEForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.hub_state_dict().items()}


def is_table_expert(name: str) -> bool:
    """The tensors `lut build` folds into the tables (and leaves out of the table folder)."""
    return ".mole.experts." in name or name.endswith(".mole.expert_norm.weight")


def _need(tensors: dict[str, torch.Tensor], name: str, shape: tuple, source: str) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise UserError(f"{source}: checkpoint has no tensor {name}")
    if tuple(t.shape) != shape:
        raise UserError(f"{source}: tensor {name} has shape {list(t.shape)}, config.json implies {list(shape)}")
    return t


# ---- save / load --------------------------------------------------------------------------------

def save_model(model: MoLEForCausalLM, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write config.json + model.safetensors (a MoLE checkpoint, or a Mixtral folder for the baselines)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = {v: k for k, v in DTYPES.items()}[dtype]
    tensors = {k: v.detach().to(dtype).cpu() for k, v in model.hub_state_dict().items()}
    save_tensors(tensors, folder / "model.safetensors")
    cfg = model.cfg.to_dict()
    cfg["torch_dtype"] = name
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_model(folder: Path, dtype: torch.dtype = torch.float32,
               model_types: tuple[str, ...] = (MOLE_MODEL_TYPE,)) -> MoLEForCausalLM:
    """Read a checkpoint written by `save_model` (model_type "mole"; add "mixtral" for our baselines)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = MoLEConfig.from_folder(folder, model_types)
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{path}: missing (a MoLE checkpoint is one model.safetensors file)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: unreadable safetensors file ({exc})") from None
    model = MoLEForCausalLM(cfg)
    model.load_hub_state_dict(tensors, str(path))
    return model.to(dtype).eval()
