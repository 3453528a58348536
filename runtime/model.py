"""DeepSeek-V3 inference over a merged folder: MLA with a compressed KV cache, YaRN rope, sigmoid-routed MoE whose
routed experts run on the CPU through ggml's quantized kernels, straight from the folder's GGML bytes.

One file, the whole model, in the spirit of DeepSeek's own inference/model.py. Shapes: one sequence, T tokens.

Devices. CPU: FP8 linears dequantized to bf16 once at load, float32 math. CUDA: everything but the routed experts
on the GPU (FP8 linears through runtime.fp8's block-scaled kernels, or bf16 weights on GPUs without FP8 tensor
cores), the residual stream in float32, the absorbed MLA weight products in bf16; the routed experts stay on the CPU
and the shared expert runs on the GPU meanwhile. Decode steps replay CUDA graphs (`GraphedDecode`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from runtime import fused, ggml_gpu
from runtime.attention import mla_attend
from runtime.experts import LayerExperts, setup_gpu
from runtime.fp8_quant import act_quant_reference, fake_act_quant  # noqa: F401  (FP8 numerics on the CPU)
from runtime.load import Folder, ModelError, bf16, fp8_dequant

# On the GPU, norms, rotary embeddings, the cache writes and the router's top-k take runtime.fused's kernels (a decode
# step is mostly launches); DSV3_FUSED=0 keeps the torch expressions below there too (benchmarks/decode_graph.py).
FUSED = os.environ.get("DSV3_FUSED", "1") != "0"


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


def apply_rope(x: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x (T, ..., rope) with interleaved pairs (x0, x1), (x2, x3)... rotated by freqs (T, rope/2), as dtype."""
    if x.is_cuda and FUSED:
        return fused.rope(x, freqs, dtype)
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    shape = (freqs.shape[0],) + (1,) * (z.dim() - 2) + (freqs.shape[1],)
    return torch.view_as_real(z * freqs.view(shape)).flatten(-2).to(dtype)


class Linear:
    """y = x @ W^T. FP8 weights with their tile scales go to runtime.fp8's kernels (bf16 out); bf16 weights are
    upcast per call on the CPU (float32 math) and used as they are on the GPU (bf16 out). `fake_quant`: round x and
    y as the FP8 kernels do (x to e4m3 per 128 group, y to bf16); set on FP8 layers by Transformer(emulate_fp8=True)
    to compare the FP8 path's numerics with the kernels'. `terms`: x in 1 or 2 e4m3 terms (runtime.fp8)."""

    fake_quant = False

    def __init__(self, w: torch.Tensor, scale: torch.Tensor | None = None, split: list[int] | None = None,
                 terms: int = 2):
        self.w, self.scale, self.split, self.terms = w, scale, split, terms

    def __call__(self, x: torch.Tensor):
        if self.fake_quant:
            x = fake_act_quant(x, self.terms)
        if self.scale is not None:
            from runtime.fp8 import fp8_linear
            y = fp8_linear(x, self.w, self.scale, self.terms)
        elif x.is_cuda:
            y = F.linear(x.to(self.w.dtype), self.w)
        else:
            y = F.linear(x, self.w.to(x.dtype))
        if self.fake_quant:
            y = y.to(torch.bfloat16).float()
        return y.split(self.split, -1) if self.split else y


