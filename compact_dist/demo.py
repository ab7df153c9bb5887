"""Embedded demo: a small LLaMA-style GPT on real text, CompAct vs the Megatron baseline.

`python -m compact_dist.demo` (or `compact-demo`) runs on CPU in about a minute with no
downloads: the corpus is the running interpreter's standard-library source, byte-level
tokens. It prints the bytes each linear saves for backward with and without compression,
then trains both models from the same initialisation and reports validation loss.
"""

from __future__ import annotations

import argparse
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def stdlib_corpus(max_bytes: int) -> torch.Tensor:
    """Bytes of the interpreter's own .py files, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        tokens = torch.stack([data[s : s + seq] for s in starts])
        labels = torch.stack([data[s + 1 : s + seq + 1] for s in starts])
        yield tokens, labels


def init_single_process() -> torch.device:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from compact_dist.rng import model_parallel_manual_seed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1)
    model_parallel_manual_seed(1234)
    return device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--mode", choices=["subspace", "unbiased"], default="subspace")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)

    device = init_single_process()
    from megatron.core.transformer.transformer_config import TransformerConfig

    from compact_dist import CompressionConfig, SubspaceStepper, compact_layers
    from compact_dist.memory import saved_activation_bytes
    from compact_dist.model import build_gpt_model
    from compact_dist.subspace import optimizer_param_groups

    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
        ffn_hidden_size=int(8 / 3 * args.hidden) // 8 * 8, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
        use_cpu_initialization=True,
    )
    data = stdlib_corpus(4_000_000)
    split = int(0.95 * len(data))
    train, val = data[:split], data[split:]
    print(f"corpus: {len(data):,} bytes of {sysconfig.get_paths()['stdlib']}/*.py; "
          f"device {device.type}")

    runs = {
        "baseline": CompressionConfig(enabled=False),
        f"compact r={args.ratio}": CompressionConfig(ratio=args.ratio, mode=args.mode),
    }
    models = {}
    for name, compression in runs.items():
        torch.manual_seed(0)
        models[name] = build_gpt_model(config, compression, 256, args.seq).to(device)

    # bytes saved for backward by each linear role, one micro-batch
    print("\nbytes saved for backward per linear, one micro-batch "
          f"[s={args.seq}, b={args.batch}]:")
    print(f"{'layer':<6}{'baseline':>12}{'compact':>12}{'ratio':>8}")
    base_layer, comp_layer = (m.decoder.layers[0] for m in models.values())
    for role, path in (("qkv", "self_attention.linear_qkv"), ("proj", "self_attention.linear_proj"),
                       ("fc1", "mlp.linear_fc1"), ("fc2", "mlp.linear_fc2")):
        b_mod, c_mod = base_layer.get_submodule(path), comp_layer.get_submodule(path)
        width = b_mod.input_size_per_partition if hasattr(b_mod, "input_size_per_partition") \
            else b_mod.input_size
        inp = torch.randn(args.seq, args.batch, width, device=device, requires_grad=True)
        bb = saved_activation_bytes(lambda: b_mod(inp), b_mod)
        cb = saved_activation_bytes(lambda: c_mod(inp), c_mod)
        print(f"{role:<6}{bb:>12,}{cb:>12,}{cb / bb:>8.3f}")

    for name, model in models.items():
        compression = runs[name]
        opt = torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))
        stepper = SubspaceStepper(model, compression)
        positions = torch.arange(args.seq, device=device).unsqueeze(0).expand(args.batch, -1)
        stream = batches(train, args.batch, args.seq, seed=1)
        start = time.perf_counter()
        print(f"\n== {name}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
              f"trainable params, {len(compact_layers(model))} compact linears")
        for step in range(1, args.steps + 1):
            tokens, labels = (t.to(device) for t in next(stream))
            lr = args.lr * min(1.0, step / 10)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = model(tokens, positions, None, labels=labels).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            stepper.after_step(lr, 0.1, opt)
            if step % 25 == 0 or step == 1:
                tok_s = step * args.batch * args.seq / (time.perf_counter() - start)
                print(f"step {step:4d}  loss {loss.item():.3f}  {tok_s:,.0f} tok/s")
        model.eval()
        with torch.no_grad():
            vstream = batches(val, args.batch, args.seq, seed=2)
            vloss = sum(
                model(t.to(device), positions, None, labels=l.to(device)).mean().item()
                for t, l in (next(vstream) for _ in range(8))
            ) / 8
        print(f"{name}: validation loss {vloss:.3f}  perplexity {math.exp(vloss):.2f}")


if __name__ == "__main__":
    main()
