"""CPU smoke tests of benchmarks/: memory_throughput.py (tiny preset, TP=1 and TP=2 under
torchrun, and its CUDA-only branch on a faked CUDA allocator), convergence.py (tiny, two
variants + merge) and plot_results.py. The scripts run as the user runs them: subprocesses."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import memory_throughput as mt  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "NCCL_NVLS_ENABLE": "0"}
for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
    ENV.pop(key, None)
TINY = dict(mt.PRESETS["tiny"])


def run(cmd, timeout=240, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=ROOT, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every script once; the tests below check what they wrote."""
    out = tmp_path_factory.mktemp("bench")
    common = ["--preset", "tiny", "--warmup", "1", "--steps", "2", "--out-dir", str(out),
              "--tp-invariance-steps", "3", "--tp-invariance-variants", "baseline,compact_r1/4"]
    conv = ["--tiny", "--out-dir", str(out), "--cache-dir", str(out / "cache")]
    run([sys.executable, "benchmarks/convergence.py", "--prepare", *conv])
    commands = [  # independent runs at once (each is mostly single-threaded)
        [sys.executable, "benchmarks/convergence.py", "--variant", "baseline", *conv],
        [sys.executable, "benchmarks/convergence.py", "--variant", "r1/4", *conv],
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "benchmarks/memory_throughput.py", *common,
         "--name", "tp2", "--tp", "2", "--variants", "baseline,compact_r1/4"],
    ]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=ENV, cwd=ROOT) for c in commands]
    run([sys.executable, "benchmarks/memory_throughput.py", *common, "--name", "tp1",
         "--variants", "baseline,compact_r1/4,unbiased_r1/4", "--time-limit-s", "600"])
    for c, p in zip(commands, procs):
        log = p.communicate(timeout=240)[0]
        assert p.returncode == 0, f"{c}\n{log[-5000:]}"
    run([sys.executable, "benchmarks/convergence.py", "--merge", "--out-dir", str(out)])
    return out


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


# ----------------------------------------------------------------------------- memory_throughput

def _rank_of(role_in: int, ratio: float, blocks: int) -> int:
    return max(1, round(ratio * role_in / blocks)) * blocks


def test_memory_throughput_tp1_reports_every_variant(results):
    r = load(results, "tp1")
    assert r["benchmark"] == "memory_throughput" and r["device"] == "cpu"
    assert r["complete"] and not r["skipped"]
    assert r["config"]["tp"] == 1 and r["config"]["dp"] == 1 and r["config"]["precision"] == "fp32"
    assert set(r["versions"]) >= {"torch", "megatron_core", "deepspeed"}
    assert list(r["variants"]) == ["baseline", "compact_r1/4", "unbiased_r1/4"]
    for name, v in r["variants"].items():
        assert "error" not in v, (name, v.get("traceback"))
        assert len(v["step_ms_all"]) == 2 and v["step_ms"] > 0
        tokens = TINY["micro_batch_size"] * TINY["seq_length"]
        assert v["tokens_per_s"] == pytest.approx(tokens / v["step_ms"] * 1e3)
        assert v["mfu"] == pytest.approx(v["model_tflops_per_gpu"] * 1e12 / mt.PEAK_BF16_FLOPS)
        assert v["peak_alloc_GiB"] is None  # no CUDA allocator on CPU
        assert "max_micro_batch" not in v
    assert r["ratios_vs_baseline"]["baseline"]["step_time"] == 1.0
    md = (results / "tp1.md").read_text()
    assert all(f"| {n} |" in md for n in r["variants"])


