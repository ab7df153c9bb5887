"""Step-time ratios of benchmark variants, measured interleaved so that drift cancels.

memory_throughput.py times one variant after the other; on a shared GPU the step time drifts
within a run (clock, temperature, neighbours), so its "x times the baseline" is partly drift.
Here every variant's engine is built once in one process (memory_throughput.Bench, the same
model, engine and train step), each runs --warmup untimed steps, then --rounds rounds in
which every variant runs --steps-per-round timed steps in turn, each turn after
--turn-warmup untimed steps (default 1; see `run`). The order changes every round
(`round_orders`, a Williams Latin square): over n rounds (2n for an odd number n of
variants) each variant runs once in every position and right after every other one equally
often. A variant's ratio is taken within each round (its median step / the reference's
median step in the same round); the report gives the median and the min-max of those
per-round ratios.

    python benchmarks/step_time.py --preset 1.3b --micro-batch 4 \
        --variants baseline,compact_r1/4,compact_r1/4_lean --rounds 6 --steps-per-round 5 \
        --warmup 3 --out-dir benchmarks/results --name steptime_1.3b

One device: start it with python. Several (tensor / data parallel): start it with torchrun,
e.g. `torchrun --nproc-per-node 4 benchmarks/step_time.py --tp 4 ...`; every rank runs the
same rounds in the same order, a step's time is the maximum over the ranks, rank 0 writes the
report. All engines are resident together, so the variants must fit in memory at once. The
shape and training options (--preset, --micro-batch, --seq, --vocab, --tp,
--sequence-parallel, --zero-stage, --precision, --warmup, --lr, --seed, --out-dir, --name,
--time-limit-s) are memory_throughput.py's. Writes <out-dir>/<name>.json (rewritten after
every round) and <out-dir>/<name>.md. On CPU the steps are timed by time.perf_counter, on
CUDA by CUDA events; with CUDA and pynvml (nvidia-ml-py) the SM clock, power and temperature
of rank 0's GPU are sampled at the end of every round.

--profile-steps N: after the rounds, torch.profiler records N more steps of each
variant (CPU and CUDA activities, on every rank); <name>_profile.json gets, per variant and
for rank 0, the ops by self CUDA time and by self CPU time, and the device's busy and idle
time over those steps (profile_model.host_summary); --trace-dir D keeps rank 0's chrome
traces as D/<name>_<variant>.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_throughput as mt  # noqa: E402

METHOD = (
    "Measured interleaved: all variants were built in one process and warmed up ({warmup} "
    "steps each), then in each of {rounds} rounds every variant ran {turn_warmup} untimed and "
    "{steps} timed step(s) in turn, the order changing every round (a Williams Latin square, "
    "which balances each variant's position and predecessor over n rounds, 2n for an odd "
    "number n of variants); each ratio is a variant's median step over the reference's median "
    "step in the same round, so drift between rounds cancels.")

# memory_throughput.py options that do not apply here (one process, interleaved timing)
_UNUSED = ("steps", "isolate", "launcher", "nproc", "budget_gib",
           "no_max_mbs", "max_mbs_cap", "max_mbs_tries", "verify_distributed",
           "tp_invariance_steps", "tp_invariance_global_batch", "tp_invariance_lr",
           "tp_invariance_preset", "tp_invariance_seq", "tp_invariance_variants",
           "skip_throughput")


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
    """The variant order of each round: a Williams design, a cyclic Latin square whose first
    row is 0, 1, n-1, 2, n-2, ... and whose row r adds r (mod n) to every entry, followed by
    the reversed rows for odd n; variant names[j] is the j-th entry of the first row, so round
    0 is the order as listed. Over n rounds (2n for odd n) every variant runs once in every
    position and right after every other variant equally often."""
    n = len(names)
    base, lo, hi = [0], 1, n - 1
    while len(base) < n:
        base.append(lo)
        lo += 1
        if len(base) < n:
            base.append(hi)
            hi -= 1
    name_of = {b: names[j] for j, b in enumerate(base)}
    rows = [[name_of[(b + r) % n] for b in base] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [rows[r % len(rows)] for r in range(rounds)]


def gpu_sample(device: torch.device) -> Optional[dict[str, Any]]:
    """SM clock (MHz), power (W) and temperature (C) of `device` now, through torch.cuda's
    NVML wrappers; None without CUDA or pynvml, {"error": ...} when NVML refuses."""
    if device.type != "cuda" or importlib.util.find_spec("pynvml") is None:
        return None
    try:
        return {"sm_clock_MHz": torch.cuda.clock_rate(device),
                "power_W": torch.cuda.power_draw(device) / 1e3,
                "temperature_C": torch.cuda.temperature(device)}
    except Exception as err:  # noqa: BLE001 - informational only
        return {"error": f"{type(err).__name__}: {err}"}


def summarize(report: dict) -> None:
    """Fill each variant's medians and per-round ratios from its `step_ms_rounds`."""
    ref = report["variants"][report["config"]["reference"]]["step_ms_rounds"]
    c = report["config"]
    tokens = c["micro_batch_size"] * c["seq_length"] * c.get("dp", 1)  # per step, all ranks
    gpus = report.get("world_size", 1)
    for v in report["variants"].values():
        rounds = v["step_ms_rounds"]
        if not rounds:
            continue
        medians = [statistics.median(r) for r in rounds]
        ratios = [m / statistics.median(r) for m, r in zip(medians, ref)]
        v.update(step_ms=statistics.median([t for r in rounds for t in r]),
                 round_median_ms=medians, round_median_min_ms=min(medians),
                 round_median_max_ms=max(medians), ratio_rounds=ratios,
                 ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        v["tokens_per_s"] = tokens / (v["step_ms"] / 1e3)
        v["tokens_per_s_per_gpu"] = v["tokens_per_s"] / gpus


def markdown(report: dict) -> str:
    c, ver = report["config"], report["versions"]
    ref = c["reference"]
    lines = [
        f"# {report['name']}: {report['device']} x{report.get('world_size', 1)}", "",
        f"preset {c['preset']} (L={c['num_layers']}, h={c['hidden_size']}, heads="
        f"{c['num_attention_heads']}, ffn={c['ffn_hidden_size']}), seq {c['seq_length']}, vocab "
        f"{c['vocab_size']}, micro-batch {c['micro_batch_size']}, TP {c.get('tp', 1)} (SP "
        f"{c.get('sequence_parallel', False)}), DP {c.get('dp', 1)}, ZeRO {c['zero_stage']}, "
        f"{c['precision']}; torch {ver['torch']}, megatron-core {ver['megatron_core']}, "
        f"deepspeed {ver['deepspeed']}; {report['date']}", "",
        METHOD.format(warmup=c["warmup"], rounds=len(report["rounds"]),
                      turn_warmup=c["turn_warmup"], steps=c["steps_per_round"]), "",
        f"| variant | step ms (median) | round medians ms (min-max) | vs {ref} (median of rounds)"
        " | per-round ratio min-max | tokens/s | tokens/s per GPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in report["variants"].items():
        if "step_ms" not in v:
            lines.append(f"| {name} | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {name} | {v['step_ms']:.1f} | {v['round_median_min_ms']:.1f}-"
            f"{v['round_median_max_ms']:.1f} | {v['ratio']:.3f} | {v['ratio_min']:.3f}-"
            f"{v['ratio_max']:.3f} | {v['tokens_per_s']:,.0f} | "
            f"{v.get('tokens_per_s_per_gpu', v['tokens_per_s']):,.0f} |")
    gpu = [r.get("gpu") or {} for r in report["rounds"]]
    if any("sm_clock_MHz" in g for g in gpu):
        lines += ["", "GPU at the end of each round:", "",
                  "| round | order | SM MHz | power W | temperature C |", "|---|---|---|---|---|"]
        for i, (r, g) in enumerate(zip(report["rounds"], gpu)):
            power = f"{g['power_W']:.0f}" if "power_W" in g else "-"
            lines.append(f"| {i} | {', '.join(r['order'])} | {g.get('sm_clock_MHz', '-')} | "
                         f"{power} | {g.get('temperature_C', '-')} |")
    if not report["complete"]:
        lines += ["", f"incomplete: {len(report['rounds'])} of {c['rounds']} rounds"]
    return "\n".join(lines + [""])


def write(out_dir: Path, name: str, report: dict) -> None:
    """<out_dir>/<name>.json (atomically) and <out_dir>/<name>.md."""
    mt.write_report(out_dir, name, report, markdown)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """memory_throughput.parse_args plus --rounds, --steps-per-round, --reference; checks the
    variants and the setup (ValueError) before anything is built."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__.split("\n\n")[0],
        epilog="The other options are memory_throughput.py's (see its --help): --preset, "
               "--micro-batch, --seq, --vocab, --zero-stage, --precision, --warmup, --lr, "
               "--weight-decay, --grad-clip, --seed, --out-dir, --name, --time-limit-s (no "
               "round starts that would end after it).")
    own.add_argument("--variants", required=True,
                     help="comma-separated names of memory_throughput.VARIANTS; the first is "
                          "the reference unless --reference")
    own.add_argument("--reference", default=None, help="ratios are against it (default: the "
                                                       "first of --variants)")
    own.add_argument("--rounds", type=int, default=6)
    own.add_argument("--steps-per-round", type=int, default=5)
    own.add_argument("--turn-warmup", type=int, default=1,
                     help="untimed steps at the start of each variant's turn (see run())")
    own.add_argument("--profile-steps", type=int, default=0,
                     help="profile this many steps of each variant after the rounds")
    own.add_argument("--trace-dir", default=None, help="keep rank 0's chrome traces here")
    own.add_argument("--profile-top", type=int, default=25)
    mine, rest = own.parse_known_args(argv)
    args = mt.parse_args(rest + ["--variants", mine.variants])
    defaults = mt.parse_args([])
    unused = [k for k in _UNUSED if getattr(args, k) != getattr(defaults, k)]
    if unused:
        raise ValueError(
            "step_time.py does not take " + ", ".join("--" + k.replace("_", "-") for k in unused)
            + ": start it with torchrun for several processes; it times --rounds x "
              "--steps-per-round steps")
    names = [n for n in mine.variants.split(",") if n]
    unknown = [n for n in names if n not in mt.VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(mt.VARIANTS)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--variants must name each variant once, got {mine.variants!r}")
    reference = mine.reference or names[0]
    if reference not in names:
        raise ValueError(f"the reference {reference!r} is not in --variants {names}")
    if mine.rounds < 1 or mine.steps_per_round < 1 or min(args.warmup, mine.turn_warmup) < 0:
        raise ValueError("--rounds and --steps-per-round must be >= 1, --warmup and "
                         "--turn-warmup >= 0")
    if mine.profile_steps < 0:
        raise ValueError("--profile-steps must be >= 0")
    from compact_dist.training.train_config import world_from_environment

    world = world_from_environment()[2]
    if world % args.tp:
        raise ValueError(f"--tp {args.tp} does not divide the world size {world}")
    if "--name" not in rest and not any(a.startswith("--name=") for a in rest):
        args.name = f"steptime_{args.preset}"
    args.names, args.reference = names, reference
    args.rounds, args.steps_per_round = mine.rounds, mine.steps_per_round
    args.turn_warmup = mine.turn_warmup
    args.profile_steps, args.trace_dir = mine.profile_steps, mine.trace_dir
    args.profile_top = mine.profile_top
    args.command = " ".join([sys.executable, str(Path(__file__).resolve()), *argv])
    return args


def _fitting(what: str, resident: dict, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """fn(*args, **kwargs); a CUDA out-of-memory becomes a SystemExit that names `what` and
    the engines already resident (the caller's `finally` releases them)."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:  # OutOfMemoryError, or cuBLAS / NCCL "out of memory"
        if not (isinstance(err, torch.cuda.OutOfMemoryError)
                or "out of memory" in str(err).lower()):
            raise
        message = str(err).splitlines()[0][:200]
    # outside the except block, so the traceback's tensors are gone before the release
    raise SystemExit(f"step_time.py: {what} ran out of memory with {len(resident)} engine(s) "
                     f"resident ({', '.join(resident) or 'none'}): {message}. All variants must "
                     f"fit in memory together: drop variants or lower --micro-batch.")


def slowest_rank(bench: "mt.Bench", times: list[float]) -> list[float]:
    """Each step's time, the maximum over the ranks (collective; as is with one process)."""
    if bench.world == 1:
        return times
    t = torch.tensor(times, dtype=torch.float64, device=bench.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def profile_steps(bench: "mt.Bench", state: dict, batch: dict, args: argparse.Namespace,
                  name: str) -> dict:
    """torch.profiler over args.profile_steps train steps of one variant (every rank records;
    rank 0's result is returned): ops by self CUDA and self CPU time per step, and the
    device's busy / idle time (profile_model.host_summary of the chrome trace)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from profile_model import host_summary

    n, top = args.profile_steps, args.profile_top
    bench.timed_steps(state, batch, args.turn_warmup)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
    with profile(activities=activities) as prof:
        ms = bench.timed_steps(state, batch, n)
    if bench.rank != 0:
        return {}
    trace_dir = Path(args.trace_dir) if args.trace_dir else Path(tempfile.mkdtemp())
    trace_dir.mkdir(parents=True, exist_ok=True)
    trace = trace_dir / f"{args.name}_{name.replace('/', '-')}.json"
    prof.export_chrome_trace(str(trace))
    host = host_summary(trace, 12)
    if not args.trace_dir:
        trace.unlink()
    events = list(prof.key_averages())

    def table(key: str) -> list[dict]:
        rows = sorted(events, key=lambda e: -getattr(e, key))[:top]
        return [{"name": e.key[:120], "calls_per_step": e.count / n,
                 "self_cuda_ms_per_step": e.self_device_time_total / 1e3 / n,
                 "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n} for e in rows]

    return {"step_ms": ms, "host_per_step": {
                k: (v / n if k.endswith("_ms") else v) for k, v in host.items()},
            "self_cuda_ms_per_step": sum(e.self_device_time_total for e in events) / 1e3 / n,
            "self_cpu_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1e3 / n,
            "by_cuda": table("self_device_time_total"), "by_cpu": table("self_cpu_time_total")}


def profile_markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"# {report['name']}: {report['device']} x{report['world_size']}", "",
             f"preset {c['preset']}, micro-batch {c['micro_batch_size']}, TP {c['tp']} (SP "
             f"{c['sequence_parallel']}), DP {c['dp']}, ZeRO {c['zero_stage']}; torch.profiler "
             f"over {report['steps']} step(s) per variant after the timed rounds, rank 0; "
             "times per step.", "",
             "| variant | step ms (profiled) | device busy ms | device idle ms | self CUDA ms |"
             " self CPU ms |", "|---|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        h = v["host_per_step"]
        lines.append(f"| {name} | {statistics.median(v['step_ms']):.1f} | "
                     f"{h.get('device_busy_ms', 0):.1f} | {h.get('device_idle_ms', 0):.1f} | "
                     f"{v['self_cuda_ms_per_step']:.1f} | {v['self_cpu_ms_per_step']:.1f} |")
    for name, v in report["variants"].items():
        for key, title in (("by_cuda", "self CUDA"), ("by_cpu", "self CPU")):
            lines += ["", f"## {name}: ops by {title} time", "",
                      "| op | calls/step | self CUDA ms/step | self CPU ms/step |",
                      "|---|---|---|---|"]
            lines += [f"| {r['name'][:90]} | {r['calls_per_step']:.0f} | "
                      f"{r['self_cuda_ms_per_step']:.2f} | {r['self_cpu_ms_per_step']:.2f} |"
                      for r in v[key]]
    return "\n".join(lines + [""])


def run(args: argparse.Namespace) -> dict:
    """Build every variant, warm them up, time the interleaved rounds; returns the report.

    Each turn starts with --turn-warmup untimed steps: a CompAct layer skips the A P^T term
    only while no optimizer step began anywhere in the process since its own merge
    (compact_dist.core.factor_state.OptimizerSteps), so the first forward after another variant's
    step takes the exact W0 + A P^T path, which a lone training run never does."""
    bench = mt.Bench(args)
    bench.init()
    shape, out = bench.shape, Path(args.out_dir)
    report: dict[str, Any] = {
        "benchmark": "step_time", "name": args.name,
        "device": torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu",
        "versions": mt._versions(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": args.command,
        "world_size": bench.world,
        "config": {"preset": args.preset, **shape, "tp": bench.tp, "dp": bench.dp,
                   "sequence_parallel": bench.sp, "zero_stage": args.zero_stage,
                   "precision": "bf16" if bench.bf16 else "fp32", "warmup": args.warmup,
                   "rounds": args.rounds, "steps_per_round": args.steps_per_round,
                   "turn_warmup": args.turn_warmup,
                   "reference": args.reference, "data": "uniform random tokens"},
        "method": METHOD.format(warmup=args.warmup, rounds=args.rounds,
                                turn_warmup=args.turn_warmup, steps=args.steps_per_round),
        "variants": {n: {"overrides": mt.VARIANTS[n], "step_ms_rounds": []} for n in args.names},
        "rounds": [], "complete": False,
    }
    states: dict[str, dict] = {}
    try:
        for name in args.names:
            bench.log(f"building {name}")
            states[name] = _fitting(f"building {name}", states, bench.build,
                                    bench.config(mt.VARIANTS[name]), saved_bytes=False)
        batch = bench.batch(shape["micro_batch_size"])
        bench.log(f"warm-up: {args.warmup} step(s) of each variant")
        for name in args.names:
            report["variants"][name]["warmup_ms"] = _fitting(
                f"warming up {name}", states, bench.timed_steps, states[name], batch, args.warmup)
        longest = 0.0
        for i, order in enumerate(round_orders(args.names, args.rounds)):
            if i and not bench.agree(mt.should_start(bench.elapsed(), args.time_limit_s,
                                                     1.1 * longest)):
                break
            start = time.perf_counter()
            for name in order:
                bench.timed_steps(states[name], batch, args.turn_warmup)
                report["variants"][name]["step_ms_rounds"].append(slowest_rank(
                    bench, bench.timed_steps(states[name], batch, args.steps_per_round)))
            longest = max(longest, time.perf_counter() - start)
            report["rounds"].append({"order": order, "wall_s": time.perf_counter() - start,
                                     "gpu": gpu_sample(bench.device) if bench.rank == 0
                                     else None})
            summarize(report)
            bench.log(f"round {i}: " + ", ".join(
                f"{n} {v['round_median_ms'][-1]:.1f} ms ({v['ratio_rounds'][-1]:.3f})"
                for n, v in report["variants"].items()))
            if bench.rank == 0:
                write(out, args.name, report)
        report["complete"] = len(report["rounds"]) == args.rounds
        if args.profile_steps:
            profiles = {}
            for name in args.names:
                bench.log(f"profiling {name}: {args.profile_steps} step(s)")
                profiles[name] = profile_steps(bench, states[name], batch, args, name)
            if bench.rank == 0:
                mt.write_report(out, f"{args.name}_profile",
                                {"name": f"{args.name}_profile", "device": report["device"],
                                 "world_size": bench.world, "config": report["config"],
                                 "steps": args.profile_steps, "variants": profiles},
                                profile_markdown)
        report["elapsed_s"] = bench.elapsed()
        if bench.rank == 0:
            write(out, args.name, report)
    finally:
        for state in states.values():
            bench.release(state)
        states.clear()
    return report


def main(argv: Optional[list[str]] = None) -> dict:
    import warnings

    warnings.filterwarnings("ignore", message="full scope is deprecated")  # megatron-core 0.16.1
    args = parse_args(argv)
    try:
        return run(args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        raise SystemExit(f"step_time.py: error: {err}") from None
