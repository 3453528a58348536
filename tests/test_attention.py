"""runtime.attention against a plain full-softmax MLA in float64 (the non-absorbed form: per head keys
[W_kb c_kv, k_rope] and values W_vb c_kv), on small shapes with fresh random data: the torch path (the CPU's and
CI's), the Triton kernels in Triton's interpreter (without a GPU; conftest sets TRITON_INTERPRET) and compiled on a
GPU, the expanded prefill's piecewise merge (torch ops on the CPU, torch's flash kernel on a GPU), and the GPU's
dispatch with CUDA-graph capture and replay.

Several slots at different positions, positions on both sides of key-block and split boundaries, prefill chunks at
offset 0 and past it. bf16 cache and queries on the kernels' paths: held to 1e-2 relative error (bf16 operands).
"""
import pytest
import torch

from runtime import attention as A

CUDA = torch.cuda.is_available()
H, DL, DR, NOPE, VD = 4, 64, 16, 32, 32        # heads, kv_lora, rope, nope, v: small, as the interpreter needs
SCALE = (NOPE + DR) ** -0.5
# Small launch shapes, so that a few hundred keys cross many key blocks and splits.
TINY_DECODE = dict(A.DECODE, BLOCK_H=16, BLOCK_N=16, MIN_KEYS=32, WAVES=4, num_warps=4)
TINY_PREFILL = dict(A.PREFILL, ROWS=16, BLOCK_N=16, num_warps=4)


def case(slots, length, dtype, device="cpu", seed=None, heads=H):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    r = lambda *s, k=1.0: (torch.randn(*s, generator=g) * k).to(dtype).to(device)
    return dict(kv=r(slots, length, DL), pe=r(slots, length, DR), w_kb=r(heads, NOPE, DL, k=DL ** -0.5),
                w_vb=r(heads, VD, DL, k=DL ** -0.5), gen=g)


def queries(c, T, device, heads=H):
    g = c["gen"]
    return (torch.randn(T, heads, NOPE, generator=g).to(device) * 2,
            torch.randn(T, heads, DR, generator=g).to(device) * 2)


def reference(q_nope, q_pe, c, slots, pos):
    """Row t: softmax over keys 0..pos[t] of its slot, float64, non-absorbed."""
    d = lambda x: x.detach().cpu().double()
    kv, pe, w_kb, w_vb = d(c["kv"]), d(c["pe"]), d(c["w_kb"]), d(c["w_vb"])
    out = []
    for t, p in enumerate(pos.tolist()):
        s = slots if isinstance(slots, int) else int(slots[t])
        k = torch.cat([torch.einsum("sc,hdc->hsd", kv[s, :p + 1], w_kb),
                       pe[s, :p + 1].expand(w_kb.shape[0], -1, -1)], -1)              # (H, keys, nope + rope)
        v = torch.einsum("sc,hdc->hsd", kv[s, :p + 1], w_vb)
        q = torch.cat([d(q_nope[t]), d(q_pe[t])], -1)                                # (H, nope + rope)
        att = torch.softmax(torch.einsum("hd,hsd->hs", q, k) * SCALE, -1)
        out.append(torch.einsum("hs,hsd->hd", att, v))
    return torch.stack(out)


def rel(out, ref):
    assert not out.isnan().any()
    return float((out.cpu().double() - ref).norm() / ref.norm())


DECODE_POS = [0, 15, 16, 31, 32, 33, 100, 299]          # block edges (16) and split edges (32 keys a split)


def test_torch_path_decode_and_prefill(monkeypatch):
    monkeypatch.setattr(A, "KEY_BLOCK", 64)                # key blocks of 64: a few hundred keys cross several
    c = case(5, 300, torch.float32)
    slots = torch.tensor([4, 0, 2, 1, 3, 1, 2, 0])
    pos = torch.tensor(DECODE_POS)
    qn, qp = queries(c, len(pos), "cpu")
    out = A.mla_attend(qn, qp, c["kv"], c["pe"], slots, pos, c["w_kb"], c["w_vb"], SCALE)
    assert rel(out, reference(qn, qp, c, slots, pos)) < 1e-5
    for p0, T in [(0, 70), (130, 90)]:                   # a chunk at offset 0, one past a block edge
        qn, qp = queries(c, T, "cpu")
        pos = torch.arange(p0, p0 + T)
        out = A.mla_attend(qn, qp, c["kv"], c["pe"], 3, pos, c["w_kb"], c["w_vb"], SCALE, p0 + T)
        assert rel(out, reference(qn, qp, c, 3, pos)) < 1e-5


def _device():
    return "cuda" if CUDA else "cpu"                   # cpu: the kernels in Triton's interpreter


