"""benchmarks/step_time.py: interleaved step-time rounds on CPU (tiny preset, two variants, in
a spawned process with a launcher's environment, as tests/distributed.py gives it), the round
orders, the per-round ratios, the input checks before anything is built, the out-of-memory
message, the NVML samples, and its gpu_suite.sh job. A CUDA run is skipped without CUDA."""

import json
import subprocess
import sys
import types
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from distributed import run_distributed_raw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_throughput as mt  # noqa: E402
import step_time as st  # noqa: E402

TINY = ["--preset", "tiny", "--variants", "baseline,compact_r1/4", "--rounds", "2",
        "--steps-per-round", "1", "--warmup", "1", "--name", "st"]


def _main(rank, argv, probe):
    """In the spawned process: step_time.main, as `python benchmarks/step_time.py` runs it,
    recording per timed_steps call (n, forwards of compact layers that took the exact
    W0 + A P^T path because A was not known to be zero) into `probe`."""
    from compact_dist.core.layers import CompactLinearMixin

    calls, zero = [], CompactLinearMixin.factor_is_zero.fget

    def factor_is_zero(self):
        known = zero(self)
        if calls:
            calls[-1][1] += not known
        return known

    def timed_steps(self, state, batch, n):
        calls.append([n, 0])
        return real(self, state, batch, n)

    real = mt.Bench.timed_steps
    CompactLinearMixin.factor_is_zero = property(factor_is_zero)
    mt.Bench.timed_steps = timed_steps
    st.main(argv)
    Path(probe).write_text(json.dumps(calls))


def _run(tmp_path, *extra, cuda=False) -> tuple[dict, list]:
    probe = tmp_path / "probe.json"
    run_distributed_raw(_main, 1, [*TINY, "--out-dir", str(tmp_path), *extra], str(probe),
                        cuda=cuda)
    return json.loads((tmp_path / "st.json").read_text()), json.loads(probe.read_text())


def test_interleaved_rounds_on_cpu(tmp_path):
    r, calls = _run(tmp_path)
    assert r["benchmark"] == "step_time" and r["device"] == "cpu" and r["complete"]
    assert r["config"]["reference"] == "baseline" and r["config"]["precision"] == "fp32"
    assert set(r["versions"]) >= {"torch", "megatron_core", "deepspeed"}
    assert list(r["variants"]) == ["baseline", "compact_r1/4"]
    orders = [x["order"] for x in r["rounds"]]
    assert orders == [["baseline", "compact_r1/4"], ["compact_r1/4", "baseline"]]
    assert all(x["gpu"] is None for x in r["rounds"])  # no CUDA: no NVML samples
    tokens = mt.PRESETS["tiny"]["micro_batch_size"] * mt.PRESETS["tiny"]["seq_length"]
    for v in r["variants"].values():
        assert [len(x) for x in v["step_ms_rounds"]] == [1, 1] and len(v["warmup_ms"]) == 1
        assert v["step_ms"] > 0 and len(v["round_median_ms"]) == 2
        assert v["tokens_per_s"] == pytest.approx(tokens / v["step_ms"] * 1e3)
    ref, var = r["variants"]["baseline"], r["variants"]["compact_r1/4"]
    assert ref["ratio_rounds"] == [1.0, 1.0] and ref["ratio"] == 1.0
    assert var["ratio_rounds"] == pytest.approx(
        [a / b for a, b in zip(var["round_median_ms"], ref["round_median_ms"])])
    assert var["ratio_min"] <= var["ratio"] <= var["ratio_max"]
    md = (tmp_path / "st.md").read_text()
    assert "interleaved" in md and "| compact_r1/4 |" in md and "incomplete" not in md
    # timed_steps calls: warm-up of each variant, then per turn 1 untimed + 1 timed step.
    # The first forward after the other engine's optimizer step takes the exact A P^T path
    # (8 compact linears: 2 layers x qkv, proj, fc1, fc2); the turn's untimed step absorbs it
    assert len(calls) == 2 + 2 * 2 * 2 and all(n == 1 for n, _ in calls)
    turns = calls[2:]
    compact_turns = [turns[i:i + 2] for i, name in zip((0, 2, 4, 6), sum(orders, []))
                     if name == "compact_r1/4"]
    # round 0: right after the baseline's turn; round 1: right after its own turn
    assert [untimed for (_, untimed), _ in compact_turns] == [8, 0]
    assert all(exact == 0 for _, (_, exact) in compact_turns)  # no timed step pays it


