"""DeepSeek-V3 inference over a merged folder: MLA with a compressed KV cache, YaRN rope, sigmoid-routed MoE whose
routed experts run on the CPU through ggml's quantized kernels, straight from the folder's GGML bytes.

One file, the whole model, in the spirit of DeepSeek's own inference/model.py. Shapes: one sequence, T tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from runtime.experts import MoEExperts
from runtime.load import Folder, bf16, fp8_dequant


@dataclass
class Args:
    vocab: int
    dim: int
    n_layers: int
    n_dense: int
    n_heads: int
    q_lora: int
    kv_lora: int
    nope: int
    rope: int
    v_dim: int
    inter: int
    moe_inter: int
    n_experts: int
    top_k: int
    n_groups: int
    topk_groups: int
    route_scale: float
    eps: float
    theta: float
    rope_factor: float
    original_len: int
    beta_fast: float
    beta_slow: float
    mscale: float

    @classmethod
    def from_config(cls, c: dict) -> "Args":
        rs = c.get("rope_scaling") or {}
        return cls(vocab=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                   n_dense=c.get("first_k_dense_replace", 0), n_heads=c["num_attention_heads"],
                   q_lora=c.get("q_lora_rank") or 0, kv_lora=c["kv_lora_rank"], nope=c["qk_nope_head_dim"],
                   rope=c["qk_rope_head_dim"], v_dim=c["v_head_dim"], inter=c["intermediate_size"],
                   moe_inter=c["moe_intermediate_size"], n_experts=c["n_routed_experts"],
                   top_k=c["num_experts_per_tok"], n_groups=c.get("n_group", 1), topk_groups=c.get("topk_group", 1),
                   route_scale=c.get("routed_scaling_factor", 1.0), eps=c.get("rms_norm_eps", 1e-6),
                   theta=c.get("rope_theta", 10000.0), rope_factor=rs.get("factor", 1.0),
                   original_len=rs.get("original_max_position_embeddings", 4096), beta_fast=rs.get("beta_fast", 32),
                   beta_slow=rs.get("beta_slow", 1), mscale=rs.get("mscale_all_dim", 0.0))


def yarn_freqs(a: Args, max_len: int) -> torch.Tensor:
    """Complex rotations (max_len, rope/2) with YaRN: low frequencies interpolated by `factor`, high ones kept."""
    dim = a.rope
    freqs = 1.0 / (a.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if a.rope_factor > 1:
        corr = lambda rot: dim * math.log(a.original_len / (rot * 2 * math.pi)) / (2 * math.log(a.theta))
        low, high = max(math.floor(corr(a.beta_fast)), 0), min(math.ceil(corr(a.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs / a.rope_factor * ramp + freqs * (1 - ramp)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), freqs)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (T, ..., rope) with interleaved pairs (x0, x1), (x2, x3)... rotated by freqs (T, rope/2)."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    shape = (freqs.shape[0],) + (1,) * (z.dim() - 2) + (freqs.shape[1],)
    return torch.view_as_real(z * freqs.view(shape)).flatten(-2)


class Weights:
    """Tensors from the folder as torch: FP8 linears dequantized per 128x128 tile once (CPU path), the rest as is."""

    def __init__(self, folder: Folder, dtype=torch.bfloat16):
        self.f, self.dtype = folder, dtype

    def linear(self, name: str) -> torch.Tensor:
        w = self.f.raw(name)
        if self.f.tensors[name].dtype == "F8_E4M3":
            return fp8_dequant(w, self.f.raw(name + "_scale_inv")).to(self.dtype)
        return self.plain(name).to(self.dtype)

    def plain(self, name: str) -> torch.Tensor:
        t = self.f.tensors[name]
        a = self.f.raw(name)
        return bf16(a) if t.dtype == "BF16" else torch.from_numpy(np.array(a))


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w.to(x.dtype))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


class MLA:
    """Multi-head latent attention, absorbed form: the cache holds c_kv (kv_lora) + k_rope (rope) per token."""

    def __init__(self, a: Args, w: Weights, i: int, max_len: int):
        b = f"blk.{i}."
        self.a = a
        self.wq_a, self.q_norm = w.linear(b + "attn_q_a.weight"), w.plain(b + "attn_q_a_norm.weight")
        self.wq_b = w.linear(b + "attn_q_b.weight")
        self.wkv_a, self.kv_norm = w.linear(b + "attn_kv_a_mqa.weight"), w.plain(b + "attn_kv_a_norm.weight")
        kv_b = w.linear(b + "attn_kv_b.weight").view(a.n_heads, a.nope + a.v_dim, a.kv_lora)
        self.w_kb, self.w_vb = kv_b[:, :a.nope].float(), kv_b[:, a.nope:].float()
        self.wo = w.linear(b + "attn_output.weight")
        mscale = 0.1 * a.mscale * math.log(a.rope_factor) + 1.0 if a.rope_factor > 1 else 1.0
        self.scale = (a.nope + a.rope) ** -0.5 * mscale * mscale
        self.kv_cache = torch.zeros(max_len, a.kv_lora)
        self.pe_cache = torch.zeros(max_len, a.rope)

    def __call__(self, x: torch.Tensor, start: int, freqs: torch.Tensor) -> torch.Tensor:
        a, T = self.a, x.shape[0]
        end = start + T
        q = linear(rms_norm(linear(x, self.wq_a), self.q_norm, a.eps), self.wq_b).view(T, a.n_heads, -1)
        q_nope, q_pe = q.split([a.nope, a.rope], -1)
        q_pe = apply_rope(q_pe, freqs)
        kv = linear(x, self.wkv_a)
        c_kv, k_pe = kv.split([a.kv_lora, a.rope], -1)
        self.kv_cache[start:end] = rms_norm(c_kv, self.kv_norm, a.eps)
        self.pe_cache[start:end] = apply_rope(k_pe, freqs)
        q_lat = torch.einsum("thd,hdc->thc", q_nope.float(), self.w_kb)          # fold W_k into the query
        scores = (torch.einsum("thc,sc->ths", q_lat, self.kv_cache[:end]) +
                  torch.einsum("thr,sr->ths", q_pe, self.pe_cache[:end])) * self.scale
        if T > 1:
            causal = torch.ones(T, end, dtype=torch.bool).triu(start + 1)
            scores = scores.masked_fill(causal.unsqueeze(1), float("-inf"))
        o = torch.einsum("ths,sc->thc", scores.softmax(-1), self.kv_cache[:end])
        o = torch.einsum("thc,hdc->thd", o, self.w_vb)                            # and W_v into the output
        return linear(o.flatten(1), self.wo)


class MLP:
    def __init__(self, w: Weights, prefix: str, suffix: str = ""):
        self.gate, self.up, self.down = (w.linear(f"{prefix}{k}{suffix}.weight") for k in ("gate", "up", "down"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.silu(linear(x, self.gate)) * linear(x, self.up), self.down)


class MoE:
    """Sigmoid router with correction bias and group-limited top-k; routed experts on the CPU via ggml."""

    def __init__(self, a: Args, w: Weights, i: int, threads: int | None):
        b = f"blk.{i}."
        self.a = a
        self.router = w.plain(b + "ffn_gate_inp.weight").float()
        self.bias = w.plain(b + "exp_probs_b.bias").float()
        self.experts = MoEExperts.from_folder(w.f, i, threads=threads)
        self.shared = MLP(w, b + "ffn_", suffix="_shexp")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, T = self.a, x.shape[0]
        scores = torch.sigmoid(F.linear(x.float(), self.router))
        choice = scores + self.bias
        groups = choice.view(T, a.n_groups, -1).topk(2, dim=-1)[0].sum(-1)
        keep = groups.topk(a.topk_groups, dim=-1)[1]
        dropped = torch.ones(T, a.n_groups, dtype=torch.bool).scatter_(1, keep, False)
        choice = choice.view(T, a.n_groups, -1).masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        ids = choice.topk(a.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        weights = weights / weights.sum(-1, keepdim=True) * a.route_scale
        return ids, weights

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        routed = self.experts.forward(x.float().numpy(), ids.to(torch.int32).numpy(), weights.float().numpy())
        return torch.from_numpy(routed) + self.shared(x)


class Block:
    def __init__(self, a: Args, w: Weights, i: int, max_len: int, threads: int | None):
        b = f"blk.{i}."
        self.a = a
        self.attn_norm, self.ffn_norm = w.plain(b + "attn_norm.weight"), w.plain(b + "ffn_norm.weight")
        self.attn = MLA(a, w, i, max_len)
        self.ffn = MLP(w, b + "ffn_") if i < a.n_dense else MoE(a, w, i, threads)

    def __call__(self, x: torch.Tensor, start: int, freqs: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rms_norm(x, self.attn_norm, self.a.eps), start, freqs)
        return x + self.ffn(rms_norm(x, self.ffn_norm, self.a.eps))


class Transformer:
    def __init__(self, folder: Folder, max_len: int = 4096, threads: int | None = None):
        self.a = a = Args.from_config(folder.config)
        w = Weights(folder)
        self.max_len = max_len
        self.embed = w.plain("token_embd.weight")
        self.norm, self.head = w.plain("output_norm.weight"), w.linear("output.weight")
        self.layers = [Block(a, w, i, max_len, threads) for i in range(a.n_layers)]
        self.freqs = yarn_freqs(a, max_len)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits (T, vocab) float32 for `tokens` placed at positions start..start+T-1 (the cache holds 0..start-1)."""
        T = tokens.shape[0]
        if start + T > self.max_len:
            raise ValueError(f"context of {start + T} tokens exceeds the {self.max_len} this model was set up for")
        x = self.embed[tokens].float()
        freqs = self.freqs[start:start + T]
        for layer in self.layers:
            x = layer(x, start, freqs)
        return F.linear(rms_norm(x, self.norm, self.a.eps), self.head.float())
