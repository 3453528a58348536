"""runtime.fp8: the block-scaled FP8 kernels against float64 references.

On a CUDA GPU (compute capability >= 8.9) this runs the real kernels over every DeepSeek-V3 shape and
M in {1, 3, 16, 128, 1000}; without one, Triton's CPU interpreter runs the same kernel code on small shapes (the
conftest sets TRITON_INTERPRET). Two references, both float64 on dequantized operands:
- x quantized exactly as the kernels must (torch's own e4m3 cast): the kernel may differ only by its bf16 output
  rounding. Bound 6e-3 relative: the GPU rounds to nearest (measured ~1.7e-3); the interpreter truncates (~3e-3).
- x itself, unquantized: the error e4m3 activations allow; measured 2.5-2.7e-2 on Gaussian x, bound 3.5e-2, for one
  term; with two terms (x's remainder quantized again) the bf16 output rounding dominates (~2-3e-3), bound 6e-3.
Both for `terms` 1 and 2.
Outputs are poisoned with NaN first, so an element the kernel never wrote fails.
On an sm_90 GPU the Gluon kernels (runtime/fp8_hopper.py: prefill GEMM, and the decode linear that quantizes x
itself) are held to the same two references.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
from runtime import fp8  # noqa: E402

GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
DEVICE = "cuda" if GPU else "cpu"
if torch.cuda.is_available() and not GPU:
    pytest.skip("this GPU has no FP8 tensor cores (the runtime falls back to bf16 there)", allow_module_level=True)

# DeepSeek-V3 (N, K): fused q_a+kv_a, kv_a, q_a, q_b, kv_b, o, shared gate+up, shared down, dense gate/up, dense down
DEEPSEEK = [(2112, 7168), (576, 7168), (1536, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168),
            (7168, 2048), (18432, 7168), (7168, 18432)]
ODD = [(576, 512), (200, 384), (130, 300), (256, 256)]       # N, K not multiples of 128; K with a partial group
SHAPES = DEEPSEEK + ODD if GPU else ODD
MS = [1, 3, 16, 128, 1000] if GPU else [1, 3, 16, 130]
EXACT_BOUND, E4M3_BOUND = 6e-3, {1: 3.5e-2, 2: 6e-3}
HOPPER = GPU and fp8.fp8_hopper is not None and fp8.fp8_hopper.supported(torch.device("cuda"))


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def random_weight(N: int, K: int, gen: torch.Generator):
    """e4m3 weights spread over their range, and tile scales of varied size (fresh random, never constant)."""
    w = (torch.randn(N, K, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(-(-N // 128), -(-K // 128), generator=gen) * 1e-3 + 1e-4
    return w.to(DEVICE), s.to(DEVICE)


def random_x(M: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """bf16 activations whose rows and 128-groups differ in scale by orders of magnitude (amax floor included)."""
    row = torch.logspace(-6, 2, M)[torch.randperm(M, generator=gen)][:, None]
    group = torch.logspace(-2, 1, -(-K // 128))[torch.randperm(-(-K // 128), generator=gen)]
    x = torch.randn(M, K, generator=gen) * row * group.repeat_interleave(128)[:K]
    return x.to(torch.bfloat16).to(DEVICE)


@pytest.mark.parametrize("terms", [1, 2])
def test_act_quant_is_deepseeks_rounding(terms):
    """Bit for bit what torch gives: amax/448 scales (floor 1e-4), clamp, e4m3 round to nearest even; the second
    term the same rounding of the float32 remainder."""
    gen = torch.Generator().manual_seed(1)
    for M, K in [(1, 7168), (7, 300), (33, 1536)] if GPU else [(1, 512), (7, 300), (20, 256)]:
        x = random_x(M, K, gen).float()
        x[0, :5] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3e-7])              # zero, tiny, subnormal range
        q, s = fp8.act_quant(x, terms)
        rq, rs = fp8.reference_act_quant(x.cpu(), terms)
        assert q.shape == (terms * M, K) and s.shape == (terms * M, -(-K // 128))
        assert torch.equal(s.cpu(), rs), (M, K)
        assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)), (M, K)


def against_float64(N: int, K: int, seed: int, ms: list[int], gemm) -> list[tuple]:
    """Random W (N, K) and x (M, K) for each M; `gemm(x, w, ws, out, terms)` fills the NaN-poisoned out (M, N) and
    returns a label for messages. Asserts every element written and both float64 bounds; returns the errors."""
    gen = torch.Generator().manual_seed(seed)
    w, ws = random_weight(N, K, gen)
    w64 = fp8.dequantize_weight(w, ws).cpu()
    errors = []
    for M in ms:
        x = random_x(M, K, gen)
        unquantized = x.cpu().double() @ w64.T
        for terms in (1, 2):
            exact = fp8.reference_linear(x.cpu(), w.cpu(), ws.cpu(), terms)
            out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEVICE)
            what = f"{M}x{N}x{K} {gemm(x, w, ws, out, terms)} terms={terms}"
            assert not out.isnan().any(), f"{what}: unwritten output"
            e1, e2 = rel(out.cpu(), exact), rel(out.cpu(), unquantized)
            errors.append((M, terms, e1, e2))
            assert e1 <= EXACT_BOUND, f"{what}: {e1:.2e} vs exact-quantized reference"
            assert e2 <= E4M3_BOUND[terms], f"{what}: {e2:.2e} vs unquantized x"
    return errors


@pytest.mark.parametrize("N,K", SHAPES)
def test_gemm_against_float64(N, K):
    def triton_kernel(x, w, ws, out, terms):
        cfg = fp8.config_for(terms * len(x), N, K)
        fp8.fp8_gemm(*fp8.act_quant(x, terms), w, ws, cfg, out=out, terms=terms)
        return cfg
    errors = against_float64(N, K, N * 7 + K, MS, triton_kernel)
    print(f"\n{N}x{K}: " + ", ".join(f"M={m}x{t} {a:.1e}/{b:.1e}" for m, t, a, b in errors))


@pytest.mark.skipif(not HOPPER, reason="the Gluon prefill kernel needs an sm_90 GPU")
@pytest.mark.parametrize("consumers,columns", [(2, 128), (3, 128), (2, 256)])
@pytest.mark.parametrize("N,K", DEEPSEEK + [(576, 512), (200, 384), (256, 256), (130, 304)])
def test_hopper_prefill_kernel_against_float64(N, K, consumers, columns):
    """Called directly, so every shape and M runs it, including those the dispatch would give the Triton kernel:
    M=1 and 3 (one partial M tile), 130 (two), 1000 (more tiles than SMs for most N: the persistent loop).
    Tiles: `consumers` warpgroups of 64 rows x `columns`; 3 consumers and 256 columns (two weight blocks a tile, the
    second missing at the N edge where N mod 256 <= 128, stored in column halves) with one term only. N=130 rows are
    not 16-byte aligned, so that output is stored without TMA; K=304 ends in a partial group."""
    def hopper_kernel(x, w, ws, out, terms):
        tile = (consumers, columns) if terms == 1 else (2, 128)
        fp8.fp8_hopper.prefill_gemm(*fp8.act_quant(x, terms), w, ws, out, terms, *tile)
        return f"hopper tile={tile} tma_store={fp8.fp8_hopper.tma_writable(out)}"
    against_float64(N, K, N * 5 + K, [1, 3, 130, 1000], hopper_kernel)


@pytest.mark.skipif(not HOPPER, reason="the Gluon prefill kernel needs an sm_90 GPU")
def test_hopper_prefill_kernel_with_zero_weight_scales():
    """The kernel keeps its sum in units of the running scale: an all-zero weight block (scale 0, as DeepSeek's
    quantizer writes it) must add nothing rather than turn the units to 0 (NaN), first group, middle or last, in
    either half of a 256-column tile."""
    gen = torch.Generator().manual_seed(6)
    w, ws = random_weight(384, 640, gen)
    ws[0, 0] = ws[1, 2] = ws[2, 4] = ws[:, 3] = 0
    x = random_x(300, 640, gen)
    for terms, tile in [(1, (2, 128)), (1, (3, 128)), (1, (2, 256)), (2, (2, 128))]:
        out = torch.full((300, 384), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        fp8.fp8_hopper.prefill_gemm(*fp8.act_quant(x, terms), w, ws, out, terms, *tile)
        exact = fp8.reference_linear(x.cpu(), w.cpu(), ws.cpu(), terms)
        assert rel(out.cpu(), exact) <= EXACT_BOUND, (terms, tile, rel(out.cpu(), exact))


@pytest.mark.skipif(not HOPPER, reason="the Gluon decode kernel needs an sm_90 GPU")
@pytest.mark.parametrize("groups,stages", [(None, None), (1, None), (2, None), (4, 3)])
@pytest.mark.parametrize("N,K", DEEPSEEK + [(576, 512), (200, 384), (130, 304), (256, 256)])
def test_hopper_decode_kernel_against_float64(N, K, groups, stages):
    """The one-launch linear for few tokens (x quantized inside): 1, 3, 9 and 16 tokens; K split in programs of the
    rule's group count (uneven for K=1536), of 1, 2 (uneven for K=304 and 384) and 4 groups through a ring of 3
    weight stages; K=304 ends in a partial group. Twice each: the split-K sum is deterministic, and its counters are
    left at zero."""
    def decode_kernel(x, w, ws, out, terms):
        fp8.fp8_hopper.decode_linear(x, w, ws, out, terms, *fp8._workspace(x.device), groups=groups, stages=stages)
        again = torch.full_like(out, float("nan"))
        fp8.fp8_hopper.decode_linear(x, w, ws, again, terms, *fp8._workspace(x.device), groups=groups, stages=stages)
        assert torch.equal(out, again), "two runs differ"
        return f"decode {fp8.fp8_hopper.decode_variant(len(x), N, K, x.device, groups, stages)}"
    against_float64(N, K, N * 3 + K, [1, 3, 9, 16], decode_kernel)
    assert int(fp8._workspace(torch.device(DEVICE))[1].abs().sum()) == 0


@pytest.mark.skipif(not HOPPER, reason="the Gluon decode kernel needs an sm_90 GPU")
def test_fp8_linear_takes_the_decode_kernel_for_one_token():
    """fp8_linear's dispatch: one token (two in one term) runs fp8_hopper's decode kernel, more run act_quant +
    fp8_gemm; both agree to their bf16 output rounding."""
    gen = torch.Generator().manual_seed(4)
    w, ws = random_weight(7168, 2048, gen)
    for M in (1, 2, 3):
        x = random_x(M, 2048, gen)
        for terms in (1, 2):
            assert fp8.use_decode_kernel(x, w, terms) == (M * terms <= fp8.DECODE_ROWS), (M, terms)
            y = fp8.fp8_linear(x, w, ws, terms)
            ref = fp8.fp8_gemm(*fp8.act_quant(x, terms), w, ws, terms=terms)
            assert rel(y.cpu(), ref.cpu().double()) <= EXACT_BOUND, (M, terms)


def test_decode_kernel_only_takes_weights_tma_can_read(monkeypatch):
    """The decode kernel reads W through a TMA descriptor: a W that is not contiguous, not 16-byte aligned or whose K
    is not a multiple of 16 keeps the two-launch path (a descriptor failing would switch the Hopper kernels off)."""
    monkeypatch.setattr(fp8, "fp8_hopper", type("Gluon", (), {
        "supported": staticmethod(lambda d: True),
        "decode_variant": staticmethod(lambda M, N, K, device: (1, 4, 4, 2))}))
    x = torch.ones(1, 256)
    flat = torch.zeros(256 * 256 + 16, dtype=torch.float8_e4m3fn)
    assert fp8.use_decode_kernel(x, flat[:256 * 256].view(256, 256), 2)
    assert not fp8.use_decode_kernel(x, flat[1:256 * 256 + 1].view(256, 256), 2)           # 1 byte off
    assert not fp8.use_decode_kernel(x, flat[:512 * 128].view(128, 512)[:, :256], 2)       # rows strided
    assert not fp8.use_decode_kernel(torch.ones(1, 200), flat[:256 * 200].view(256, 200), 2)   # K % 16
    assert not fp8.use_decode_kernel(torch.ones(2, 256), flat[:256 * 256].view(256, 256), 2)   # 4 rows


def test_decode_sizes_never_take_the_prefill_kernel():
    """The prefill kernel gives each program a 128-token tile and all of K: a decode step (few tokens) must keep
    the split-K kernel, which spreads the weight stream over every SM; full prefill batches take it."""
    for N, K in DEEPSEEK:
        for terms in (1, 2):
            assert not any(fp8.use_hopper_kernel(M, N, K, terms) for M in range(1, 128)), (N, K, terms)
        assert all(fp8.use_hopper_kernel(4096, N, K, terms) for terms in (1, 2)), (N, K)
    # one term: the tile whose waves over 132 SMs cost least; two terms: 128 x 128, as their registers allow
    assert [fp8.hopper_tile(4096, N, 1, 132) for N in (2112, 576, 24576, 7168)] == [(3, 128), (3, 128), (2, 256),
                                                                                    (2, 256)]
    assert [fp8.hopper_tile(M, 7168, 1, 132) for M in (128, 256, 512)] == [(2, 128), (2, 128), (2, 256)]
    assert all(fp8.hopper_tile(M, N, 2, 132) == (2, 128) for M in (128, 4096, 6144) for N, _ in DEEPSEEK)


def test_a_hopper_kernel_that_does_not_build_falls_back_once(monkeypatch):
    """A Triton whose Gluon API moved: the first call warns and reports False (fp8_gemm then runs the Triton kernel),
    and the Hopper kernels are not tried again; the decode kernel's failure gives fp8_linear the two-launch path."""
    calls = []

    def broken(*args):
        calls.append(args)
        raise TypeError("async_copy_global_to_shared() got an unexpected keyword argument")
    monkeypatch.setattr(fp8, "fp8_hopper", type("Gluon", (), {"prefill_gemm": staticmethod(broken),
                                                              "sm_count": staticmethod(lambda device: 132),
                                                              "tma_writable": staticmethod(lambda out: True)}))
    monkeypatch.setattr(fp8, "_hopper_built", set())
    with pytest.warns(UserWarning, match="do not build with Triton"):
        assert fp8._hopper_gemm(torch.empty(256, 128), None, torch.empty(256, 128), None, None, 2) is False
    assert fp8.fp8_hopper is None and len(calls) == 1

    gluon = type("Gluon", (), {"decode_linear": staticmethod(broken), "supported": staticmethod(lambda d: True),
                               "decode_variant": staticmethod(lambda M, N, K, device: (1, 2, 2, 1))})
    monkeypatch.setattr(fp8, "fp8_hopper", gluon)
    gen = torch.Generator().manual_seed(5)
    w, ws = random_weight(256, 256, gen)
    x = random_x(1, 256, gen)
    with pytest.warns(UserWarning, match="do not build with Triton"):
        y = fp8.fp8_linear(x, w, ws, 2)
    assert fp8.fp8_hopper is None and len(calls) == 2
    assert torch.equal(y, fp8.fp8_gemm(*fp8.act_quant(x, 2), w, ws, terms=2))