def test_round_orders_balance_position_and_predecessor():
    for n in (2, 3, 4, 5, 6):
        names = [f"v{i}" for i in range(n)]
        rows = st.round_orders(names, 2 * n if n % 2 else n)
        assert rows[0] == names  # round 0 as listed: the reference first
        assert all(sorted(row) == names for row in rows)
        positions = {(row.index(v), v) for row in rows[:n] for v in names}
        assert len(positions) == n * n  # in n rounds: every variant once in every position
        follows = Counter(pair for row in rows for pair in pairwise(row))
        assert len(follows) == n * (n - 1)  # every variant right after every other one ...
        assert set(follows.values()) == {len(rows) // n}  # ... equally often


def test_summarize_takes_ratios_within_each_round():
    """A drift that slows both variants in round 1 cancels in the per-round ratios."""
    report = {"config": {"reference": "a", "micro_batch_size": 2, "seq_length": 4},
              "variants": {"a": {"step_ms_rounds": [[10.0, 11.0, 10.0], [20.0, 20.0, 30.0]]},
                           "b": {"step_ms_rounds": [[15.0, 15.0, 14.0], [30.0, 31.0, 29.0]]}}}
    st.summarize(report)
    a, b = report["variants"]["a"], report["variants"]["b"]
    assert a["ratio_rounds"] == [1.0, 1.0] and a["round_median_ms"] == [10.0, 20.0]
    assert b["ratio_rounds"] == [1.5, 1.5] and b["ratio"] == 1.5
    assert b["round_median_min_ms"] == 15.0 and b["round_median_max_ms"] == 30.0
    assert b["step_ms"] == 22.0 and b["tokens_per_s"] == pytest.approx(8 / 0.022)


@pytest.fixture
def nothing_built(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("nothing may be set up before the arguments are checked")

    monkeypatch.setattr(mt.Bench, "init", fail)
    monkeypatch.setattr(mt.Bench, "build", fail)


@pytest.mark.parametrize("argv, match", [
    (["--variants", "baseline,compact_r1/4,nope"], r"unknown variants \['nope'\]"),
    (["--variants", "compact_r1/4,compact_r1/8", "--reference", "baseline"],
     r"reference 'baseline' is not in --variants"),
    (["--variants", "baseline,baseline"], "each variant once"),
    (["--variants", "baseline", "--steps", "9"], "does not take --steps"),
    (["--variants", "baseline", "--launcher", "torchrun"], "does not take --launcher"),
    (["--variants", "baseline", "--tp", "2"], r"--tp 2 does not divide the world size 1"),
    (["--variants", "baseline", "--profile-steps", "-1"], "--profile-steps"),
    (["--variants", "baseline", "--rounds", "0"], "--rounds"),
])
def test_bad_input_fails_before_anything_is_built(nothing_built, argv, match):
    with pytest.raises(ValueError, match=match):
        st.main(["--preset", "tiny", *argv])


def _main_tp2(rank, argv, probe):
    """step_time.main at TP=2 (2 gloo processes); rank 1's steps report 1000 ms more, which
    the report must show (a step's time is the slowest rank's)."""
    real = mt.Bench.timed_steps

    def timed_steps(self, state, batch, n):
        return [t + 1000.0 * rank for t in real(self, state, batch, n)]

    mt.Bench.timed_steps = timed_steps
    st.main(argv)
    Path(probe).write_text(json.dumps({"rank": rank}))


def test_tensor_parallel_rounds_take_the_slowest_rank_and_profile(tmp_path):
    run_distributed_raw(_main_tp2, 2, [*TINY, "--out-dir", str(tmp_path), "--tp", "2",
                                       "--profile-steps", "1"], str(tmp_path / "probe.json"))
    r = json.loads((tmp_path / "st.json").read_text())
    assert r["world_size"] == 2 and (r["config"]["tp"], r["config"]["dp"]) == (2, 1)
    assert r["complete"] and len(r["rounds"]) == 2
    for v in r["variants"].values():
        assert all(t >= 1000.0 for x in v["step_ms_rounds"] for t in x)
        tokens = mt.PRESETS["tiny"]["micro_batch_size"] * mt.PRESETS["tiny"]["seq_length"]
        assert v["tokens_per_s_per_gpu"] == pytest.approx(tokens / v["step_ms"] * 1e3 / 2)
    assert "TP 2 (SP False), DP 1" in (tmp_path / "st.md").read_text()
    prof = json.loads((tmp_path / "st_profile.json").read_text())
    assert list(prof["variants"]) == ["baseline", "compact_r1/4"] and prof["steps"] == 1
    for name, v in prof["variants"].items():
        ops = {x["name"] for x in v["by_cpu"]}
        assert v["self_cpu_ms_per_step"] > 0 and len(v["by_cpu"]) <= 25, name
        assert any(op.startswith("aten::") for op in ops), ops
    # the compact layers' autograd function runs only in the compact variant
    fn = "CompressedLinearFunction"
    cpu_ops = {n: " ".join(x["name"] for x in v["by_cpu"]) for n, v in prof["variants"].items()}
    assert fn not in cpu_ops["baseline"]
    assert "| compact_r1/4 |" in (tmp_path / "st_profile.md").read_text()


def test_the_command_line_prints_one_error_line():
    proc = subprocess.run([sys.executable, "benchmarks/step_time.py", "--variants", "nope"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("step_time.py: error: unknown variants ['nope']")


def test_out_of_memory_while_building_names_the_variant_and_releases(monkeypatch, tmp_path):
    built, released = [], []

    def init(self):
        self.device, self.cuda, self.bf16, self.rank, self.world, self.dp_rank = (
            torch.device("cpu"), False, False, 0, 1, 0)
        self.tp, self.dp, self.sp = 1, 1, False

    def build(self, cfg, **kwargs):
        if built:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        built.append(cfg)
        return {"engine": None}

    monkeypatch.setattr(mt.Bench, "init", init)
    monkeypatch.setattr(mt.Bench, "build", build)
    monkeypatch.setattr(mt.Bench, "release", lambda self, state: released.append(state))
    args = st.parse_args([*TINY, "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"building compact_r1/4 ran out of memory with 1 "
                                         r"engine\(s\) resident \(baseline\)"):
        st.run(args)
    assert len(built) == 1 and released == [{"engine": None}]


def test_gpu_sample_reads_nvml_through_torch(monkeypatch):
    assert st.gpu_sample(torch.device("cpu")) is None
    monkeypatch.setitem(sys.modules, "pynvml", types.ModuleType("pynvml"))
    monkeypatch.setattr(st.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda d: 1980)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda d: 512_000)
    monkeypatch.setattr(torch.cuda, "temperature", lambda d: 61)
    cuda = torch.device("cuda", 0)
    assert st.gpu_sample(cuda) == {"sm_clock_MHz": 1980, "power_W": 512.0, "temperature_C": 61}
    monkeypatch.setattr(torch.cuda, "temperature", lambda d: 1 / 0)
    assert st.gpu_sample(cuda) == {"error": "ZeroDivisionError: division by zero"}


def test_gpu_suite_job_runs_step_time_with_valid_options():
    import shlex

    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run", "--gpus", "1",
                           "steptime_1.3b"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [x for x in proc.stdout.splitlines() if x.startswith("[steptime_1.3b] ")]
    argv = shlex.split(lines[0].split(" ", 1)[1])
    argv = argv[argv.index("benchmarks/step_time.py") + 1:]
    args = st.parse_args(argv)  # options and variants are checked here
    assert args.names == ["baseline", "compact_r1/4", "compact_r1/4_bf16W0_lean",
                          "compact_r1/4_lean"]
    assert (args.preset, args.micro_batch, args.rounds, args.steps_per_round, args.warmup) == (
        "1.3b", 4, 8, 5, 10)
    assert args.name == "steptime_1.3b" and 0 < args.time_limit_s <= 420
    assert "# writes benchmarks/results/steptime_1.3b.json" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_interleaved_rounds_on_cuda(tmp_path):
    r, _ = _run(tmp_path, cuda=True)
    assert r["device"] != "cpu" and r["config"]["precision"] == "bf16"
    assert all(v["step_ms"] > 0 for v in r["variants"].values())
    assert r["variants"]["baseline"]["ratio"] == 1.0
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return
    for x in r["rounds"]:
        assert "error" not in x["gpu"], x["gpu"]
        assert x["gpu"]["sm_clock_MHz"] > 0 and x["gpu"]["power_W"] > 0
