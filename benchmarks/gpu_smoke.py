"""GPU check of the compact layers against Megatron-core on one GPU, plus a first memory and
step-time reading of a small LLaMA-style GPT, baseline vs compact, in the same process.

    python benchmarks/gpu_smoke.py --out results.json

Checks (each raises on failure): CUDA-initialised compact layers match Megatron's forward and
dX and give dL/dA = dY^T X P in bf16; a GPT with RoPE, SDPA attention and full recompute
trains (loss falls). Then measures peak allocated memory and median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F


def setup():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from compact_dist.rng import model_parallel_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1)
    model_parallel_manual_seed(1234)


def check_layers(report):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from compact_dist import CompactColumnParallelLinear, CompactRowParallelLinear, LayerCompression

    cfg = TransformerConfig(num_layers=1, hidden_size=1024, num_attention_heads=8,
                            params_dtype=torch.bfloat16, bf16=True)
    init = lambda w: torch.nn.init.normal_(w, std=0.02)
    n, m = 1024, 2048
    for kind, ref_cls, cls, kw in (
        ("column", ColumnParallelLinear, CompactColumnParallelLinear, dict(gather_output=False)),
        ("row", RowParallelLinear, CompactRowParallelLinear,
         dict(input_is_parallel=True, skip_bias_add=False)),
    ):
        torch.cuda.manual_seed(0)
        ref = ref_cls(n, m, config=cfg, init_method=init, bias=False, **kw)
        comp = cls(n, m, config=cfg, init_method=init, bias=False,
                   compression=LayerCompression(ratio=0.25, base_dtype="bf16"), layer_id=1, **kw)
        with torch.no_grad():
            comp.weight.copy_(ref.weight)
        x = torch.randn(256, 4, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(256, 4, m, device="cuda", dtype=torch.bfloat16)
        y_ref, _ = ref(x)
        dx_ref, = torch.autograd.grad(y_ref, [x], g)
        y, _ = comp(x)
        dx, da = torch.autograd.grad(y, [x, comp.subspace_factor], g)
        P = comp.projection.matrix(0, x.device, torch.float32)
        G = g.reshape(-1, m).float().t() @ x.detach().reshape(-1, n).float()
        rel = ((da.float() - G @ P).norm() / (G @ P).norm()).item()
        report[f"{kind}_fwd_equal"] = bool(torch.equal(y, y_ref))
        report[f"{kind}_dx_equal"] = bool(torch.equal(dx, dx_ref))
        report[f"{kind}_dA_rel_err_bf16"] = rel
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref) and rel < 2e-2, report


def gpt_config(layers, hidden, heads, ffn, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=ffn,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, params_dtype=torch.bfloat16, bf16=True, **kw)


def check_gpt_trains(report):
    from compact_dist import CompressionConfig, SubspaceStepper, optimizer_param_groups
    from compact_dist.model import build_gpt_model

    comp = CompressionConfig(ratio=0.25, resample_interval=10)
    cfg = gpt_config(2, 256, 4, 704, recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    torch.manual_seed(0)
    model = build_gpt_model(cfg, comp, 512, 256).cuda()
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.0), lr=3e-3)
    stepper = SubspaceStepper(model, comp)
    tokens = torch.randint(0, 512, (4, 256), device="cuda")
    pos = torch.arange(256, device="cuda").unsqueeze(0).expand(4, -1)
    losses = []
    for _ in range(30):
        loss = model(tokens, pos, None, labels=tokens.roll(-1, 1)).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        stepper.after_step(3e-3, 0.0, opt)
        losses.append(loss.item())
    report["gpt_rope_recompute_losses"] = [losses[0], losses[-1]]
    assert losses[-1] < 0.5 * losses[0], losses


def measure(report, layers, hidden, heads, ffn, seq, mbs, steps=6):
    from compact_dist import CompressionConfig, SubspaceStepper, optimizer_param_groups
    from compact_dist.model import build_gpt_model

    results = {}
    variants = {
        "baseline": CompressionConfig(enabled=False),
        "compact_r1/2": CompressionConfig(ratio=0.5),
        "compact_r1/4": CompressionConfig(ratio=0.25),
        "compact_r1/8": CompressionConfig(ratio=0.125),
        "compact_r1/4_bf16W0": CompressionConfig(ratio=0.25, base_dtype="bf16"),
        "unbiased_r1/4": CompressionConfig(ratio=0.25, mode="unbiased"),
    }
    vocab = 32000
    for name, comp in variants.items():
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        model = build_gpt_model(gpt_config(layers, hidden, heads, ffn), comp, vocab, seq).cuda()
        opt = torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=1e-4, fused=True)
        stepper = SubspaceStepper(model, comp)
        tokens = torch.randint(0, vocab, (mbs, seq), device="cuda")
        pos = torch.arange(seq, device="cuda").unsqueeze(0).expand(mbs, -1)
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = model(tokens, pos, None, labels=tokens.roll(-1, 1)).float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            stepper.after_step(1e-4, 0.1, opt)
            end.record()
            torch.cuda.synchronize()
            if i >= 2:
                times.append(start.elapsed_time(end))
        params = sum(p.numel() for p in model.parameters())
        ms = statistics.median(times)
        results[name] = {
            "peak_alloc_GiB": torch.cuda.max_memory_allocated() / 2**30,
            "step_ms": ms,
            "tokens_per_s": mbs * seq / ms * 1e3,
            "params": params,
        }
        print(name, results[name], flush=True)
        del model, opt, stepper
    base = results["baseline"]
    for name, r in results.items():
        r["mem_vs_baseline"] = r["peak_alloc_GiB"] / base["peak_alloc_GiB"]
        r["time_vs_baseline"] = r["step_ms"] / base["step_ms"]
    report["measure"] = {"shape": dict(layers=layers, hidden=hidden, heads=heads, ffn=ffn,
                                       seq=seq, micro_batch=mbs), "results": results}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_smoke.json")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--mbs", type=int, default=4)
    args = parser.parse_args()
    setup()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    try:
        check_layers(report)
        check_gpt_trains(report)
        measure(report, args.layers, args.hidden, 16, int(8 / 3 * args.hidden) // 64 * 64,
                args.seq, args.mbs)
    finally:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
