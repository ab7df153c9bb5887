"""compact-memory (profiler) and compact-plan (analytic prediction, planner) on a tiny model.

The planner's per-op activation formulas must reproduce the bytes the profiler measures with
saved_tensors_hooks (CPU, fp32, learned positions, SDPA's flash / math backend), and the
static breakdown must be the model's actual parameter bytes.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compact_dist.tools.memory_plan import (
    _describe,
    activation_bytes,
    main as plan_main,
    param_counts,
    parse_args as plan_parse_args,
    plan,
    predict,
    setup_from,
)
from compact_dist.tools.memory_report import model_static_bytes, record_saved_tensors, static_bytes, summarize
from compact_dist.training.train_config import load_train_config

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.seq_length=32", "train.micro_batch_size=2", "data.vocab_size=512",
        "model.position_embedding=learned_absolute"]
VOCAB = 512


def _measure(cfg, attention: str = "flash"):
    from compact_dist.training.model_setup import build_model

    model = build_model(cfg, torch.device("cpu"), False, VOCAB)
    s, b = cfg.model.seq_length, cfg.train.micro_batch_size
    tokens = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(s).unsqueeze(0).expand(b, -1)

    def forward():
        return model(tokens, positions, None, labels=tokens)

    if attention == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return model, record_saved_tensors(forward, model)
    return model, record_saved_tensors(forward, model)


VARIANTS = {
    "baseline": ["compression.enabled=false"],
    "compact_r1/4": ["compression.ratio=0.25"],
    "compact_r1/8": ["compression.ratio=0.125"],
    "baseline_recompute_full": ["compression.enabled=false", "recompute.granularity=full"],
    "compact_r1/4_recompute_selective": ["compression.ratio=0.25",
                                         "recompute.granularity=selective"],
    "compact_r1/4_gqa": ["compression.ratio=0.25", "model.num_query_groups=2"],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_activation_prediction_matches_profiler(megatron_tp1, name):
    cfg = load_train_config(None, TINY + VARIANTS[name])
    _, records = _measure(cfg)
    measured = summarize(records)
    predicted = activation_bytes(setup_from(cfg, 1, "cpu", "flash"))
    total = measured["total_bytes"]
    assert abs(predicted["total"] - total) <= 0.02 * total, (name, predicted, measured)
    if cfg.recompute.granularity != "full":   # per layer, and the rest outside the layers
        layer0 = measured["per_layer_bytes"]["0"]
        assert abs(predicted["per_layer"] - layer0) <= 0.02 * layer0
        assert set(measured["per_layer_bytes"]) == {"0", "1", "None"}


def test_math_backend_keeps_the_probabilities(megatron_tp1):
    """With SDPA's math backend the [b, heads, s, s] probabilities are kept: the formula
    takes the backend as input and still matches."""
    cfg = load_train_config(None, TINY + ["compression.ratio=0.25"])
    _, records = _measure(cfg, attention="math")
    measured = summarize(records)["total_bytes"]
    math_pred = activation_bytes(setup_from(cfg, 1, "cpu", "math"))["total"]
    flash_pred = activation_bytes(setup_from(cfg, 1, "cpu", "flash"))["total"]
    assert abs(math_pred - measured) <= 0.02 * measured
    assert abs(flash_pred - measured) > 0.02 * measured   # the backend matters here


def test_profiler_attributes_sources_and_layers(megatron_tp1):
    cfg = load_train_config(None, TINY + ["compression.ratio=0.25", "compression.exact_input=[]"])
    _, records = _measure(cfg)
    summary = summarize(records)
    sites = " ".join(row["site"] for row in summary["layer0_sites"])
    assert "compressed_linear" in sites and "attention.py" in sites and "mlp.py" in sites
    outside = " ".join(row["site"] for row in summary["outside_sites"])
    assert "cross_entropy" in outside
    # the four compact linears of layer 0 save Z = X P: [s, b, r] with r = n / 4
    z = [r for r in records if r.layer == 0 and "compressed_linear" in r.site]
    assert sorted(r.shape[-1] for r in z) == [16, 16, 16, 32]
    assert summary["total_bytes"] == sum(r.nbytes for r in records)


def test_static_breakdown_is_the_parameter_bytes(megatron_tp1):
    from compact_dist.training.model_setup import build_model

    for ratio_args in (["compression.ratio=0.25"], ["compression.ratio=0.25",
                                                    "compression.base_dtype=bf16"],
                       ["compression.enabled=false"]):
        cfg = load_train_config(None, TINY + ratio_args)
        model = build_model(cfg, torch.device("cpu"), False, VOCAB)
        actual = sum(p.numel() * p.element_size() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        s = model_static_bytes(model, zero_stage=0, dp=1, bf16=False)
        params = s["W0 (frozen bases)"] + s["A (trainable factors)"] + s["other trainable params"]
        assert params == actual
        assert s["Adam moments"] == 8 * trainable and s["gradients"] == 4 * trainable
        # the planner counts the same parameters from the config alone
        n = param_counts(setup_from(cfg, 1, "cpu", "flash", VOCAB))
        assert n["w0_bytes"] + 4 * (n["a"] + n["other"]) == actual
        assert n["a"] + n["other"] == trainable
    # ZeRO partitioning per DP size: masters and moments from ZeRO-1, gradients from ZeRO-2,
    # parameters (W0 too, in the training dtype) at ZeRO-3
    z = [static_bytes(w0_bytes=400, w0_elems=100, a=10, other=30, zero_stage=k, dp=4, bf16=True)
         for k in range(4)]
    assert z[0]["fp32 masters"] == 160 and z[1]["fp32 masters"] == 40
    assert z[1]["gradients"] == 80 and z[2]["gradients"] == 20
    assert z[2]["W0 (frozen bases)"] == 400 and z[3]["W0 (frozen bases)"] == 50
    assert z[3]["A (trainable factors)"] == 5 and z[1]["Adam moments"] == 80


def test_peak_prediction_orders_the_options():
    """Memory levers lower the predicted peak; the JSON line carries the prediction."""
    base = TINY[:-1] + ["model.num_layers=4", "model.hidden_size=256", "model.seq_length=256",
                        "train.micro_batch_size=8", "data.vocab_size=8000"]

    def peak(*extra):
        cfg = load_train_config(None, base + list(extra))
        return predict(setup_from(cfg, 1, "cuda", "flash"))["peak_allocated"]

    baseline = peak("compression.enabled=false")
    assert peak("compression.ratio=0.125") < peak("compression.ratio=0.25") < baseline
    assert peak("compression.enabled=false", "recompute.granularity=full") < baseline
    assert peak("compression.enabled=false", "activations.fused_cross_entropy=true",
                "activations.cross_entropy_chunk_tokens=256") < baseline
    assert peak("compression.enabled=false", "activations.fp8_storage=[swiglu]") < baseline
    assert (peak("compression.ratio=0.25", "compression.base_dtype=bf16")
            < peak("compression.ratio=0.25"))


def test_plan_writes_a_loadable_yaml(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    plan_main(["--preset", "tiny", "--budget-gib", "80", "--out", str(out),
               "--micro-batches", "1,2", "train.global_batch_size=2"])
    text = capsys.readouterr().out
    assert "fit 80 GiB" in text and str(out) in text
    cfg = load_train_config(str(out))
    assert cfg.model.hidden_size == 128 and cfg.train.micro_batch_size in (1, 2)
    # the fastest under the FLOP model at this budget: the largest micro-batch, compressed
    assert cfg.train.micro_batch_size == 2 and cfg.compression.enabled
    plan_main(["--predict", "--config", str(out)])
    line = json.loads(capsys.readouterr().out)
    assert line["peak_allocated_GiB"] > 0 and line["micro_batch"] == 2


LLAMA_7B = str(Path(__file__).resolve().parents[1] / "configs" / "train" / "llama_7b.yaml")


def test_plan_writes_only_configs_compact_train_accepts(tmp_path, capsys):
    """For a grid of (world size, TP, device), every candidate compact-plan lists passes
    compact-train's checks for that world and device, and the written config loads and
    passes check_environment (an offload config the planner writes is trained by compact-train
    in tests/test_offload.py). The 7B config asks for ZeRO-3 (with a bf16 W0); at
    data-parallel size 1 the plan takes ZeRO-1 (the lowest stage tried), whose fp32 W0
    ZeRO-3 with bf16 could not keep."""
    for config, world, tp, device in itertools.product(
            (["--config", LLAMA_7B], ["--preset", "tiny", "data.vocab_size=512"]),
            (1, 2, 8), (1, 2), ("cuda", "cpu")):
        argv = [*config, "--world-size", str(world), "--tp", str(tp), "--device", device,
                "--budget-gib", "100000", "--micro-batches", "1,2", "--fp8", "none",
                "--fused-ce", "false"]
        out = tmp_path / f"plan_{world}_{tp}_{device}.yaml"
        where = (config[1], world, tp, device)
        if world % tp:
            with pytest.raises(ValueError, match="accepts none of the candidates.*world size "
                               f"{world} is not divisible by TP size {tp}"):
                plan(plan_parse_args(argv))
            continue
        rows, best = plan(plan_parse_args(argv))
        for row in rows:
            row["cfg"].check_launch(world, has_cuda=device == "cuda")
        # optimizer offload is a candidate (compact-plan's default --offload none,cpu)
        assert any(r["cfg"].train.offload_optimizer == "cpu" for r in rows), where
        plan_main(argv + ["--out", str(out)])
        capsys.readouterr()
        cfg = load_train_config(str(out))
        cfg.check_environment(world, has_cuda=device == "cuda")
        assert cfg.model_dump() == best["cfg"].model_dump(), where
        if world // tp == 1:   # nothing to partition: the lowest stage that fits
            assert cfg.train.zero_stage == 1, where
        lower = {}             # a higher stage is listed only where it lowers the peak
        for row in sorted(rows, key=lambda r: r["cfg"].train.zero_stage):
            others = json.dumps({**row["cfg"].model_dump(), "train": {
                **row["cfg"].train.model_dump(), "zero_stage": None}})
            assert row["peak"] < lower.get(others, float("inf")), where
            lower[others] = row["peak"]


def test_plan_of_the_7b_config_on_one_gpu_is_accepted(tmp_path, monkeypatch, capsys):
    """The issue's command: one GPU, 80 GiB. It writes ./plan.yaml when --out is not given;
    compact-train accepts that file for one CUDA process."""
    monkeypatch.chdir(tmp_path)
    plan_main(["--config", LLAMA_7B, "--world-size", "1", "--tp", "1", "--budget-gib", "80",
               "--device", "cuda"])
    assert "written to plan.yaml" in capsys.readouterr().out
    cfg = load_train_config("plan.yaml")
    cfg.check_environment(1, has_cuda=True)
    assert cfg.train.zero_stage == 1
    assert (tmp_path / "plan.yaml").read_text().startswith(
        "# written by compact-plan for world size 1 on cuda, 80 GiB per GPU\n")


def test_plan_prefers_the_lowest_zero_stage_that_fits(tmp_path, capsys):
    """7B at TP=2 x DP=8, bf16 W0: ZeRO-1 and ZeRO-3 predict the same step time (the model
    leaves communication out) and ZeRO-3 the lower peak; the plan takes ZeRO-1 while it
    fits and ZeRO-3 only when the budget demands it."""
    out = tmp_path / "plan.yaml"
    stages = {}
    for budget in ("40", "22"):
        plan_main(["--config", LLAMA_7B, "--world-size", "16", "--budget-gib", budget,
                   "--w0", "bf16", "--ratios", "1/4", "--fp8", "none", "--fused-ce", "false",
                   "--recompute", "none", "--micro-batches", "2", "--out", str(out)])
        stages[budget] = load_train_config(str(out)).train.zero_stage
    capsys.readouterr()
    assert stages == {"40": 1, "22": 3}


def test_impossible_budget_names_the_smallest_peak(capsys):
    with pytest.raises(SystemExit) as err:
        plan_main(["--preset", "1.3b", "--budget-gib", "1", "--out", "/dev/null"])
    message = str(err.value)
    assert "no candidate fits 1 GiB" in message and "smallest" in message
    assert "predicted at" in message and "GiB reserved" in message


def _tokenizer_json(path: Path) -> str:
    """A tokenizer.json of 600 tokens (BPE trained here on random words), as data.tokenizer
    takes it: padded 640 at TP=1 and 2, where byte pads to 320 / 384 and bpe to 512."""
    import random

    from compact_dist.training.tokenizer import Tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
             for _ in range(400)]
    docs = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(20)]
    Tokenizer.train_bpe(docs, 600).save(path)
    return str(path)


def test_plan_takes_the_vocabulary_of_a_path_tokenizer(tmp_path, capsys):
    """compact-plan sizes the embedding / output layer from data.tokenizer's vocabulary,
    padded for TP as compact-train pads it (600 -> 640 at TP=2), not from data.vocab_size."""
    from compact_dist.training.tokenizer import load_tokenizer

    tok = _tokenizer_json(tmp_path / "tok.json")
    assert load_tokenizer(tok).vocab_size == 600
    cfg = load_train_config(None, TINY + [f"data.tokenizer={tok}",
                                          "parallel.tensor_model_parallel_size=2"])
    setup = setup_from(cfg, 2, "cuda", "flash")
    assert setup.vocab == 640
    assert setup_from(load_train_config(None, TINY), 1, "cuda", "flash").vocab == 512  # bpe
    assert setup_from(load_train_config(None, TINY + ["data.tokenizer=byte"]), 1, "cuda",
                      "flash").vocab == 320
    peaks = {}  # the planner's candidates: each one predicts more with 640 vocabulary rows
    for name, extra in (("path", [f"data.tokenizer={tok}"]), ("bpe", [])):
        rows, _ = plan(plan_parse_args(["--budget-gib", "80", "--world-size", "2", "--zero",
                                        "1", "--ratios", "1/4", "--w0", "fp32", "--fp8", "none",
                                        "--recompute", "none", *TINY,
                                        "parallel.tensor_model_parallel_size=2", *extra]))
        peaks[name] = {tuple(_describe(r["cfg"])): r["peak"] for r in rows}
    assert peaks["path"].keys() == peaks["bpe"].keys() and len(peaks["bpe"]) >= 2
    assert all(peaks["path"][k] > peaks["bpe"][k] for k in peaks["bpe"])
    plan_main(["--predict", *TINY, f"data.tokenizer={tok}"])
    assert json.loads(capsys.readouterr().out)["peak_allocated_GiB"] > 0
    with pytest.raises(SystemExit, match=r"compact-plan: data.tokenizer='/nonexistent.json': no "
                                         r"such file"):
        plan_main(["--predict", *TINY, "data.tokenizer=/nonexistent.json"])


def test_compact_memory_cli_json(tmp_path):
    """compact-memory on a run whose data.tokenizer is a tokenizer.json: its vocabulary (600,
    padded to 640) sizes the profiled model."""
    tok = _tokenizer_json(tmp_path / "tok.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "compact_dist.tools.memory_report", "--json",
                           "--world-size", "4", "train.zero_stage=2", *TINY, f"data.tokenizer={tok}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["dp"] == 4 and report["zero_stage"] == 2
    assert report["vocab_padded"] == 640
    assert report["saved"]["total_bytes"] > 0 and report["saved"]["layer0_sites"]
    static = report["static"]
    assert static["gradients"] * 4 == (static["A (trainable factors)"]
                                       + static["other trainable params"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("extra", [["compression.enabled=false"], ["compression.ratio=0.25"],
                                   ["compression.enabled=false", "activations.fused_swiglu=true"]])
def test_gpu_activation_prediction_matches_profiler(megatron_tp1, extra):
    """bf16, rope, fused RMSNorm, flash SDPA: the GPU rows of the formula table."""
    from compact_dist.training.model_setup import build_model

    cfg = load_train_config(None, ["model.num_layers=2", "model.hidden_size=256",
                                   "model.num_attention_heads=4", "model.seq_length=256",
                                   "train.micro_batch_size=2", "data.vocab_size=4096",
                                   "model.position_embedding=rope",
                                   "activations.fused_swiglu=false", *extra])
    device = torch.device("cuda", torch.cuda.current_device())
    model = build_model(cfg, device, True, 4096)
    tokens = torch.randint(0, 4096, (2, 256), device=device)
    positions = torch.arange(256, device=device).unsqueeze(0).expand(2, -1)
    records = record_saved_tensors(lambda: model(tokens, positions, None, labels=tokens), model)
    measured = summarize(records)["total_bytes"]
    predicted = activation_bytes(setup_from(cfg, 1, "cuda", "flash", 4096))["total"]
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured, summarize(records))


LLAMA_7B_24GB = str(Path(LLAMA_7B).with_name("llama_7b_24gb.yaml"))


def test_offload_moves_the_optimizer_state_to_the_host():
    """train.offload_optimizer=cpu: the fp32 masters and Adam moments leave the GPU for the
    host (18 bytes per element of this rank's partition, ZeRO-1: masters, moments, fp32
    gradients, bf16 staging copy), the peak drops, the step pays the host step and PCIe."""
    def predicted(*extra):
        cfg = load_train_config(LLAMA_7B, ["parallel.tensor_model_parallel_size=1",
                                           "train.zero_stage=1", "train.global_batch_size=2",
                                           "compression.ratio=0.25", *extra])
        return predict(setup_from(cfg, 1, "cuda", "flash")), param_counts(
            setup_from(cfg, 1, "cuda", "flash"))

    plain, counts = predicted()
    off, _ = predicted("train.offload_optimizer=cpu")
    trainable = counts["a"] + counts["other"]
    assert plain["host_bytes"] == 0 and off["host_bytes"] == 18 * trainable
    assert off["static"]["fp32 masters"] == off["static"]["Adam moments"] == 0
    assert plain["static"]["fp32 masters"] == 4 * trainable
    assert off["peak_allocated"] < plain["peak_allocated"] - 11 * trainable
    assert off["step_time_s"] > plain["step_time_s"]


def test_plan_finds_the_24gb_preset_only_with_offload(tmp_path, capsys):
    """The preset configs/train/llama_7b_24gb.yaml is what compact-plan writes for one
    24 GiB GPU (its header's command; levers here narrowed to a set that holds the winner),
    predicted under 22 GiB allocated with the host memory offload takes, at a global batch
    of 512 sequences of 2048; without offload nothing fits."""
    from compact_dist.tools.memory_plan import prediction_line

    out = tmp_path / "plan.yaml"
    argv = ["--config", LLAMA_7B, "--tp", "1", "--budget-gib", "24", "--ratios", "1/4",
            "--zero", "1,2", "--w0", "bf16", "--fp8", "none,swiglu+attention+norm",
            "--recompute", "none,full", "--micro-batches", "1,2", "--out", str(out),
            "train.global_batch_size=512", "compression.projection=gaussian"]
    plan_main(argv)
    capsys.readouterr()
    written = load_train_config(str(out)).model_dump()
    preset = load_train_config(LLAMA_7B_24GB)
    written["checkpoint"]["dir"] = preset.checkpoint.dir
    assert written == preset.model_dump()
    preset.check_environment(1, has_cuda=True)
    line = prediction_line(setup_from(preset, 1, "cuda", "flash"))
    assert line["peak_allocated_GiB"] < 22 and line["peak_reserved_GiB"] <= 24, line
    assert line["host_GiB"] > 20 and line["offload_optimizer"] == "cpu", line
    assert line["micro_batch"] * line["gradient_accumulation"] >= 256
    assert preset.model.seq_length == 2048 and preset.compression.ratio == 0.25
    with pytest.raises(SystemExit, match="no candidate fits 24 GiB"):
        plan_main(argv + ["--offload", "none"])


def test_sketch_and_basis_prediction_is_what_the_layers_hold(megatron_tp1):
    """pca: the planner's fp32 basis and estimating-step sketch bytes are what the compact
    layers hold (row-parallel layers in 2 blocks): a warm-started sketch owns S and Q0's extra
    columns only (its first columns are the basis); the first one, from the Gaussian P, owns
    all of Q0 and there is no basis yet: the same total."""
    from compact_dist.core.subspace import compact_layers
    from compact_dist.training.model_setup import build_model

    cfg = load_train_config(None, TINY + ["compression.ratio=0.25", "compression.projection=pca",
                                          "compression.row_parallel_blocks=2"])
    model = build_model(cfg, torch.device("cpu"), False, VOCAB)
    layers = compact_layers(model)
    predicted = predict(setup_from(cfg, 1, "cpu", "flash"))["projection"]
    first = sum(layer.start_sketch("pca").stored_bytes() for layer in layers)
    for layer in layers:  # as after an estimate: an orthonormal basis of the same shape
        layer.resample_projection(torch.linalg.qr(layer.projection_blocks())[0])
    basis = sum(layer.basis.untyped_storage().nbytes() for layer in layers)
    sketches = [layer.start_sketch("pca") for layer in layers]
    assert all(sk.kept is layer.basis for sk, layer in zip(sketches, layers))
    warm = sum(sk.stored_bytes() for sk in sketches)
    assert predicted["P basis (fp32, data-aware)"] == basis
    assert predicted["sketch S, Q0 extra columns (fp32, estimating steps)"] == warm
    assert first == warm + basis


@pytest.mark.parametrize("warm,chunk_blocks", [(False, 1), (True, 3)])
def test_estimate_prediction_is_what_the_estimate_holds(megatron_tp1, monkeypatch, warm,
                                                        chunk_blocks):
    """pca, the estimate after the estimating step's merge: the sketches and new bases the
    layers hold at once peak at the planner's sketch (+ basis: the first estimate's sketch
    owns all of Q0) + 'step 3: one layer's new basis' terms: each layer gets its own new
    basis and its sketch's S and Q0 are freed once that basis is done, before the next
    layer's is made. Row-parallel layers of 2 blocks; chunks of 1 block or 3 (a chunk
    spanning two layers)."""
    import sys

    from compact_dist.core import basis
    from compact_dist.core.subspace import compact_layers, resample_projections
    from compact_dist.training.model_setup import build_model

    cfg = load_train_config(None, TINY + ["compression.ratio=0.25", "compression.projection=pca",
                                          "compression.row_parallel_blocks=2",
                                          "compression.layers=[proj]"])
    model = build_model(cfg, torch.device("cpu"), False, VOCAB)
    layers = compact_layers(model)
    b, rank = layers[0].projection_blocks().shape[1:]
    monkeypatch.setattr(basis, "CHUNK_ELEMENTS", chunk_blocks * b * rank)
    predicted = predict(setup_from(cfg, 1, "cpu", "flash"))
    if warm:  # as after an estimate: an orthonormal basis of the same shape
        for layer in layers:
            layer.resample_projection(torch.linalg.qr(layer.projection_blocks())[0])
    gen = torch.Generator().manual_seed(0)
    for layer in layers:
        sketch = layer.start_sketch("pca")
        sketch.add_input(torch.randn(40, sketch.num_blocks * b, generator=gen))
    held, release = [], basis.SubspaceSketch.release

    def measured_release(sketch):  # held bytes peak right before each release
        new = sys._getframe(1).f_locals["out"]  # bases_from_factors' new bases so far
        held.append(sum(layer.sketch.stored_bytes() for layer in layers)
                    + sum(p.untyped_storage().nbytes() for p in new if p is not None))
        release(sketch)

    monkeypatch.setattr(basis.SubspaceSketch, "release", measured_release)
    resample_projections(model)
    assert len(held) == len(layers) == 2 and all(layer.basis is not None for layer in layers)
    proj, estimate = predicted["projection"], predicted["estimate_transients"]
    new_bases = estimate["step 3: one layer's new basis"]
    assert new_bases == 4 * b * rank * 2
    assert max(held) == (proj["sketch S, Q0 extra columns (fp32, estimating steps)"]
                         + (0 if warm else proj["P basis (fp32, data-aware)"]) + new_bases)
    assert predicted["phases"]["estimate P"] >= new_bases