def test_compact_saves_exactly_the_compressed_linear_inputs(results):
    """Baseline minus compact bytes saved for backward (per sequence, fp32) is what the four
    linears stop keeping: X (n columns) replaced by Z (r columns). The attention output that
    linear_proj reads is also kept by SDPA, so proj can only add its Z (r columns)."""
    v = load(results, "tp1")["variants"]
    L, s, h, ffn = TINY["num_layers"], TINY["seq_length"], TINY["hidden_size"], TINY[
        "ffn_hidden_size"]
    r_col = _rank_of(h, 0.25, 1)
    r_proj, r_fc2 = _rank_of(h, 0.25, 8), _rank_of(ffn, 0.25, 8)
    full = L * s * 4 * ((h - r_col) * 2 + (ffn - r_fc2))  # qkv, fc1, fc2
    saving = (v["baseline"]["saved_for_backward_bytes_per_sequence"]
              - v["compact_r1/4"]["saved_for_backward_bytes_per_sequence"])
    # SDPA keeps its output (torch's CPU flash kernel does): proj adds Z; else proj saves too
    assert saving in (full - L * s * 4 * r_proj, full + L * s * 4 * (h - r_proj))
    assert (v["unbiased_r1/4"]["saved_for_backward_bytes_per_sequence"]
            == v["compact_r1/4"]["saved_for_backward_bytes_per_sequence"])
    # subspace mode: the four linears' W0 are frozen (no master copy, no Adam state)
    linear = L * (h * 3 * h + h * h + h * 2 * ffn + ffn * h)
    assert v["compact_r1/4"]["frozen_params_local"] == linear
    assert v["baseline"]["frozen_params_local"] == 0
    assert v["compact_r1/4"]["w0_dtypes_after_init"] == {"float32": 4 * L}
    assert v["baseline"]["w0_dtypes_after_init"] == v["unbiased_r1/4"]["w0_dtypes_after_init"] == {}
    assert v["unbiased_r1/4"]["trainable_params_local"] == v["baseline"]["trainable_params_local"]
    ratios = load(results, "tp1")["ratios_vs_baseline"]
    assert ratios["compact_r1/4"]["saved_for_backward"] < 1.0


def test_tp_invariance_losses_match_across_tp(results):
    one, two = load(results, "tp1"), load(results, "tp2")
    assert two["config"]["tp"] == 2 and two["world_size"] == 2
    assert not (results / ".tp2.json.tmp").exists()
    for name in ("baseline", "compact_r1/4"):
        a, b = one["tp_invariance"]["losses"][name], two["tp_invariance"]["losses"][name]
        assert len(a) == 3 and all(math.isfinite(x) for x in a)
        assert a[-1] < a[0]  # the chain data is learnable
        assert b == pytest.approx(a, abs=1e-4), name
    # A = 0 at the start: the compact model's first loss is the baseline's
    first = one["tp_invariance"]["losses"]
    assert first["compact_r1/4"][0] == pytest.approx(first["baseline"][0], abs=1e-6)
    # the steps after differ (compressed gradient), so the comparison is not vacuous
    assert first["compact_r1/4"][-1] != first["baseline"][-1]
    # TP=2 halves the per-rank linears, so per-rank saved bytes go down
    assert (two["variants"]["baseline"]["saved_for_backward_bytes_per_sequence"]
            < one["variants"]["baseline"]["saved_for_backward_bytes_per_sequence"])


FAKE_CUDA = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
import memory_throughput as mt

GiB, limit, seen = 2**30, int(sys.argv[2]), {"peak_mbs": 0}
real_step, real_init = mt.Bench.train_step, mt.Bench.init

def train_step(self, state, batch, counter=None):
    m = batch["tokens"].shape[0]
    if m > limit:
        raise torch.cuda.OutOfMemoryError("fake out of memory")
    seen["peak_mbs"] = max(seen["peak_mbs"], m)
    return real_step(self, state, batch, counter)

def init(self):
    real_init(self)
    self.cuda = True  # take the CUDA branches, with the allocator faked below

class Event:
    def __init__(self, enable_timing=False):
        self.t = None
    def record(self):
        self.t = time.perf_counter()
    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3

def reset(*a, **k):
    seen["peak_mbs"] = 0