@pytest.mark.parametrize("keys_major", [False, True])
def test_decode_kernel_rows_at_own_slots_and_lengths(keys_major):
    dev = _device()
    cfg = dict(TINY_DECODE, KEYS_MAJOR=keys_major)
    c = case(4, 300, torch.bfloat16, dev)
    pos = torch.tensor(DECODE_POS, device=dev)
    slots = torch.tensor([3, 0, 2, 1, 0, 3, 2, 1], device=dev)
    qn, qp = queries(c, len(pos), dev)
    ref = reference(qn, qp, c, slots, pos)
    for bound in (300, 301 if dev == "cuda" else 300):
        splits = A.decode_splits(len(pos), H, bound, torch.device(dev), cfg)
        assert splits > 1
        out = A.decode_triton(qn, qp, c["kv"], c["pe"], slots, pos, c["w_kb"], c["w_vb"], SCALE, bound, cfg)
        assert rel(out, ref) < 1e-2, (bound, splits)


def test_decode_splits_past_a_rows_end(monkeypatch):
    """Whole key blocks a split can leave a row's last splits empty (260 keys in 8 splits: 6 of 48 keys): those
    write nothing, and the merge takes only the splits that hold keys (the partials are not initialized)."""
    dev = _device()
    monkeypatch.setattr(A, "_sms", lambda device: 8)
    cfg = dict(TINY_DECODE, WAVES=1)
    c = case(2, 300, torch.bfloat16, dev)
    pos, slots = torch.tensor([259], device=dev), torch.tensor([1], device=dev)
    qn, qp = queries(c, 1, dev)
    assert A.decode_splits(1, H, 300, torch.device(dev), cfg) == 8
    out = A.decode_triton(qn, qp, c["kv"], c["pe"], slots, pos, c["w_kb"], c["w_vb"], SCALE, 300, cfg)
    assert rel(out, reference(qn, qp, c, slots, pos)) < 1e-2


def test_decode_split_count_does_not_change_the_result():
    """A row's answer is the same whatever the launch's split count (a graph's span): only its own length counts."""
    dev = _device()
    c = case(2, 200, torch.bfloat16, dev)
    pos, slots = torch.tensor([150, 40], device=dev), torch.tensor([1, 0], device=dev)
    qn, qp = queries(c, 2, dev)
    ref = reference(qn, qp, c, slots, pos)
    one = dict(TINY_DECODE, WAVES=0)                      # one split
    many = dict(TINY_DECODE, WAVES=64)
    assert A.decode_splits(2, H, 200, torch.device(dev), one) == 1
    assert A.decode_splits(2, H, 200, torch.device(dev), many) == 7
    for cfg in (one, many):
        out = A.decode_triton(qn, qp, c["kv"], c["pe"], slots, pos, c["w_kb"], c["w_vb"], SCALE, 200, cfg)
        assert rel(out, ref) < 1e-2


def test_decode_merge_in_the_output_product():
    """Up to MERGE_VB_ROWS rows the splits are merged inside the W_vb product (merge_vb); the same rows (at block
    and split edges, several slots) through the separate merge and output product agree, and both match float64.
    The fused path keeps float32 where the separate one rounds the merged output and the product to bfloat16."""
    dev = _device()
    c = case(4, 300, torch.bfloat16, dev)
    pos = torch.tensor(DECODE_POS, device=dev)
    slots = torch.tensor([3, 0, 2, 1, 0, 3, 2, 1], device=dev)
    qn, qp = queries(c, len(pos), dev)
    ref = reference(qn, qp, c, slots, pos)
    outs = []
    for rows in (0, len(pos)):
        cfg = dict(TINY_DECODE, MERGE_VB_ROWS=rows, MERGE_VB_SPLITS=2, MERGE_VB_TILE=256)   # pieces of 16 values
        assert A.decode_splits(len(pos), H, 300, torch.device(dev), cfg) > 1
        outs.append(A.decode_triton(qn, qp, c["kv"], c["pe"], slots, pos, c["w_kb"], c["w_vb"], SCALE, 300, cfg))
    assert rel(outs[1], ref) < rel(outs[0], ref) < 1e-2
    assert rel(outs[1], outs[0].cpu().double()) < 1e-2


@pytest.mark.parametrize("p0,T,keys_major", [(0, 24, False), (37, 30, False), (37, 30, True)])
def test_prefill_kernel_chunk_with_offset(p0, T, keys_major):
    dev = _device()
    c = case(3, 128, torch.bfloat16, dev)
    qn, qp = queries(c, T, dev)
    pos = torch.arange(p0, p0 + T, device=dev)
    cfg = dict(TINY_PREFILL, KEYS_MAJOR=keys_major)
    out = A.prefill_triton(qn, qp, c["kv"], c["pe"], 2, pos, c["w_kb"], c["w_vb"], SCALE, cfg)
    assert rel(out, reference(qn, qp, c, 2, pos)) < 1e-2


@pytest.mark.parametrize("p0,T", [(0, 30), (37, 50), (64, 16)])
def test_expanded_prefill_in_pieces_merges_by_log_sum_exp(monkeypatch, p0, T):
    """prefill_sdpa's piecewise expansion (keys before the chunk in pieces, then the chunk's own, causal), merged
    by log-sum-exp; on the CPU each piece is torch ops, on a GPU torch's flash kernel (below)."""
    monkeypatch.setattr(A, "EXPAND_KEYS", 16)
    c = case(2, 128, torch.float32)
    qn, qp = queries(c, T, "cpu")
    out = A.prefill_sdpa(qn, qp, c["kv"], c["pe"], 1, p0 + T, c["w_kb"], c["w_vb"], SCALE)
    assert rel(out, reference(qn, qp, c, 1, torch.arange(p0, p0 + T))) < 1e-5


