"""
One real-size DeepSeek-V3 MoE layer on the CPU through runtime.experts (ggml's quantized kernels, and for decode the own
AVX-512 kernel of runtime.cpu_kernels), measured in one run against the host's memory-read bandwidth and against torch
dequantize-then-matmul.

    python benchmarks/experts_cpu.py [--experts 256] [--threads N] [--rounds 6] [--no-torch] [--memory mmap]
                                     [--kernel both|ggml|own] [--decode-tokens 1]

Layer: hidden 7168, experts of 2048, Q4_K gate/up, Q6_K down (28.5 MB of blocks per expert; 256 experts = 7.3 GB),
random valid blocks written to a temp file and memmapped, as the runtime memmaps a merged folder's shard. The file is
mlocked (this VM's DAMON pages out page cache left idle for 60 s, and other processes' I/O evicts it) and read
through once: warm page cache and page tables, the runtime's steady state.
decode: 1 token (--decode-tokens), top-8 of fresh random experts every repeat (bytes = the distinct experts x 3
matrices); with --kernel both, by ggml's graph ("decode") and by the own kernel ("decode own", called directly, so
also above runtime.experts.KERNEL_MAX_TOKENS), taking turns in each round, each with its own fresh routing; the
speed-up line gives the median of the per-round ratios.
prefill: 128 tokens, a random top-8 per token (bytes = the distinct experts touched, each read once).
Shared hosts are noisy, so the timings come in rounds, each round = one memory-bandwidth sample (torch sum over
4 GiB, same threads), 4 decodes by each kernel, 1 prefill; the table gives medians and the median of the per-round
ratios.
torch: each touched expert dequantized to float32 (stages.dequant, the project's fast numpy path; same threads),
then torch.matmul; "matmul" is the torch part alone (float32 weights: 7.1x the bytes of Q4_K).
--experts: fewer experts for hosts without ~12 GB of free RAM; top-8 stays 8 distinct real-size experts.
"""
import argparse
import ctypes
import mmap
import os
import resource
import sys
import tempfile
import time

p = argparse.ArgumentParser()
p.add_argument("--experts", type=int, default=256)
p.add_argument("--threads", type=int, default=0, help="default: physical cores")
p.add_argument("--rounds", type=int, default=6)
p.add_argument("--prefill-tokens", type=int, default=128)
p.add_argument("--torch-repeats", type=int, default=5, help="decode; prefill gets half")
p.add_argument("--omp-wait", choices=["PASSIVE", "ACTIVE"], default="PASSIVE", help="OMP_WAIT_POLICY (ggml and torch)")
p.add_argument("--dir", default=tempfile.gettempdir(), help="where the temp expert file goes")
p.add_argument("--no-torch", action="store_true")
p.add_argument("--kernel", choices=["both", "ggml", "own"], default="both",
               help="decode through ggml's graph, the own kernel (runtime.cpu_kernels), or both side by side")
p.add_argument("--decode-tokens", type=int, default=1)
p.add_argument("--memory", choices=["mmap", "anon", "hugepages"], default="mmap",
               help="where ggml reads the experts: the file's memory map (the runtime's way), or a copy in anonymous "
                    "memory, with 4 KB pages or asking for transparent huge pages (madvise)")
args = p.parse_args()
os.environ["OMP_WAIT_POLICY"] = args.omp_wait  # before anything loads libgomp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runtime import ggml_ops as G  # noqa: E402
from runtime import experts as X  # noqa: E402
from runtime.experts import MoEExperts, StackedExperts  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import stages.dequant as dq  # noqa: E402
from synthetic import HIDDEN, INTER, MATS, TOPK, expert_nbytes  # noqa: E402
import synthetic  # noqa: E402

THREADS = args.threads or G.physical_cores()
torch.set_num_threads(THREADS)
dq.THREADS = THREADS
rng = np.random.default_rng(0)
BW_BYTES = 4 << 30


def random_expert(t, shape):
    return synthetic.random_expert(t, shape, rng)


def meminfo(key):
    return int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith(key + ":"))) * 1024


def timed(f, *a):
    t0 = time.perf_counter()
    f(*a)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ the layer file
