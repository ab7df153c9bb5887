"""Plots and markdown tables from the benchmark JSONs (runs on CPU; needs matplotlib).

    python benchmarks/plot_results.py                       # every JSON in benchmarks/results
    python benchmarks/plot_results.py run1.json dir/ --out-dir plots/

Per memory_throughput JSON `<name>.json`: `<name>_memory_vs_time.png` (peak memory per GPU
against step time, one labelled point per variant; on CPU results, which have no peak memory,
the bytes saved for backward per sequence instead) and `<name>.md`.
All memory_throughput JSONs together: `memory_throughput_summary.md` (one row per run and
variant: TP, DP, ZeRO, memory, throughput) and, for those with TP-invariance losses,
`tp_invariance.md` / `.json` / `.png` (losses per TP x DP layout, max difference to the first
layout with the same settings). With the step_time JSONs: `scaling.md` (tokens/s per GPU of
each variant and its run's baseline, by model and GPU count).
Per merged convergence JSON (`convergence.py --merge`): `<stem>_ppl.png` (validation
perplexity against training tokens, and its ratio to the mean of the baseline seeds with
the seeds' spread shaded; unfinished variants dashed) and `<stem>.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load(paths: list[str]) -> list[tuple[Path, dict]]:
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    out = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"skipping {f}: {err}")
            continue
        if isinstance(data, dict) and "benchmark" in data:
            out.append((f, data))
    return out


def plot_memory_throughput(report: dict, out: Path) -> Path:
    plt = _plt()
    variants = {n: r for n, r in report["variants"].items() if r.get("step_ms")}
    has_peak = any(r.get("peak_alloc_GiB") is not None for r in variants.values())
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, r in variants.items():
        if has_peak:
            y = r.get("peak_alloc_GiB")
        else:
            y = r.get("saved_for_backward_bytes_per_sequence", 0) / 2**20
        if y is None:
            continue
        x = r["step_ms"]
        marker = "s" if name.startswith("baseline") else ("^" if "unbiased" in name else "o")
        ax.scatter([x], [y], marker=marker, s=60)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    cfg = report["config"]
    ax.set_xlabel("median step time (ms)")
    ax.set_ylabel("peak allocated memory per GPU (GiB)" if has_peak
                  else "bytes saved for backward per sequence (MiB)")
    ax.set_title(f"{report['name']}: {cfg['preset']}, seq {cfg['seq_length']}, mbs "
                 f"{cfg['micro_batch_size']}, TP{cfg['tp']} DP{cfg['dp']} ZeRO-{cfg['zero_stage']}"
                 f"\n{report['device']}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"{report['name']}_memory_vs_time.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_convergence(merged: dict, out: Path, stem: str) -> Path:
    """Validation perplexity against training tokens (every variant; unfinished ones dashed),
    and below it each variant's perplexity over the reference: the mean of the baseline seeds
    (one baseline: that run), with the seeds' spread (|ppl1 - ppl2| / mean) shaded."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 8), sharex=True,
                                  gridspec_kw={"height_ratios": [2, 1]})
    for name, e in merged["variants"].items():
        curve = e["curve"]
        tokens = [p["tokens"] / 1e6 for p in curve]
        style = "-" if e.get("complete", True) else "--"
        line, = ax.plot(tokens, [p["ppl"] for p in curve], style, label=name, marker=".",
                        markersize=3)
        ratio = [(t, p["ppl_ratio_vs_baseline"]) for t, p in zip(tokens, curve)
                 if p.get("ppl_ratio_vs_baseline") is not None]
        if ratio:
            ax2.plot([t for t, _ in ratio], [r for _, r in ratio], style, label=name,
                     color=line.get_color())
    ref = [p for p in (merged.get("reference") or {}).get("curve", [])
           if p.get("noise_pct") is not None]
    if ref:
        t = [p["tokens"] / 1e6 for p in ref]
        half = [p["noise_pct"] / 200 for p in ref]
        ax2.fill_between(t, [1 - h for h in half], [1 + h for h in half], color="grey",
                         alpha=0.25, label="baseline seed spread")
    ax.set_yscale("log")
    ax.set_ylabel("validation perplexity")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3, which="both")
    ax2.axhline(1.0, color="black", linewidth=0.8)
    ax2.set_xlabel("training tokens (M)")
    seeds = (merged.get("reference") or {}).get("seeds") or ["baseline"]
    ax2.set_ylabel("ppl / baseline ppl" if len(seeds) < 2 else "ppl / mean baseline ppl")
    ax2.grid(alpha=0.3)
    # the early steps' ratios are far from 1; zoom on the part where the curves matter
    late = [p["ppl_ratio_vs_baseline"] for e in merged["variants"].values()
            for p in e["curve"][len(e["curve"]) // 4:] if p.get("ppl_ratio_vs_baseline")]
    if late:
        lo, hi = min(late + [1.0]), max(late + [1.0])
        pad = 0.1 * (hi - lo) + 0.005
        ax2.set_ylim(lo - pad, hi + pad)
    cfg = merged.get("config", {})
    if cfg:
        ax.set_title(f"{cfg.get('layers')}L h{cfg.get('hidden')} seq {cfg.get('seq')}, "
                     f"{(merged.get('model_params') or 0) / 1e6:.0f}M params, "
                     f"{merged.get('device', '')}", fontsize=10)
    fig.tight_layout()
    path = out / f"{stem}_ppl.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary_table(reports: list[dict]) -> str:
    lines = ["| run | device | preset | TP | DP | ZeRO | SP | variant | W0 | peak GiB/GPU | "
             "step ms | tokens/s (global) | MFU | TP all-gather bwd MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        c = r["config"]
        for name, v in r["variants"].items():
            if not v.get("step_ms"):
                continue
            peak = v.get("peak_alloc_GiB")
            ag = ((v.get("tp_allgather_bytes") or {}).get("backward") or {}).get("tp")
            lines.append(
                f"| {r['name']} | {r['device']} | {c['preset']} | {c['tp']} | {c['dp']} | "
                f"{c['zero_stage']} | {c['sequence_parallel']} | {name} | "
                f"{', '.join(sorted(v.get('w0_dtypes_after_init') or {})) or '-'} | "
                f"{'-' if peak is None else f'{peak:.2f}'} | {v['step_ms']:.1f} | "
                f"{v.get('tokens_per_s', 0):,.0f} | {v.get('mfu', 0):.3f} | "
                f"{'-' if ag is None else f'{ag / 2**20:.1f}'} |")
    return "\n".join(lines) + "\n"


def scaling_table(reports: list[tuple[str, dict]]) -> str:
    """Tokens/s per GPU of every variant against the baseline of the same run, by model and
    number of GPUs (memory_throughput: variants one after another; step_time: interleaved
    rounds, the more reliable ratio). reports: (file stem, JSON) pairs."""
    rows = []
    for stem, r in reports:
        c = r["config"]
        c = {**c, "tp": c.get("tp") or 1, "dp": c.get("dp") or 1}  # one-GPU step_time runs
        c["sequence_parallel"] = c.get("sequence_parallel", False)
        gpus = c["tp"] * c["dp"]
        base = r["variants"].get("baseline") or {}
        if not base.get("step_ms"):
            continue

        def per_gpu(v: dict) -> float:
            return v.get("tokens_per_s_per_gpu") or v.get("tokens_per_s", 0.0) / gpus

        how = "interleaved" if r["benchmark"] == "step_time" else "sequential"
        layout = (f"TP{c['tp']} x DP{c['dp']}, ZeRO-{c['zero_stage']}"
                  f"{', SP' if c['sequence_parallel'] else ''}")
        for name, v in r["variants"].items():
            if name == "baseline" or not v.get("step_ms"):
                continue
            ratio = v.get("ratio") or v["step_ms"] / base["step_ms"]
            rows.append((c["preset"], gpus, layout, c["micro_batch_size"], stem, how, name,
                         per_gpu(base), per_gpu(v), ratio, r.get("device", "")))
    lines = ["| model | GPUs | layout | micro-batch | run | measured | variant | "
             "baseline tokens/s/GPU | variant tokens/s/GPU | step time vs baseline | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda t: (t[0], t[1], t[2], t[4], t[6])):
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {:,.0f} | {:,.0f} | {:.3f} | {} |"
                     .format(*row))
    return ("# Tokens/s per GPU at 1, 2 and 4 GPUs\n\nEach variant against the baseline of "
            "its own run (step time ratio: interleaved runs give the median of per-round "
            "ratios; sequential runs the ratio of medians, which drifts with the host).\n\n"
            + "\n".join(lines) + "\n")


def tp_invariance(reports: list[dict]) -> dict[str, Any]:
    """Group runs with TP-invariance losses by settings; per variant, each layout's losses
    and max |loss - loss of the reference layout| (the smallest TP x DP of the group)."""
    groups: dict[str, list[dict]] = {}
    for r in reports:
        inv = r.get("tp_invariance")
        if not inv or not inv.get("losses"):
            continue
        c = r["config"]
        shape = inv.get("shape") or c
        key = (f"{inv.get('preset', c['preset'])} seq{shape['seq_length']} vocab"
               f"{shape['vocab_size']} gb{inv['global_batch']} lr{inv['lr']} {c['precision']}")
        groups.setdefault(key, []).append(r)
    out: dict[str, Any] = {}
    for key, runs in groups.items():
        runs.sort(key=lambda r: (r["config"]["tp"] * r["config"]["dp"], r["config"]["tp"]))
        ref = runs[0]
        entry: dict[str, Any] = {"reference": ref["name"], "runs": {}}
        for r in runs:
            c = r["config"]
            layout = f"TP{c['tp']} DP{c['dp']} ZeRO-{c['zero_stage']} SP={c['sequence_parallel']}"
            per = {}
            for variant, losses in r["tp_invariance"]["losses"].items():
                base = ref["tp_invariance"]["losses"].get(variant)
                diff = None
                if base:
                    n = min(len(base), len(losses))
                    diff = max(abs(a - b) for a, b in zip(losses[:n], base[:n])) if n else None
                per[variant] = {"losses": losses, "max_abs_diff_vs_reference": diff}
            entry["runs"][f"{r['name']} ({layout})"] = per
        out[key] = entry
    return out


def tp_invariance_markdown(inv: dict[str, Any]) -> str:
    lines = ["# TP-invariance: losses on fixed data at different TP x DP layouts", ""]
    for key, entry in inv.items():
        lines += [f"## {key} (reference: {entry['reference']})", "",
                  "| run | variant | max abs diff vs reference | first losses |",
                  "|---|---|---|---|"]
        for run, per in entry["runs"].items():
            for variant, v in per.items():
                d = v["max_abs_diff_vs_reference"]
                lines.append(f"| {run} | {variant} | {'-' if d is None else f'{d:.2e}'} | "
                             + ", ".join(f"{x:.4f}" for x in v["losses"][:8]) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_tp_invariance(inv: dict[str, Any], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, entry in inv.items():
        for run, per in entry["runs"].items():
            for variant, v in per.items():
                ax.plot(range(1, len(v["losses"]) + 1), v["losses"], marker=".",
                        label=f"{variant} {run.split('(')[-1].rstrip(')')}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "tp_invariance.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", default=[str(HERE / "results")],
                        help="JSON files or directories of them")
    parser.add_argument("--out-dir", default=None, help="default: the first input's directory")
    args = parser.parse_args(argv)
    loaded = load(args.inputs)
    if not loaded:
        raise SystemExit(f"no benchmark JSON found in {args.inputs}")
    first = Path(args.inputs[0])
    out = Path(args.out_dir) if args.out_dir else (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    mt_reports = []
    from convergence import merged_markdown
    from memory_throughput import markdown_table

    for path, data in loaded:
        kind = data["benchmark"]
        if kind == "memory_throughput":
            mt_reports.append(data)
            if any(v.get("step_ms") for v in data["variants"].values()):
                written.append(plot_memory_throughput(data, out))
            md = out / f"{data['name']}.md"
            md.write_text(markdown_table(data))
            written.append(md)
        elif kind == "convergence_merged":
            written.append(plot_convergence(data, out, path.stem))
            md = out / f"{path.stem}.md"
            md.write_text(merged_markdown(data))
            written.append(md)
    timed = [(path.stem, data) for path, data in loaded
             if data["benchmark"] in ("memory_throughput", "step_time")]
    if timed:
        (out / "scaling.md").write_text(scaling_table(timed))
        written.append(out / "scaling.md")
    if mt_reports:
        summary = out / "memory_throughput_summary.md"
        summary.write_text(summary_table(mt_reports))
        written.append(summary)
        inv = tp_invariance(mt_reports)
        if inv:
            (out / "tp_invariance.json").write_text(json.dumps(inv, indent=1))
            (out / "tp_invariance.md").write_text(tp_invariance_markdown(inv))
            written += [out / "tp_invariance.json", out / "tp_invariance.md",
                        plot_tp_invariance(inv, out)]
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