gpu = pytest.mark.skipif(not CUDA, reason="no CUDA GPU")


@gpu
@pytest.mark.parametrize("heads", [4, 128])
@pytest.mark.parametrize("p0,T", [(0, 300), (700, 256), (1000, 24)])
def test_gpu_prefill_both_forms(monkeypatch, heads, p0, T):
    """Flash attention on the expanded form (keys in pieces of 256) and the absorbed kernel (default launch
    shapes), and what mla_attend picks."""
    monkeypatch.setattr(A, "EXPAND_KEYS", 256)
    c = case(2, 1024 + 64, torch.bfloat16, "cuda", heads=heads)
    qn, qp = queries(c, T, "cuda", heads)
    pos = torch.arange(p0, p0 + T, device="cuda")
    ref = reference(qn, qp, c, 1, pos)
    sdpa = A.prefill_sdpa(qn, qp, c["kv"], c["pe"], 1, p0 + T, c["w_kb"], c["w_vb"], SCALE)
    tri = A.prefill_triton(qn, qp, c["kv"], c["pe"], 1, pos, c["w_kb"], c["w_vb"], SCALE)
    picked = A.mla_attend(qn, qp, c["kv"], c["pe"], 1, pos, c["w_kb"], c["w_vb"], SCALE, p0 + T)
    assert max(rel(sdpa, ref), rel(tri, ref), rel(picked, ref)) < 1e-2
    assert A._flash_error is None


@gpu
def test_gpu_decode_real_heads_in_a_graph():
    """128 heads (two head groups), default launch shapes; captured once with a span, replayed after the rows'
    positions and slots move (in place): equal to eager calls, and to the float64 reference."""
    L, B = 3000, 4
    c = case(B, L, torch.bfloat16, "cuda", heads=128)
    qn, qp = queries(c, B, "cuda", 128)
    pos = torch.tensor([5, 2047, 256, 1000], device="cuda")
    slots = torch.tensor([2, 0, 3, 1], device="cuda")
    args = lambda: (qn, qp, c["kv"], c["pe"], slots, pos, c["w_kb"], c["w_vb"], SCALE, L)
    A.mla_attend(*args())                                  # compile off the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = A.mla_attend(*args())
    for new_pos, new_slots in [([5, 2047, 256, 1000], [2, 0, 3, 1]), ([2999, 0, 31, 1500], [1, 3, 0, 2])]:
        pos.copy_(torch.tensor(new_pos))
        slots.copy_(torch.tensor(new_slots))
        g.replay()
        eager = A.mla_attend(*args())
        assert torch.equal(out, eager)
        assert rel(out, reference(qn, qp, c, slots, pos)) < 1e-2


@gpu
def test_gpu_decode_hopper_kernel_real_dims():
    """DeepSeek's latent dims (kv_lora 512, rope 64), 128 heads: runtime.attention_hopper's Gluon kernel (sm_90)
    and the Triton kernel against float64, rows at block and split edges, one at the cache tensor's very end (TMA
    reads zeros past it), a split count from a longer span than the rows need, splits past a row's end."""
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    S, L, Hr = 3, 4100, 128
    kv = torch.randn(S, L, 512, device="cuda", generator=g).to(torch.bfloat16)
    pe = torch.randn(S, L, 64, device="cuda", generator=g).to(torch.bfloat16)
    pos = torch.tensor([0, 63, 64, 255, 256, 1000, 3000, L - 1], device="cuda")
    slots = torch.tensor([0, 1, 2, 0, 1, 2, 0, S - 1], device="cuda")
    T = len(pos)
    q_lat = torch.randn(T, Hr, 512, device="cuda", generator=g).to(torch.bfloat16)
    q_rope = torch.randn(T, Hr, 64, device="cuda", generator=g).to(torch.bfloat16)
    scale = 0.05
    ref = []
    for t in range(T):
        k, r = kv[slots[t], :pos[t] + 1].double(), pe[slots[t], :pos[t] + 1].double()
        att = torch.softmax((q_lat[t].double() @ k.T + q_rope[t].double() @ r.T) * scale, -1)
        ref.append(att @ k)
    ref = torch.stack(ref).cpu()
    hopper = torch.cuda.get_device_capability() == (9, 0) and A.attention_hopper is not None
    for cfg in (A.DECODE, dict(A.DECODE, GLUON=False)):
        # 22 splits: row 3000's length leaves its last splits past its end (they write nothing: the merge takes
        # only the splits that hold keys)
        for splits in {A.decode_splits(T, Hr, bound, torch.device("cuda"), cfg) for bound in (L, 16384)} | {22}:
            out = A._attend_latent(q_lat, q_rope, kv, pe, slots, pos, scale, splits, 1, 64, cfg)
            assert rel(out, ref) < 1e-2, (cfg["GLUON"], splits)
    assert A._hopper_built == hopper