per_expert = sum(expert_nbytes(t, s) for _, t, s in MATS)
E = args.experts
stat = os.statvfs(args.dir)
spare = min(meminfo("MemAvailable") - BW_BYTES - 4 * 2**30, stat.f_bavail * stat.f_frsize - 2**30)
if E * per_expert > spare:
    E = int(spare // per_expert)
    print(f"note: {args.experts} experts need {args.experts * per_expert / 1e9:.1f} GB of RAM + disk, "
          f"{spare / 1e9:.1f} GB spare: using {E}")
assert E >= 2 * TOPK, "not enough memory for 16 real-size experts"

fd, path = tempfile.mkstemp(prefix="experts-", suffix=".bin", dir=args.dir)
try:
    t0 = time.perf_counter()
    with os.fdopen(fd, "wb") as f:
        pool = {name: [random_expert(t, s) for _ in range(4)] for name, t, s in MATS}  # 4 distinct images each
        for name, t, s in MATS:
            for e in range(E):
                f.write(pool[name][e % 4].data)
    del pool
    mm = np.memmap(path, np.uint8, "r")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    locked = libc.mlock(mm.ctypes.data, len(mm)) == 0
    if not locked:
        print(f"note: mlock failed ({os.strerror(ctypes.get_errno())}): timings may include disk reads")
    for a in range(0, len(mm), 1 << 28):
        np.bitwise_or.reduce(mm[a:a + (1 << 28)].view(np.uint64))
    parts, at = [], 0
    for name, t, s in MATS:
        parts.append(StackedExperts(mm[at:at + E * expert_nbytes(t, s)], int(t), (E, *s)))
        at += E * expert_nbytes(t, s)
    if args.memory != "mmap":                 # the same bytes in anonymous memory: is it the mapping's pages?
        copies = []
        for i, part in enumerate(parts):
            m = mmap.mmap(-1, part.data.size)
            if args.memory == "hugepages":
                m.madvise(mmap.MADV_HUGEPAGE)
            else:
                m.madvise(mmap.MADV_NOHUGEPAGE)
            a = np.frombuffer(m, np.uint8)
            a[:] = part.data
            copies.append(m)
            parts[i] = StackedExperts(a, part.ggml_type, part.shape)
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    print(f"layer file: {E} experts x {per_expert / 1e6:.1f} MB = {len(mm) / 1e9:.2f} GB (mlocked: {locked}), "
          f"written and read in {time.perf_counter() - t0:.0f} s; ggml reads it from {args.memory} "
          f"(transparent huge pages: {thp}; AnonHugePages {meminfo('AnonHugePages') >> 20} MiB)")
    user_choice = os.environ.get("DSV3_CPU_KERNEL")
    os.environ["DSV3_CPU_KERNEL"] = "0"   # this one: ggml's graph at every size
    moe = MoEExperts(*parts, threads=THREADS)
    if user_choice is None:
        del os.environ["DSV3_CPU_KERNEL"]
    else:
        os.environ["DSV3_CPU_KERNEL"] = user_choice
    own = X.own_kernel() if args.kernel != "ggml" else None
    if args.kernel != "ggml" and own is None:
        print("note: the own kernel does not run here: ggml only")
    own_out = np.empty((args.decode_tokens, HIDDEN), np.float32)

    def own_forward(x, ids, w):
        own.moe(x, ids, w, *parts, own_out, THREADS)
        return own_out

    def routing(T):
        ids = np.stack([rng.choice(E, TOPK, replace=False) for _ in range(T)]).astype(np.int32)
        w = rng.uniform(0.05, 1, (T, TOPK)).astype(np.float32)
        return rng.standard_normal((T, HIDDEN)).astype(np.float32), ids, w

    def repeats(T):  # decodes per round
        return 4 if T <= 16 else 1

    # ------------------------------------------------------------------------------- ggml and the own kernel, in rounds
    buf = torch.ones(BW_BYTES // 4)  # >> any L3 (this VM reports 480 MiB)
    dec = "decode" if args.decode_tokens == 1 else f"decode {args.decode_tokens}"
    cases = {}  # case -> (tokens, forward)
    if args.kernel != "own" or own is None:
        cases[dec] = (args.decode_tokens, moe.forward)
    if own is not None:
        cases[dec + " own"] = (args.decode_tokens, own_forward)
    cases[f"prefill {args.prefill_tokens}"] = (args.prefill_tokens, moe.forward)
    samples = {c: [] for c in cases}  # (seconds, bytes, the round's bandwidth)
    for T, forward in cases.values():
        forward(*routing(T))  # build the graphs, warm up
    load0, faults0 = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    for _ in range(args.rounds):
        bw = BW_BYTES / timed(buf.sum)
        for case, (T, forward) in cases.items():
            for _ in range(repeats(T)):
                x, ids, w = routing(T)
                samples[case].append((timed(forward, x, ids, w), len(np.unique(ids)) * per_expert, bw))
    load1, faults = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults0
    bws = [s[2] for s in next(iter(samples.values()))[::repeats(args.decode_tokens)]]
    del buf

    # -------------------------------------------------------------------------------------------- torch baseline
    deq = {n: np.empty(s, np.float32) for n, _, s in MATS}

    def torch_moe(x, ids, w, timing):
        out, xt = torch.zeros(x.shape), torch.from_numpy(x)
        for e in np.unique(ids):
            t0 = time.perf_counter()
            for (n, t, s), part in zip(MATS, parts):
                dq.dequantize_ggml(part.data.reshape(E, -1)[e], t, s, out=deq[n])
            t1 = time.perf_counter()
            rows, slot = np.nonzero(ids == e)
            xe = xt[rows]
            h = torch.nn.functional.silu(xe @ torch.from_numpy(deq["gate"]).T) * (xe @ torch.from_numpy(deq["up"]).T)
            y = (h @ torch.from_numpy(deq["down"]).T) * torch.from_numpy(w[rows, slot])[:, None]
            out.index_add_(0, torch.from_numpy(rows), y)
            timing[0] += t1 - t0
            timing[1] += time.perf_counter() - t1
        return out.numpy()

    torch_rows = {}
    for case, (T, _) in cases.items() if not args.no_torch else ():
        if case.endswith(" own"):
            continue
        x, ids, w = routing(T)
        out_t = torch_moe(x, ids, w, [0.0, 0.0])  # also the warm-up
        rel_diff = float(np.linalg.norm(moe.forward(x, ids, w) - out_t) / np.linalg.norm(out_t))
        runs = []
        for _ in range(args.torch_repeats if T == 1 else max(1, args.torch_repeats // 2)):
            timing = [0.0, 0.0]
            runs.append((timed(torch_moe, *routing(T), timing), timing[1]))
        torch_rows[case] = [float(np.median([r[i] for r in runs])) for i in (0, 1)] + [rel_diff]

    # -------------------------------------------------------------------------------------------- report
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    feats = [f for f in ("avx2", "avx512", "avx512_vnni", "avx_vnni", "amx_int8")
             if getattr(G._g, f"ggml_cpu_has_{f}")()]
    print(f"\nCPU: {cpu}; {G.physical_cores()} physical cores, {len(os.sched_getaffinity(0))} usable cpus; "
          f"ggml {G._g.ggml_version().decode()} (ggml-python {G._g.__version__}), CPU features {','.join(feats)}")
    print(f"threads {THREADS} (ggml and torch), OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load average "
          f"{load0:.1f} before / {load1:.1f} after the ggml rounds (this process counts ~{THREADS}); "
          f"major page faults in them: {faults}")
    print(f"memory read bandwidth (torch sum, {BW_BYTES >> 30} GiB, {THREADS} threads): "
          f"median {np.median(bws) / 1e9:.1f} GB/s, range {min(bws) / 1e9:.1f}-{max(bws) / 1e9:.1f} "
          f"over {args.rounds} rounds")
    print(f"layer: hidden {HIDDEN}, {E} experts of {INTER}, Q4_K gate/up + Q6_K down, top-{TOPK}; median of "
          f"{args.rounds} rounds x ({repeats(args.decode_tokens)} decodes by each kernel, 1 prefill by ggml); "
          f"torch: median of {args.torch_repeats} / {max(1, args.torch_repeats // 2)}\n")
    hdr = (f"{'case':14s} {'experts':>7s} {'GB read':>7s} {'ms':>8s} {'(range)':>13s} {'GB/s':>5s} {'of bw':>6s} "
           f"{'GFLOP/s':>7s}")
    if torch_rows:
        hdr += f" {'torch ms':>8s} {'matmul ms':>9s} {'speed-up':>8s} {'vs matmul':>9s} {'rel diff':>8s}"
    print(hdr)

    def rate(case):  # (median seconds, mean bytes)
        s = np.array(samples[case])
        return float(np.median(s[:, 0])), float(np.mean(s[:, 1]))

    for case, (T, _) in cases.items():
        s = np.array(samples[case])
        sec, nbytes = rate(case)
        of_bw = float(np.median(s[:, 1] / s[:, 0] / s[:, 2]))
        line = (f"{case:14s} {nbytes / per_expert:7.1f} {nbytes / 1e9:7.2f} {sec * 1e3:8.1f} "
                f"{f'{s[:, 0].min() * 1e3:.0f}-{s[:, 0].max() * 1e3:.0f}':>13s} {nbytes / sec / 1e9:5.1f} "
                f"{of_bw:6.0%} "
                f"{2 * 3 * T * TOPK * INTER * HIDDEN / sec / 1e9:7.1f}")
        if case in torch_rows:
            t_all, t_mm, rel_diff = torch_rows[case]
            line += f" {t_all * 1e3:8.0f} {t_mm * 1e3:9.0f} {t_all / sec:7.1f}x {t_mm / sec:8.1f}x {rel_diff:8.1e}"
        print(line)
    if dec in samples and dec + " own" in samples:
        g, o = np.array(samples[dec]), np.array(samples[dec + " own"])
        n = repeats(args.decode_tokens)
        ratios = [np.median(g[i:i + n, 0]) / np.median(o[i:i + n, 0]) for i in range(0, len(g), n)]
        (so, bo), (sg, bg) = rate(dec + " own"), rate(dec)
        print(f"\n{dec}: own kernel {bo / so / 1e9:.1f} GB/s, ggml {bg / sg / 1e9:.1f} GB/s: "
              f"own {np.median(ratios):.2f}x as fast (median of the rounds' ratios of median times; range "
              f"{min(ratios):.2f}-{max(ratios):.2f})")
finally:
    os.unlink(path)