mt.Bench.train_step, mt.Bench.init = train_step, init
torch.cuda.Event = Event
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.empty_cache = lambda *a, **k: None
torch.cuda.reset_peak_memory_stats = reset
# peak(mbs) = 1 GiB + 0.25 GiB * mbs, with 0.5 GiB allocated between variants
torch.cuda.max_memory_allocated = lambda *a, **k: int((1 + 0.25 * seen["peak_mbs"]) * GiB)
torch.cuda.max_memory_reserved = lambda *a, **k: int((1.5 + 0.25 * seen["peak_mbs"]) * GiB)
torch.cuda.memory_allocated = lambda *a, **k: int(0.5 * GiB)
torch.cuda.get_device_name = lambda *a, **k: "fake-cuda"
mt.main(sys.argv[3:])
"""


def test_cuda_branch_fits_predicts_and_verifies_max_micro_batch(tmp_path):
    """The CUDA-only code (events, peak memory, fit, OOM-verified search with engine
    rebuilds) on CPU with the allocator statistics faked: budget 4.1 GiB -> predicted
    (4.1 - 1) / 0.25 = 12; micro-batches above 10 'run out of memory'."""
    run([sys.executable, "-c", FAKE_CUDA, str(BENCH), "10", "--preset", "tiny", "--variants",
         "compact_r1/4", "--warmup", "1", "--steps", "1", "--budget-gib", "4.1",
         "--out-dir", str(tmp_path), "--name", "fake"])
    r = load(tmp_path, "fake")
    v = r["variants"]["compact_r1/4"]
    assert r["device"] == "fake-cuda" and "error" not in v, v.get("traceback")
    assert v["peak_alloc_abs_GiB"] == pytest.approx(1.5)  # mbs 2
    assert v["peak_alloc_GiB"] == pytest.approx(1.0)  # minus the 0.5 GiB left before
    mm = v["max_micro_batch"]
    assert mm["fit_points"] == [[2, 1.5], [1, 1.25]]
    assert mm["intercept_GiB"] == pytest.approx(1.0) and mm["slope_GiB_per_sample"] == 0.25
    assert mm["predicted"] == 12
    assert [t["micro_batch"] for t in mm["tries"]] == [12, 11, 10]
    assert [t["fits"] for t in mm["tries"]] == [False, False, True]
    assert mm["verified"] == 10 and mm["tries"][-1]["peak_GiB"] == pytest.approx(3.5)


# ----------------------------------------------------------------------------- pure helpers

def test_fit_predict_and_verify():
    a, b = mt.fit_peak(8, 30.0, 4, 20.0)
    assert (a, b) == (10.0, 2.5)
    assert mt.predict_max_micro_batch(a, b, 75.0, 64) == 26
    assert mt.predict_max_micro_batch(a, b, 1000.0, 64) == 64
    assert mt.predict_max_micro_batch(a, 0.0, 75.0, 64) == 64
    assert mt.predict_max_micro_batch(a, b, 5.0, 64) == 0
    with pytest.raises(ValueError):
        mt.fit_peak(4, 1.0, 4, 2.0)
    fits = lambda m: float(m) if m <= 20 else None  # noqa: E731
    out = mt.verify_max_micro_batch(22, fits, max_tries=3, cap=64)
    assert out["verified"] == 20 and [t["micro_batch"] for t in out["tries"]] == [22, 20]
    out = mt.verify_max_micro_batch(100, fits, max_tries=3, cap=64)
    assert out["verified"] is None and [t["micro_batch"] for t in out["tries"]] == [64, 58, 53]
    assert mt.verify_max_micro_batch(0, fits)["tries"] == []


def test_time_limit_and_flops():
    assert mt.should_start(100.0, None, 1e9)
    assert mt.should_start(100.0, 200.0, 99.0) and not mt.should_start(100.0, 200.0, 101.0)
    f = mt.model_flops(layers=2, hidden=4, ffn=8, seq=16, vocab_padded=64)
    n = 2 * (4 * 12 + 16 + 3 * 4 * 8) + 4 * 64
    assert f["matmul_params"] == n
    assert f["per_token"] == 6 * n + 6 * 2 * 4 * 16
    assert f["per_token_full_attention"] == 6 * n + 12 * 2 * 4 * 16


def test_chain_batch_is_deterministic_and_learnable():
    x = mt.chain_batch(3, 4, 64, 100, seed=7)
    assert torch.equal(x, mt.chain_batch(3, 4, 64, 100, seed=7))
    assert not torch.equal(x, mt.chain_batch(4, 4, 64, 100, seed=7))
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(7))
    follows = (x[:, 1:] == perm[x[:, :-1]]).float().mean().item()
    assert 0.8 < follows < 0.97


def test_allgather_counter_counts_by_group_and_phase(megatron_tp1):
    import megatron.core.tensor_parallel.mappings as mappings
    import torch.distributed as dist

    from compact_dist.collectives import all_gather_first_dim

    originals = (dist.all_gather_into_tensor, mappings.dist_all_gather_func)
    tp = megatron_tp1.get_tensor_model_parallel_group()
    x = torch.ones(3, 5)
    with mt.AllGatherCounter({"tp": tp}) as counter:
        all_gather_first_dim(x, tp)  # not counted: no phase
        counter.phase = "backward"
        all_gather_first_dim(x, tp)  # compact_dist's path: torch.distributed attribute
        mappings.dist_all_gather_func(torch.empty(3, 5), x, group=tp)  # Megatron's binding
        dist.all_gather_into_tensor(torch.empty(3, 5), x)  # default group
        newer = hasattr(dist, "all_gather_single")  # torch >= 2.13 (all_gather_into_tensor
        if newer:                                    # calls it internally: no double count)
            dist.all_gather_single(torch.empty(3, 5), x, group=tp)
        counter.phase = "forward"
        dist.all_gather_into_tensor(torch.empty(3, 2), x[:, :2].contiguous(), group=tp)
    assert counter.result() == {"backward": {"tp": (3 if newer else 2) * 60, "world": 60},
                                "forward": {"tp": 24}}
    assert (dist.all_gather_into_tensor, mappings.dist_all_gather_func) == originals


# ----------------------------------------------------------------------------- convergence

def test_convergence_variants_and_merge(results):
    runs = {v: json.loads((results / f"convergence_{v}.json").read_text())
            for v in ("baseline", "r1-4")}
    for r in runs.values():
        assert r["benchmark"] == "convergence" and r["steps"] == 3
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert [p["step"] for p in r["valid"]] == [2, 3]  # eval_interval 2 + the last step
        assert r["tokens"] == 3 * 2 * 32 and 0 < r["epochs"] < 1
        assert r["dataset"]["train_tokens"] > 0 and r["model_params"] > 0
    assert runs["baseline"]["config"]["compression"]["enabled"] is False
    assert runs["r1-4"]["config"]["compression"]["ratio"] == 0.25
    # same data and initialisation: the first training loss is the same (A = 0)
    assert runs["r1-4"]["losses"][0] == pytest.approx(runs["baseline"]["losses"][0], abs=1e-5)
    merged = load(results, "convergence")
    assert merged["benchmark"] == "convergence_merged"
    assert list(merged["variants"]) == ["baseline", "r1/4"]
    e = merged["variants"]["r1/4"]
    ratio = runs["r1-4"]["final_valid_ppl"] / runs["baseline"]["final_valid_ppl"]
    assert e["final_ppl_ratio_vs_baseline"] == pytest.approx(ratio)
    assert e["final_ppl_gap_pct"] == pytest.approx(100 * (ratio - 1))
    assert [p["step"] for p in e["curve"]] == [2, 3]
    assert merged["variants"]["baseline"]["curve"][0]["ppl_ratio_vs_baseline"] == 1.0


# ----------------------------------------------------------------------------- plots

def test_plot_results_writes_pngs_and_tables(results, tmp_path):
    run([sys.executable, "benchmarks/plot_results.py", str(results), "--out-dir", str(tmp_path)])
    for png in ("tp1_memory_vs_time.png", "tp2_memory_vs_time.png", "convergence_ppl.png",
                "tp_invariance.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    summary = (tmp_path / "memory_throughput_summary.md").read_text()
    assert summary.count("| tp1 |") == 3 and summary.count("| tp2 |") == 2
    inv = json.loads((tmp_path / "tp_invariance.json").read_text())
    (group,) = inv.values()
    assert group["reference"] == "tp1"
    diffs = [v["max_abs_diff_vs_reference"] for run in group["runs"].values()
             for v in run.values()]
    assert len(diffs) == 4 and max(diffs) < 1e-4
    assert "| r1/4 |" in (tmp_path / "convergence.md").read_text()
