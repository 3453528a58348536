"""runtime.fused against runtime.model's torch expressions (the CPU's path), on fresh random data: in Triton's CPU
interpreter without a GPU (conftest sets TRITON_INTERPRET), compiled on one. Norms and rotations to float32
rounding (1e-5 relative); the router's choice exactly (same experts, same order) and its weights to 1e-5, at
DeepSeek-V3's shape (256 experts in 8 groups, best 4 groups, top 8), the fixture's (16 in 4, best 2, top 4) and one
without groups and a top-k that is no power of two (64, top 6).
"""
import types

import pytest
import torch

from runtime import fused
from runtime import model as M

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_rms_norm_any_input_dtype_and_rows():
    x = torch.randn(5, 3, 576) * 3
    w = torch.rand(576) + 0.5
    for dt in (torch.float32, torch.bfloat16):
        got = fused.rms_norm(x.to(dt).to(DEV), w.to(DEV), 1e-6).cpu()
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert rel(got, M.rms_norm(x.to(dt), w, 1e-6)) < 1e-5


def test_add_rms_norm_returns_the_sum_and_its_norm():
    x, r, w = torch.randn(4, 7168), torch.randn(4, 7168).to(torch.bfloat16), torch.rand(7168) + 0.5
    s, n = fused.add_rms_norm(x.to(DEV), r.to(DEV), w.to(DEV), 1e-6)
    ref_s, ref_n = M.add_rms_norm(x, r, w, 1e-6)                     # CPU tensors: the torch expressions
    assert s.dtype == n.dtype == torch.float32
    assert torch.equal(s.cpu(), ref_s) and rel(n.cpu(), ref_n) < 1e-5


def test_rope_on_a_strided_slice_of_heads():
    T, H = 6, 13                                                    # heads over two programs
    q = torch.randn(T, H, 96)
    freqs = torch.polar(torch.ones(T, 16), torch.rand(T, 16) * 6)
    ref = M.apply_rope(q[..., 64:], freqs)
    got = fused.rope(q.to(DEV)[..., 64:], freqs.to(DEV)).cpu()        # the q_pe view: strides of the whole q
    assert got.shape == ref.shape and rel(got, ref) < 1e-5
    got16 = fused.rope(q.to(DEV)[..., 64:], freqs.to(DEV), torch.bfloat16).cpu()
    assert got16.dtype == torch.bfloat16     # within a bf16 step (Triton's interpreter truncates, GPUs round)
    assert ((got16.float() - got).abs() <= got.abs() * 2 ** -7).all()
    k = torch.randn(T, 80)
    assert rel(fused.rope(k.to(DEV)[:, 48:], freqs.to(DEV)).cpu(), M.apply_rope(k[:, 48:], freqs)) < 1e-5


@pytest.mark.parametrize("slots", ["one", "per_row"])
def test_cache_write_equals_norm_rope_and_index_put(slots):
    T, L, R, N, S = 5, 64, 16, 3, 40
    kv = torch.randn(T, L + R) * 2
    norm = torch.rand(L) + 0.5
    freqs = torch.polar(torch.ones(T, R // 2), torch.rand(T, R // 2) * 6)
    pos = torch.randperm(S)[:T]
    sl = 1 if slots == "one" else torch.randint(0, N, (T,))
    where = (torch.full_like(pos, sl) if slots == "one" else sl, pos)
    ref_kv, ref_pe = torch.zeros(N, S, L, dtype=torch.bfloat16), torch.zeros(N, S, R, dtype=torch.bfloat16)
    ref_kv.index_put_(where, M.rms_norm(kv[:, :L], norm, 1e-6).to(torch.bfloat16))
    ref_pe.index_put_(where, M.apply_rope(kv[:, L:], freqs).to(torch.bfloat16))
    got_kv, got_pe = ref_kv.new_zeros(ref_kv.shape).to(DEV), ref_pe.new_zeros(ref_pe.shape).to(DEV)
    fused.cache_write(kv.to(DEV), norm.to(DEV), 1e-6, freqs.to(DEV), sl if slots == "one" else sl.to(DEV),
                      pos.to(DEV), got_kv, got_pe)
    # bf16 rounding of float32 values that differ in the last bits: at most one bf16 step apart
    assert (got_kv.cpu().float() - ref_kv.float()).abs().max() <= ref_kv.float().abs().max() * 2 ** -7
    assert (got_pe.cpu().float() - ref_pe.float()).abs().max() <= ref_pe.float().abs().max() * 2 ** -7
    written = torch.zeros(N, S, dtype=torch.bool)
    written[where] = True
    assert not got_kv.cpu()[~written].any() and not got_pe.cpu()[~written].any()


@pytest.mark.parametrize("E,G,TG,K", [(256, 8, 4, 8), (16, 4, 2, 4), (64, 1, 1, 6)])
def test_route_picks_the_same_experts_as_the_torch_router(E, G, TG, K):
    T, dim = 33, 64
    a = types.SimpleNamespace(n_groups=G, topk_groups=TG, top_k=K, route_scale=2.5)
    moe = types.SimpleNamespace(a=a, router=torch.randn(E, dim), bias=torch.randn(E) * 0.1)
    x = torch.randn(T, dim)
    ids, w = M.MoE.route(moe, x)                                     # CPU tensors: the torch router
    logits = torch.nn.functional.linear(x, moe.router)
    gids, gw = fused.route(logits.to(DEV), moe.bias.to(DEV), G, TG, K, 2.5)
    assert gids.dtype == torch.long and torch.equal(gids.cpu(), ids)
    assert rel(gw.cpu(), w) < 1e-5


def test_route_refuses_what_is_not_a_routing():
    with pytest.raises(ValueError, match="of 12 experts in 5 groups"):
        fused.route(torch.zeros(1, 12, device=DEV), torch.zeros(12, device=DEV), 5, 1, 4, 1.0)
    with pytest.raises(ValueError, match="top 9 of 16 experts in 4 groups"):
        fused.route(torch.zeros(1, 16, device=DEV), torch.zeros(16, device=DEV), 4, 2, 9, 1.0)