class Weights:
    """Tensors from the folder as torch on `device`. FP8 linears: kept FP8 where `fp8` (GPU kernels, activations
    in `act_terms` e4m3 terms), else dequantized per 128x128 tile to bf16 once at load. The rest as stored."""

    def __init__(self, folder: Folder, device: torch.device = torch.device("cpu"), fp8: bool = False,
                 emulate_fp8: bool = False, act_terms: int = 2):
        self.f, self.device, self.fp8, self.emulate_fp8, self.act_terms = folder, device, fp8, emulate_fp8, act_terms

    def linear(self, *names: str) -> Linear:
        """One Linear; several names sharing an input are fused along N (outputs come back split)."""
        rows = [self.f.tensors[n].shape[0] for n in names]
        split = rows if len(names) > 1 else None
        is_fp8 = [self.f.tensors[n].dtype == "F8_E4M3" for n in names]
        if self.fp8 and all(is_fp8) and all(r % 128 == 0 for r in rows[:-1]):   # scale tiles line up when fused
            w = torch.cat([torch.from_numpy(np.array(self.f.raw(n))) for n in names]).view(torch.float8_e4m3fn)
            s = torch.cat([torch.from_numpy(np.array(self.f.raw(n + "_scale_inv"))) for n in names])
            return Linear(w.to(self.device), s.float().to(self.device), split, self.act_terms)
        lin = Linear(torch.cat([self.bf16(n) for n in names]), None, split, self.act_terms)
        lin.fake_quant = self.emulate_fp8 and all(is_fp8)
        return lin

    def bf16(self, name: str) -> torch.Tensor:
        """A linear's weight as bf16 on the device: FP8 dequantized per 128x128 tile (on the CPU, once)."""
        if self.f.tensors[name].dtype == "F8_E4M3":
            return fp8_dequant(self.f.raw(name), self.f.raw(name + "_scale_inv")).to(torch.bfloat16).to(self.device)
        return self.plain(name).to(torch.bfloat16)

    def plain(self, name: str) -> torch.Tensor:
        t = self.f.tensors[name]
        a = self.f.raw(name)
        return (bf16(a) if t.dtype == "BF16" else torch.from_numpy(np.array(a))).to(self.device)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after adding r, and its norm."""
    if x.is_cuda and FUSED:
        return fused.add_rms_norm(x, r, w, eps)
    x = x + r
    return x, rms_norm(x, w, eps)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda and FUSED:
        return fused.rms_norm(x, w, eps)
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


class MLA:
    """Multi-head latent attention, absorbed form: the cache holds c_kv (kv_lora) + k_rope (rope) per token, per
    slot (one sequence each): (slots, max_len, .) allocated once."""

    def __init__(self, a: Args, w: Weights, i: int, max_len: int, slots: int = 1):
        b = f"blk.{i}."
        self.a = a
        self.wqkv_a = w.linear(b + "attn_q_a.weight", b + "attn_kv_a_mqa.weight")    # one input: one GEMM
        self.q_norm, self.kv_norm = w.plain(b + "attn_q_a_norm.weight"), w.plain(b + "attn_kv_a_norm.weight")
        self.wq_b = w.linear(b + "attn_q_b.weight")
        kv_b = w.bf16(b + "attn_kv_b.weight").view(a.n_heads, -1, a.kv_lora)     # absorbed: never a GEMM of its own
        self.dt = torch.bfloat16 if w.device.type == "cuda" else torch.float32    # weight products: tensor cores
        self.w_kb, self.w_vb = kv_b[:, :a.nope].to(self.dt), kv_b[:, a.nope:].to(self.dt)
        self.wo = w.linear(b + "attn_output.weight")
        mscale = 0.1 * a.mscale * math.log(a.rope_factor) + 1.0 if a.rope_factor > 1 else 1.0
        self.scale = (a.nope + a.rope) ** -0.5 * mscale * mscale
        self.kv_cache = torch.zeros(slots, max_len, a.kv_lora, dtype=self.dt, device=w.device)
        self.pe_cache = torch.zeros(slots, max_len, a.rope, dtype=self.dt, device=w.device)

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor | int, bound: int | None,
                 freqs: torch.Tensor) -> torch.Tensor:
        """Rows x (T, dim) at positions `pos` (T,) of `slots` (an int: all rows of one slot, a prefill chunk; or
        (T,): a decode step) attend over their slot's cache up to their own position. `bound`: pos + 1 at most,
        if the caller knows it (a decode graph's span)."""
        a, T = self.a, x.shape[0]
        q_a, kv = self.wqkv_a(x)
        q = self.wq_b(rms_norm(q_a, self.q_norm, a.eps)).view(T, a.n_heads, -1)
        q_nope, q_pe = q.split([a.nope, a.rope], -1)
        q_pe = apply_rope(q_pe, freqs, self.dt)                 # the kernels' dtype: no cast of their own
        c_kv, k_pe = kv.split([a.kv_lora, a.rope], -1)
        if x.is_cuda and FUSED:
            fused.cache_write(kv, self.kv_norm, a.eps, freqs, slots, pos, self.kv_cache, self.pe_cache)
        else:
            where = (slots, pos) if isinstance(slots, torch.Tensor) else (torch.full_like(pos, slots), pos)
            self.kv_cache.index_put_(where, rms_norm(c_kv, self.kv_norm, a.eps).to(self.dt))
            self.pe_cache.index_put_(where, apply_rope(k_pe, freqs).to(self.dt))
        o = mla_attend(q_nope, q_pe, self.kv_cache, self.pe_cache, slots, pos, self.w_kb, self.w_vb, self.scale,
                       bound)
        return self.wo(o.to(self.dt).flatten(1))


class MLP:
    def __init__(self, w: Weights, prefix: str, suffix: str = ""):
        self.gate_up = w.linear(f"{prefix}gate{suffix}.weight", f"{prefix}up{suffix}.weight")
        self.down = w.linear(f"{prefix}down{suffix}.weight")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down(F.silu(gate.float()) * up.float())


class MoE:
    """Sigmoid router with correction bias and group-limited top-k; routed experts through runtime.experts (ggml on
    the CPU, and on the GPU those placed there), the shared expert beside them on the model's device."""

    def __init__(self, a: Args, w: Weights, i: int, threads: int | None):
        b = f"blk.{i}."
        self.a = a
        self.router = w.plain(b + "ffn_gate_inp.weight").float()
        self.bias = w.plain(b + "exp_probs_b.bias").float()
        self.experts = LayerExperts.from_folder(w.f, i, threads=threads)
        self.shared = MLP(w, b + "ffn_", suffix="_shexp")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, T = self.a, x.shape[0]
        if x.is_cuda and FUSED:
            return fused.route(F.linear(x.float(), self.router), self.bias, a.n_groups, a.topk_groups, a.top_k,
                               a.route_scale)
        scores = torch.sigmoid(F.linear(x.float(), self.router))
        choice = scores + self.bias
        groups = choice.view(T, a.n_groups, -1).topk(2, dim=-1)[0].sum(-1)
        keep = groups.topk(a.topk_groups, dim=-1)[1]
        dropped = torch.ones(T, a.n_groups, dtype=torch.bool, device=x.device).scatter_(1, keep, False)
        choice = choice.view(T, a.n_groups, -1).masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        ids = choice.topk(a.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        weights = weights / weights.sum(-1, keepdim=True) * a.route_scale
        return ids, weights

    def __call__(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Rows x (T, dim) -> float32 (T, dim): a decode batch, or all rows of a prompt (a prefill moves each layer's
        expert bytes once, whatever T), the shared expert then `chunk` rows at a time (activations: chunk x inter)."""
        ids, weights = self.route(x)
        step = chunk or max(1, len(x))
        routed, shared = self.experts(x, ids, weights, lambda: torch.cat(
            [self.shared(x[a:a + step]).float() for a in range(0, len(x), step)]) if len(x) else x.new_zeros(x.shape))
        return routed + shared.float()

    def gpu_side(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Everything of the layer's FFN that runs on the GPU: the shared expert + the resident routed experts'
        share (no host sync: one CUDA graph in a decode step). float32 (rows, dim)."""
        shared = self.shared(x).float()
        resident = self.experts.gpu_part(x, ids, weights)
        return shared if resident is None else shared + resident


class Block:
    def __init__(self, a: Args, w: Weights, i: int, max_len: int, threads: int | None, slots: int = 1):
        b = f"blk.{i}."
        self.a = a
        self.attn_norm, self.ffn_norm = w.plain(b + "attn_norm.weight"), w.plain(b + "ffn_norm.weight")
        self.attn = MLA(a, w, i, max_len, slots)
        self.ffn = MLP(w, b + "ffn_") if i < a.n_dense else MoE(a, w, i, threads)

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, slots, bound: int | None,
                 freqs: torch.Tensor) -> torch.Tensor:
        x, h = add_rms_norm(x, self.attn(rms_norm(x, self.attn_norm, self.a.eps), pos, slots, bound, freqs),
                            self.ffn_norm, self.a.eps)
        return x + self.ffn(h)

    @torch.inference_mode()
    def prefill(self, x: torch.Tensor, pos: torch.Tensor, slot: int, chunk: int, freqs: torch.Tensor) -> None:
        """All rows x (T, dim) of one slot through this layer, in place: attention `chunk` rows at a time (each
        chunk writes its cache entries, then attends to them and to every earlier one), then the feed-forward: a
        MoE layer's routed experts for all T rows at once, the rest `chunk` rows at a time."""
        T, eps = len(x), self.a.eps
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            x[a:b] += self.attn(rms_norm(x[a:b], self.attn_norm, eps), pos[a:b], slot, int(pos[0]) + b, freqs[a:b])
        if isinstance(self.ffn, MoE):
            x += self.ffn(rms_norm(x, self.ffn_norm, eps), chunk)
        else:
            for a in range(0, T, chunk):
                x[a:a + chunk] += self.ffn(rms_norm(x[a:a + chunk], self.ffn_norm, eps))

    def before_experts(self, x, pos, slots, bound, freqs):
        """A MoE block up to its routed experts: (residual after attention, normed input, expert ids, weights)."""
        x, h = add_rms_norm(x, self.attn(rms_norm(x, self.attn_norm, self.a.eps), pos, slots, bound, freqs),
                            self.ffn_norm, self.a.eps)
        return (x, h) + self.ffn.route(h)


def cache_bytes(a: Args, tokens: int, element_bytes: int) -> int:
    """The compressed KV cache of `tokens` positions over all layers: (kv_lora + rope) values per token per layer."""
    return a.n_layers * tokens * (a.kv_lora + a.rope) * element_bytes


def prefill_reserve(a: Args, chunk: int, tokens: int = 0) -> int:
    """Bytes a prefill may take at once beside the cache: the prompt's residual stream and its normed copy (float32,
    tokens x dim, twice), and one chunk's activations: queries, accumulators and outputs (float32, rows x heads x
    kv_lora, a few of each), a block of scores, the MLP's; and the GPU experts' grouped GEMM's output, a row per token
    and expert (float32), for as many rows as take that path (the dense path, from DENSE_MIN_ROWS rows per expert
    on, needs none)."""
    gemm_rows = min(max(chunk, tokens), ggml_gpu.DENSE_MIN_ROWS * a.n_experts // a.top_k)
    return 2 * tokens * a.dim * 4 + chunk * (4 * a.n_heads * a.kv_lora + 8 * max(a.inter, a.moe_inter * a.top_k)
                                             + 16 * a.dim) * 4 + gemm_rows * a.top_k * a.dim * 4 + 4 * 4 * (1 << 24)


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


class Transformer:
    def __init__(self, folder: Folder, max_len: int = 4096, threads: int | None = None,
                 device: str | torch.device = "cpu", fp8: bool = False, emulate_fp8: bool = False,
                 act_terms: int = 2, slots: int = 1, chunk: int = 2048, gpu_memory: float | None = None):
        """`fp8`: FP8 linears stay FP8 and run on runtime.fp8's kernels, their inputs quantized to `act_terms` e4m3
        terms (1: DeepSeek's scheme; 2: also the remainder, ~7 bits); else they are dequantized to bf16 at load,
        and `emulate_fp8` rounds their inputs as the kernels would (the FP8 path's numerics, without the kernels).
        `slots` sequences of up to `max_len` positions each get a KV cache, planned up front: a context past the
        model's max_position_embeddings, or one whose cache would not fit the device's free memory, is refused
        (ModelError) before anything is loaded. Prompts are prefilled `chunk` tokens a pass. On a GPU, routed experts
        fill what is left of its memory (at most `gpu_memory` GiB in all for this process, if given; see
        runtime.experts.setup_gpu), and long prefill chunks stream the rest there."""
        self.a = a = Args.from_config(folder.config)
        self.device = torch.device(device)
        self.max_len, self.slots, self.chunk = max_len, slots, min(chunk, max_len)
        limit = folder.config.get("max_position_embeddings")
        if isinstance(limit, int) and max_len > limit:
            raise ModelError(f"a context of {max_len} tokens is past this model's limit of {limit} "
                             "(max_position_embeddings)")
        if slots < 1 or chunk < 1 or max_len < 1:
            raise ModelError(f"context {max_len}, slots {slots} and chunk {chunk} must all be at least 1")
        element = 2 if self.device.type == "cuda" else 4
        free = free_memory(self.device)
        if gpu_memory and self.device.type == "cuda":   # the cap covers the whole model (0: no resident experts)
            free = min(free, int(gpu_memory * 2**30))
        self.plan_check(free, element, weights=self.weight_bytes(folder, fp8))
        w = Weights(folder, self.device, fp8, emulate_fp8, act_terms)
        self.embed = w.plain("token_embd.weight")
        self.norm, self.head = w.plain("output_norm.weight"), w.linear("output.weight")
        self.layers = [Block(a, w, i, max_len, threads, slots) for i in range(a.n_layers)]
        self.freqs = yarn_freqs(a, max_len).to(self.device)
        self.graphs: GraphedDecode | None = None
        self.placement = None
        if self.device.type == "cuda":
            moe = {i: l.ffn.experts for i, l in enumerate(self.layers) if isinstance(l.ffn, MoE)}
            self.placement = setup_gpu(moe, folder, self.device, prefill_reserve(a, self.chunk, max_len),
                                       gpu_memory)

    def weight_bytes(self, folder: Folder, fp8: bool) -> int:
        """What the weights will take on the device: everything but the routed experts (which stay in the
        folder's memory map), FP8 at one byte where kept FP8, bf16 where dequantized, as stored otherwise."""
        if self.device.type != "cuda":
            return 0                         # the CPU path's weights are counted in the free memory as they load
        total = 0
        for name, t in folder.tensors.items():
            if "_exps." in name or name.endswith(".ggml_type"):
                continue
            widen = t.dtype == "F8_E4M3" and (not fp8 or "attn_kv_b" in name)   # dequantized to bf16 at load
            total += (t.end - t.begin) * (2 if widen else 1)
        return total

    def plan_check(self, free: int, element: int, weights: int = 0) -> None:
        """Refuse a context whose KV cache (and a prefill chunk's buffers) would not fit `free` bytes."""
        a = self.a
        need = cache_bytes(a, self.max_len * self.slots, element)
        reserve = prefill_reserve(a, self.chunk, self.max_len) + weights
        where = "GPU" if self.device.type == "cuda" else "machine"
        if reserve > free:
            raise ModelError(f"the weights ({weights / 2**30:.1f} GiB) and the prefill buffers of {self.chunk}-token "
                             f"chunks in a {self.max_len}-token context ({(reserve - weights) / 2**30:.1f} GiB) need "
                             f"more than the {free / 2**30:.1f} GiB the {where} has free; use a smaller chunk or "
                             "context")
        if need + reserve > free:
            per_token = cache_bytes(a, 1, element) * self.slots
            fits = max(0, (free - reserve) // per_token)
            raise ModelError(
                f"a context of {self.max_len} tokens x {self.slots} slot(s) needs {need / 2**30:.1f} GiB of KV "
                f"cache + {reserve / 2**30:.1f} GiB for weights and prefill buffers; the {where} has "
                f"{free / 2**30:.1f} GiB free: at most {fits} tokens per slot fit")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(rms_norm(x, self.norm, self.a.eps)).float()

    def _check_room(self, start: int, T: int) -> None:
        if start < 0 or start + T > self.max_len:
            raise ValueError(f"context of {start + T} tokens exceeds the {self.max_len} this model was set up for")

    @torch.inference_mode()
    def prefill_chunks(self, tokens: torch.Tensor, start: int = 0, slot: int = 0, all_logits: bool = True):
        """Prefill `tokens` at positions start.. of `slot` (whose cache holds 0..start-1); yields (first position,
        float32 CPU logits) per `chunk` rows: every row (all_logits), else only the last row, once. Layer by layer
        over the whole prompt (a layer's routed experts are fetched once for all its tokens, not once per chunk),
        each layer's attention and dense parts `chunk` rows at a time; the residual stream of the prompt (T x dim,
        float32) is the only tensor that grows with it."""
        T = tokens.shape[0]
        self._check_room(start, T)
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} of {self.slots}")
        if T == 0:
            return
        pos = torch.arange(start, start + T, device=self.device)
        x = self.embed[tokens.to(self.device)].float()
        freqs = self.freqs[start:start + T]
        for layer in self.layers:
            layer.prefill(x, pos, slot, self.chunk, freqs)
        if not all_logits:
            yield start + T - 1, self.logits(x[-1:]).cpu()
            return
        for a in range(0, T, self.chunk):
            yield start + a, self.logits(x[a:a + self.chunk]).cpu()

    def prefill(self, tokens: torch.Tensor, start: int = 0, slot: int = 0, all_logits: bool = False) -> torch.Tensor:
        """Logits (T, vocab) if all_logits, else (1, vocab) for the last token; see prefill_chunks."""
        parts = [lg for _, lg in self.prefill_chunks(tokens, start, slot, all_logits)]
        return torch.cat(parts) if all_logits else parts[-1]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One step of B sequences: row b is token tokens[b] at position pos[b] of slot slots[b] (distinct slots).
        Logits (B, vocab) float32 on the CPU. On a GPU the step replays CUDA graphs (captured per batch size and
        attention span on first use)."""
        tokens, pos, slots = (torch.as_tensor(t, dtype=torch.long).flatten() for t in (tokens, pos, slots))
        if not tokens.shape == pos.shape == slots.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)}, pos {tuple(pos.shape)}, slots {tuple(slots.shape)}")
        if len(tokens) and (int(pos.min()) < 0 or int(pos.max()) >= self.max_len):
            raise ValueError(f"positions {pos.tolist()} outside the context of {self.max_len}")
        if len(set(slots.tolist())) != len(slots) or int(slots.min()) < 0 or int(slots.max()) >= self.slots:
            raise ValueError(f"slots {slots.tolist()} must be distinct, in [0, {self.slots})")
        if self.device.type == "cuda":
            if self.graphs is None:
                self.graphs = GraphedDecode(self)
            return self.graphs(tokens, pos, slots).cpu()
        x = self.embed[tokens].float()
        freqs = self.freqs[pos]
        for layer in self.layers:
            x = layer(x, pos, slots, None, freqs)
        return self.logits(x).cpu()

    @torch.inference_mode()
    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy cache positions [0, n) of slot src into slot dst (a prefix computed once, reused)."""
        if n > self.max_len or not (0 <= src < self.slots and 0 <= dst < self.slots):
            raise ValueError(f"copy_prefix({src}, {dst}, {n}) with {self.slots} slots of {self.max_len}")
        if src != dst:
            for layer in self.layers:
                layer.attn.kv_cache[dst, :n] = layer.attn.kv_cache[src, :n]
                layer.attn.pe_cache[dst, :n] = layer.attn.pe_cache[src, :n]

    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Slot 0, every row's logits (T, vocab) float32 on the CPU; one token is a decode step."""
        if tokens.shape[0] == 1:
            self._check_room(start, 1)
            return self.decode(tokens, torch.tensor([start]), torch.tensor([0]))
        return self.prefill(tokens, start, 0, all_logits=True)


def decode_span(pos: int, max_len: int) -> int:
    """Cache positions a decode step at `pos` attends over (masked past pos): the next power of two above pos, at
    least 256, so that a step's attention costs what the context needs (within 2x), and a context of max_len
    tokens needs at most ceil(log2(max_len / 256)) + 1 sets of decode graphs."""
    return min(max_len, max(256, 1 << pos.bit_length()))


class GraphedDecode:
    """One decode step of B sequences as CUDA graphs, replayed: a graph per stretch of GPU work between two layers'
    routed experts (which run on the CPU), plus one per shared expert, launched before the CPU starts so that the
    two overlap. Attention runs over the first decode_span(max pos) cache positions of each row's slot, masked past
    its own position, so a set of graphs serves every step up to its span; tokens, positions and slots are device
    tensors the graphs read. Each (batch size, span) set is captured on first use, in its own memory pool."""

    def __init__(self, net: Transformer):
        self.net = net
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}   # B -> (tokens, pos, slots)
        self.sets: dict[tuple[int, int], tuple[list, torch.Tensor]] = {}             # (B, span) -> (steps, logits)

    def _capture_set(self, B: int, span: int) -> tuple[list, torch.Tensor]:
        net, pool = self.net, torch.cuda.graph_pool_handle()
        token, pos, slots = self.inputs[B]
        steps: list = []                          # graphs, and (moe, shared graph, h, ids, weights, routed)
        carry: tuple = ()
        for layer in net.layers:
            if isinstance(layer.ffn, MoE):
                x, h, ids, weights = self._capture(steps, pool, lambda c=carry, l=layer: l.before_experts(
                    self._resume(c, token), pos, slots, span, net.freqs[pos]))
                gpu_graph, gpu_side = self._graph(pool, lambda f=layer.ffn, h=h, i=ids, w=weights: f.gpu_side(h, i, w))
                routed = torch.zeros_like(x)
                steps.append((layer.ffn, gpu_graph, h, ids, weights, routed))
                carry = (x, gpu_side, routed)
            else:
                carry = (self._capture(steps, pool, lambda c=carry, l=layer: l(self._resume(c, token), pos, slots,
                                                                                 span, net.freqs[pos])),)
        return steps, self._capture(steps, pool, lambda c=carry: net.logits(self._resume(c, token)))

    def _resume(self, carry: tuple, token: torch.Tensor) -> torch.Tensor:
        """The residual stream where the last graph left it."""
        if not carry:
            return self.net.embed[token].float()
        if len(carry) == 1:
            return carry[0]
        x, shared, routed = carry
        return x + shared.float() + routed

    @staticmethod
    def _graph(pool, fn):
        side = torch.cuda.Stream()                # warm up (Triton compiles, allocators settle) off the capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            out = fn()
        return g, out

    def _capture(self, steps: list, pool, fn):
        g, out = self._graph(pool, fn)
        steps.append(g)
        return out

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        B, dev = len(tokens), self.net.device
        if B not in self.inputs:
            self.inputs[B] = tuple(torch.zeros(B, dtype=torch.long, device=dev) for _ in range(3))
        for buf, t in zip(self.inputs[B], (tokens, pos, slots)):
            buf.copy_(t)
        span = decode_span(int(pos.max()), self.net.max_len)
        if (B, span) not in self.sets:
            self.sets[(B, span)] = self._capture_set(B, span)
        steps, logits = self.sets[(B, span)]
        for step in steps:
            if isinstance(step, torch.cuda.CUDAGraph):
                step.replay()
                continue
            moe, gpu_graph, h, ids, weights, routed = step            # the CPU's experts land in `routed`
            moe.experts.cpu_part(h, ids, weights, gpu_graph.replay, out=routed)
        return logits