def test_a_hopper_module_that_does_not_import_says_so_once_where_it_would_run(monkeypatch):
    """fp8_hopper failing to import (a Triton without Gluon's Hopper API) costs speed on sm_90 only, and says so
    once there, when a call would have taken it; never on other devices."""
    import warnings
    monkeypatch.setattr(fp8, "fp8_hopper", None)
    monkeypatch.setattr(fp8, "_hopper_import_error", ImportError("cannot import name 'warpgroup_mma'"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fp8.hopper_ready(torch.device("cpu")) is False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.warns(UserWarning, match="does not import with Triton.*warpgroup_mma"):
        assert fp8.hopper_ready(torch.device("cuda")) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fp8.hopper_ready(torch.device("cuda")) is False


def test_imports_run_one_way():
    """fp8 imports fp8_hopper; fp8_hopper and fp8_quant never import fp8 (a cycle hid import failures before)."""
    import ast
    from pathlib import Path
    runtime_dir = Path(fp8.__file__).parent
    for name in ("fp8_hopper.py", "fp8_quant.py"):
        tree = ast.parse((runtime_dir / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert "runtime.fp8" not in imported, name


def test_every_split_and_tile_shape_agrees():
    """Split-K counts that do and don't divide K's groups, tiles over the N edge: the same numbers each time
    (deterministic reduction), and the split-K counters are left at zero for the next launch."""
    gen = torch.Generator().manual_seed(3)
    N, K = 576, 1024
    w, ws = random_weight(N, K, gen)
    outs = []
    for M, terms, cfg in [(1, 2, fp8.Config(16, 64, 1, 4, 2, 1)), (1, 1, fp8.Config(16, 64, 3, 4, 2, 1)),
                          (5, 2, fp8.Config(16, 32, 8, 4, 2, 1)), (5, 1, fp8.Config(32, 128, 4, 4, 2, 4)),
                          (1, 2, fp8.Config(16, 16, 2, 4, 2, 1)), (40, 1, fp8.Config(16, 64, 5, 4, 2, 1)),
                          (40, 2, fp8.Config(32, 64, 2, 4, 2, 1, STEP=2)), (130, 1, fp8.Config(64, 128, 1, 4, 2, 4, 2)),
                          (70, 2, fp8.Config(64, 128, 1, 4, 2, 4, 2))]:
        x = random_x(M, K, gen)
        exact = fp8.reference_linear(x.cpu(), w.cpu(), ws.cpu(), terms)
        for _ in range(2):
            out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEVICE)
            fp8.fp8_gemm(*fp8.act_quant(x, terms), w, ws, cfg, out=out, terms=terms)
            assert rel(out.cpu(), exact) <= EXACT_BOUND, (cfg, terms)
            outs.append(out.cpu())
        assert torch.equal(outs[-1], outs[-2]), f"{cfg} terms={terms}: two runs differ"
    assert int(fp8._workspace(torch.device(DEVICE))[1].abs().sum()) == 0


def test_config_table_covers_deepseek_shapes():
    """The shipped table answers every DeepSeek-V3 shape and M bucket without falling back (no first-run tuning),
    and every config it holds is launchable for its shape."""
    for N, K in DEEPSEEK:
        for M in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]:
            entry = fp8._load_table().get(f"{N}x{K}", {}).get(str(fp8.m_bucket(M)))
            assert entry is not None, f"no shipped config for {N}x{K} M={M}"
            assert fp8.Config(**entry).fits(M, N, K), (N, K, M, entry)
    assert fp8.config_for(8192, 7168, 2048) == fp8.config_for(4096, 7168, 2048)    # two terms of 4096 tokens
