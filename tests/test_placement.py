"""runtime.experts' split of routed experts between the GPU and the CPU, on CI's CPU machine: placement decisions,
local maps, hit-rate arithmetic, the CPU's share of a routing, the routing-profile file and command, and one layer
split for real (ggml on the CPU's pairs; runtime.ggml_gpu on the resident ones, on torch CPU tensors through
Triton's interpreter). The same split on a GPU, through the whole model: tests/test_gpu_experts.py."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, pipeline
from runtime import experts as X
from runtime.load import load as open_folder
from test_experts import reference, rel

HARBOUR = ROOT / "tests" / "data" / "harbour.txt"
PROSE = ROOT / "tests" / "data" / "prose.txt"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    out = tmp_path_factory.mktemp("placement") / "tiny"
    pipeline("run", "--out", out)
    return out


# ----------------------------------------------------------------------------------------- placement arithmetic

def test_profile_placement_takes_the_most_hit_experts_within_the_budget():
    rng = np.random.default_rng()
    per = {1: 100, 2: 100, 3: 150}
    counts = {i: rng.integers(0, 1000, 8) for i in per}
    budget = int(rng.integers(300, 1500))
    plan = X.plan_placement(per, 8, budget, counts)
    used = sum(len(v) * per[i] for i, v in plan.items())
    assert used <= budget
    taken = {(i, int(e)) for i, v in plan.items() for e in v}
    for i in per:                                   # nothing left out could have fit instead of a colder one
        for e in range(8):
            if (i, e) not in taken and per[i] <= budget - used:
                pytest.fail(f"expert {i}.{e} fits the {budget - used} bytes left but was not placed")
            if (i, e) not in taken:
                colder = [c for c in taken if counts[c[0]][c[1]] < counts[i][e] and per[c[0]] >= per[i]]
                assert not colder, f"{i}.{e} ({counts[i][e]} hits) left out for colder {colder}"
    assert all(np.all(np.diff(v) > 0) for v in plan.values())


def test_whole_layers_fill_in_layer_order():
    per = {3: 10, 1: 10, 2: 20}
    plan = X.plan_placement(per, 4, 10 * 4 + 20 * 2 + 5)        # layer 1 whole, then half of layer 2
    assert {i: v.tolist() for i, v in plan.items()} == {1: [0, 1, 2, 3], 2: [0, 1]}
    assert X.plan_placement(per, 4, 0) == {}
    assert sum(len(v) for v in X.plan_placement(per, 4, 10 ** 9).values()) == 12


def test_local_map_and_hit_rate():
    m = X.local_map(8, [5, 2, 7])
    assert m.dtype == np.int32 and m.tolist() == [-1, -1, 1, -1, -1, 0, -1, 2]
    counts = {1: np.array([4, 0, 2, 2]), 2: np.array([1, 1, 1, 1])}
    per = {1: 10, 2: 30}
    # bytes read: layer 1 8 hits x 10, layer 2 4 hits x 30 = 200; GPU: experts 1.0 and 1.2 (6 hits x 10) + 2.3 (30)
    assert X.hit_rate({1: np.array([0, 2]), 2: np.array([3])}, counts, per) == pytest.approx(90 / 200)
    assert X.hit_rate({}, counts, per) == 0.0
    rows = X.compare_placements(per, 4, counts, counts, shares=(1.0,))
    assert rows[0]["profile"] == rows[0]["whole_layers"] == pytest.approx(1.0)


def test_cpu_routes_hand_the_gpu_pairs_to_nobody():
    rng = np.random.default_rng()
    resident = np.zeros(16, bool)
    resident[rng.choice(16, 6, replace=False)] = True
    ids = np.stack([rng.choice(16, 4, replace=False) for _ in range(9)])
    w = rng.uniform(0.1, 1, ids.shape).astype(np.float32)
    i_out, w_out = np.full(ids.shape, -7, np.int32), np.full(ids.shape, np.nan, np.float32)
    if resident[ids].all():
        resident[ids[0, 0]] = False
    assert X.cpu_routes(ids, w, resident, i_out, w_out)
    cpu = ~resident[ids]
    assert (i_out[cpu] == ids[cpu]).all() and (w_out[cpu] == w[cpu]).all()
    assert (w_out[~cpu] == 0).all() and not resident[i_out].any()        # fillers are CPU experts, weight 0
    assert set(i_out.flat) <= set(ids[cpu].flat)                          # ... already read by this step
    assert not X.cpu_routes(ids, w, np.ones(16, bool), i_out, w_out)


def test_stream_decision():
    assert X.stream_pays(0.1, 0.5) and not X.stream_pays(0.5, 0.1)
    assert not X.stream_pays(0.1, None) and not X.stream_pays(0.1, float("nan"))


def test_decode_pick_balances_the_cpu_and_pcie():
    """A decode step streams the share of its non-resident experts whose copies take as long as the CPU's rest,
    the most-routed first; never a resident expert, never more than a slot, nothing for fewer than two."""
    ids = np.array([[3, 5, 7, 9], [3, 5, 11, 13], [3, 2, 4, 6]])   # 3 thrice, 5 twice; 2, 4 resident; 5 others
    resident = np.zeros(16, bool)
    resident[[2, 4]] = True
    assert X.decode_pick(ids, resident, 5.0, 3.0, 100).tolist() == [3, 5, 6, 7]   # 7 on the CPU: 7 x 5 / 8 -> 4
    assert X.decode_pick(ids, resident, 3.0, 5.0, 100).tolist() == [3, 5]         # 7 x 3 / 8 -> 2
    assert len(X.decode_pick(ids, resident, 1.0, 0.0, 100)) == 7            # free copies: all of them
    assert len(X.decode_pick(ids, resident, 1.0, 0.0, 2)) == 2              # a slot's worth at most
    assert len(X.decode_pick(ids, resident, 0.0, 1.0, 100)) == 0
    assert len(X.decode_pick(np.array([[3, 2]]), resident, 1.0, 0.0, 100)) == 0     # one CPU expert: keep it
    all_res = np.ones(16, bool)
    assert len(X.decode_pick(ids, all_res, 1.0, 0.0, 100)) == 0


# ----------------------------------------------------------------------------------------- one layer, split for real

def test_a_split_layer_sums_ggml_on_the_cpu_pairs_and_the_gpu_kernels_on_the_rest(merged):
    pytest.importorskip("runtime.ggml_gpu")
    folder = open_folder(merged)
    le = X.LayerExperts.from_folder(folder, 2)
    rng = np.random.default_rng()
    T = 2
    x = torch.from_numpy(rng.standard_normal((T, le.cpu.hidden), np.float32))
    ids = torch.from_numpy(np.stack([rng.choice(16, 4, replace=False) for _ in range(T)]))
    w = torch.from_numpy(rng.uniform(0.1, 1, (T, 4)).astype(np.float32))
    gpu = rng.choice(np.unique(ids.numpy()), 3, replace=False)
    assert le.make_resident(gpu, "cpu") == 3 * le.per_expert
    out, _ = le(x, ids, w)
    cpu_share, _ = le.cpu_part(x, ids, w)
    on_gpu = np.isin(ids.numpy(), gpu)
    w_cpu = np.where(on_gpu, 0, w.numpy()).astype(np.float32)
    assert np.array_equal(cpu_share.numpy(), le.cpu.forward(x.numpy(), ids.numpy(), w_cpu))
    parts = [le.cpu.gate, le.cpu.up, le.cpu.down]
    gpu_ref = reference(parts, x.numpy(), ids.numpy(), np.where(on_gpu, w.numpy(), 0), emulate=False)
    err = rel((out - cpu_share).numpy(), gpu_ref)
    full = rel(out.numpy(), reference(parts, x.numpy(), ids.numpy(), w.numpy(), emulate=False))
    print(f"\nsplit layer: GPU share vs float64 {err:.1e}; whole vs float64 {full:.1e}")
    assert err < 1e-5              # float32 dots of exactly dequantized weights
    assert full < 3e-2             # the CPU share's ggml activation rounding (tests/test_experts.py)
    le.make_resident([], "cpu")
    assert le.stacks is None and not le.resident.any()


# ----------------------------------------------------------------------------------------- the profile file

def test_profile_file_round_trip_and_refusals(tmp_path):
    rng = np.random.default_rng()
    p = X.RoutingProfile({1: rng.integers(0, 99, 16), 3: rng.integers(0, 99, 16)}, 123, "t.txt", {1: "aa", 3: "bb"})
    path = tmp_path / X.PROFILE_NAME
    p.save(path)
    assert [f.name for f in tmp_path.iterdir()] == [X.PROFILE_NAME]          # no temporary left behind
    q = X.RoutingProfile.load(path, 16, {1: "aa", 3: "bb"})
    assert q.tokens == 123 and all(np.array_equal(q.counts[i], p.counts[i]) for i in p.counts)
    with pytest.raises(X.ProfileError, match="16 experts|32 experts"):
        X.RoutingProfile.load(path, 32)
    with pytest.raises(X.ProfileError, match="another model"):
        X.RoutingProfile.load(path, 16, {1: "zz"})
    path.write_text("{not json")
    with pytest.raises(X.ProfileError, match=str(path)):
        X.RoutingProfile.load(path, 16)


def test_profile_command_writes_beside_the_manifest_and_changes_nothing_checksummed(merged):
    before = {p.name: p.read_bytes() for p in merged.iterdir() if p.is_file()}
    run = lambda *a: subprocess.run([sys.executable, "-m", "runtime.profile", "--model", merged, *map(str, a)],  # noqa
                                    cwd=ROOT, capture_output=True, text=True, timeout=300)
    r = run("--file", PROSE, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    path = merged / X.PROFILE_NAME
    folder = open_folder(merged)                       # still verified, every size and sampled checksum as before
    assert folder.verified and X.PROFILE_NAME not in json.dumps(folder.manifest)
    assert {n: b for n, b in ((p.name, p.read_bytes()) for p in merged.iterdir() if p.is_file())
            if n != X.PROFILE_NAME} == before
    prof = X.RoutingProfile.load(path, 16, X.router_checksums(folder))
    assert sorted(prof.counts) == [1, 2, 3]
    assert all(int(c.sum()) == 4 * prof.tokens for c in prof.counts.values())   # top-4 of every token, every layer
    r = run("--file", HARBOUR, "--device", "cpu", "--against", path, "--json")
    assert r.returncode == 0, r.stderr
    rates = json.loads(r.stdout)["hit_rates"]
    assert path.read_bytes() and [x["share"] for x in rates] == [0.1, 0.25, 0.5, 0.75]
    print("\nhit rates on harbour.txt, placed from prose.txt's profile vs whole layers:",
          [(x["share"], round(x["profile"], 3), round(x["whole_layers"], 3)) for x in rates])
    assert all(0 <= x["profile"] <= 1 and 0 <= x["whole_layers"] <= 1 for x in rates)
    r = run("--file", HARBOUR, "--device", "cpu", "--against", merged / "manifest.json")
    assert r.returncode == 2 and "not a routing profile" in r.stderr and "Traceback" not in r.stderr
