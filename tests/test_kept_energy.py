"""Kept-energy telemetry: what P keeps of the exact weight gradient G = dY^T X, measured by the
probe (one process, TP=2 row- and column-parallel, DP=2), against a direct computation."""

import re

import pytest
import torch

from compact_dist.core.config import CompressionConfig, LayerCompression
from compact_dist.core.subspace import SubspaceStepper
from layer_utils import build

N, M, S, B, RATIO, BLOCKS = 64, 48, 16, 4, 0.25, 8


def _inputs():
    """X [S, B, N] with a few dominant directions and dY [S, B, M] (probe loss sum(Y * dY))."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(S, B, 6, generator=gen) @ torch.randn(6, N, generator=gen) * 3
    x = x + torch.randn(S, B, N, generator=gen)
    return x, torch.randn(S, B, M, generator=gen)


def _orthonormal_basis(kind: str) -> torch.Tensor:
    """A data-aware-like P: orthonormal blocks [kb, n_b, r_b] of the whole (TP=1) layer."""
    kb = BLOCKS if kind == "row" else 1
    gen = torch.Generator().manual_seed(11)
    blocks = torch.randn(kb, N // kb, int(RATIO * N) // kb, generator=gen, dtype=torch.float64)
    return torch.linalg.qr(blocks)[0].float()


def _reference(kind: str, x: torch.Tensor, dy: torch.Tensor, blocks: torch.Tensor,
               parts: int = 1) -> float:
    """sum_d ||G_d Q||^2 / sum_d ||G_d||^2, G_d = dY_d^T X_d over `parts` micro-batch slices
    (data-parallel ranks), Q an orthonormal basis of span(P) per block, in fp64."""
    q = torch.block_diag(*[torch.linalg.qr(b.double())[0] for b in blocks])
    kept = total = 0.0
    for xd, gd in zip(x.double().chunk(parts, 1), dy.double().chunk(parts, 1)):
        g = torch.einsum("sbm,sbn->mn", gd, xd)
        kept += (g @ q).pow(2).sum().item()
        total += g.pow(2).sum().item()
    return kept / total


def _measure(layer, x, dy, orthonormal_basis=None) -> float:
    """The stepper's measurement on one probe (resample_interval=1: every step measures)."""
    if orthonormal_basis is not None:
        layer.resample_projection(orthonormal_basis)
    stepper = SubspaceStepper(torch.nn.ModuleList([layer]), CompressionConfig(
        ratio=RATIO, row_parallel_blocks=BLOCKS, projection="gaussian", resample_interval=1),
        measure_kept_energy=True)

    def probe():
        y, _ = layer(x.clone().requires_grad_())  # parameters are frozen in the probe
        return (y * dy).sum()

    assert stepper.before_step(probe)
    assert layer.subspace_factor.grad is None and layer.bias.grad is None
    (value,) = stepper.kept_energy.tolist()
    return value


@pytest.mark.usefixtures("megatron_tp1")
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("p", ["gaussian", "orthonormal"])
def test_kept_energy_equals_the_direct_computation_from_the_exact_gradient(kind, p):
    x, dy = _inputs()
    comp = LayerCompression(ratio=RATIO, row_parallel_blocks=BLOCKS)
    layer = build(kind, N, M, comp)
    basis = _orthonormal_basis(kind) if p == "orthonormal" else None
    blocks = basis if basis is not None else layer.projection_blocks()
    expected = _reference(kind, x, dy, blocks)
    assert _measure(layer, x, dy, basis) == pytest.approx(expected, rel=1e-5)
    if p == "gaussian":  # the projection onto span(P), not ||G P||^2 (~ ||G||^2 on average)
        assert expected < 0.9


def test_kept_energy_is_measured_right_before_each_resample_only():
    x, dy = _inputs()
    layer = build("column", N, M, LayerCompression(ratio=RATIO))
    stepper = SubspaceStepper(torch.nn.ModuleList([layer]), CompressionConfig(
        ratio=RATIO, projection="gaussian", resample_interval=3), measure_kept_energy=True)
    measured = []
    for _ in range(6):
        measured.append(stepper.before_step(lambda: (layer(x.requires_grad_())[0] * dy).sum()))
        assert (stepper.kept_energy is not None) == measured[-1]
        stepper.after_step(0.0, 0.0)
    assert measured == [False, False, True, False, False, True]
    with pytest.raises(ValueError, match="probe_loss"):
        stepper.steps = 2
        stepper.before_step()


def _distributed_case(rank, tp):
    """TP=2 (column- and row-parallel) or DP=2 (tp=1): each rank probes its shard; the
    fraction matches the single-process computation on the whole G (DP: the stacked ranks'
    micro-batch gradients), and is the same on every rank."""
    import torch.distributed as dist

    from layer_utils import layer_config

    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    x, dy = _inputs()
    comp = LayerCompression(ratio=RATIO, row_parallel_blocks=BLOCKS)
    for kind in ("column", "row"):
        for p in ("gaussian", "orthonormal"):
            whole = build(kind, N, M, comp, tp_group=singles[rank])
            basis = _orthonormal_basis(kind) if p == "orthonormal" else None
            blocks = basis if basis is not None else whole.projection_blocks()
            expected = _reference(kind, x, dy, blocks, parts=1 if tp > 1 else 2)
            ours = build(kind, N, M, comp,
                         config=layer_config(tensor_model_parallel_size=tp))
            x_in, dy_in = x, dy
            if tp == 1:  # data parallel: this rank's half of the micro-batch
                x_in, dy_in = x.chunk(2, 1)[rank], dy.chunk(2, 1)[rank]
            elif kind == "column":  # rows of W (and of G) are sharded
                dy_in = dy.chunk(tp, -1)[rank]
            else:  # columns of W and of G, and P's blocks over them
                x_in = x.chunk(tp, -1)[rank]
                basis = None if basis is None else basis.chunk(tp, 0)[rank]
            value = _measure(ours, x_in, dy_in, basis)
            assert value == pytest.approx(expected, rel=1e-5), (kind, p, tp)
            values = [None, None]
            dist.all_gather_object(values, value)
            assert values[0] == values[1], (kind, p, tp)


@pytest.mark.parametrize("tp", [1, 2])
def test_kept_energy_sums_over_tensor_and_data_parallel_ranks(tp):
    from distributed import run_distributed

    run_distributed(_distributed_case, 2, tp, tp=tp)


def _events(directory) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars in a tensorboardX event directory (TFRecord
    framing: length, its CRC, the Event proto, its CRC)."""
    import struct
    from pathlib import Path

    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in Path(directory).glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_compact_train_reports_kept_energy_and_the_probe_leaves_training_alone(
        tmp_path, capfd):
    """A DP=2 run with ZeRO-3, full recompute (whose backward runs inside the probe's) and
    dropout (the probe draws from the RNG) measures at steps 2 and 4 (resample_interval=2):
    the progress line's fields, the warning (threshold above the measured mean), the summary
    line, and TensorBoard scalars per layer; its losses are the losses of the same run without
    telemetry (the probe leaves gradients and RNG states alone; ZeRO 1/2 without recompute:
    test_train's comparisons with DDP, which does not probe)."""
    from test_train import small, train

    tb = tmp_path / "tb"
    overrides = small(tmp_path, "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
                      "train.zero_stage=3", "compression.base_dtype=bf16",
                      "recompute.granularity=full")
    got = train(2, overrides + ["logging.kept_energy_warn_below=1.0",
                                f"logging.tensorboard_dir={tb}"], tmp_path, "on")
    out = capfd.readouterr().out
    lines = [re.sub(r"^\[[\d :-]+\] ", "", line) for line in out.splitlines()]  # timestamps
    measured = [line for line in lines if "kept energy" in line and line.startswith("iteration")]
    assert [line.split("|")[0].split()[1] for line in measured] == ["2/4", "4/4"], out
    assert all("worst" in line and "fc2" in line for line in measured), measured
    warnings = [line for line in lines if line.startswith("warning:") and "projection keeps" in line]
    # the first measurement (step 2) scores the P of the initialisation: no warning
    assert len(warnings) == 1 and "at step 4" in warnings[0], out
    assert "compression.resample_interval" in warnings[0], out
    assert any(line.startswith("kept energy at step 4: mean") for line in lines), out
    scalars = _events(tb)
    layers = [t for t in scalars if t.startswith("quality/kept_energy/decoder.layers.")]
    assert len(layers) == 8, layers  # 2 layers x qkv, proj, fc1, fc2
    for tag in layers + ["quality/kept_energy/mean", "quality/kept_energy/role/fc2"]:
        assert set(scalars[tag]) == {2, 4} and all(0 < v <= 1 for v in scalars[tag].values())
    mean = float(measured[-1].split("kept energy ")[1].split()[0])
    assert scalars["quality/kept_energy/mean"][4] == pytest.approx(mean, abs=5e-4)
    off = train(2, overrides + ["logging.kept_energy=false"], tmp_path, "off")
    assert got["losses"] == off["losses"]
    assert "kept energy" not in capfd.readouterr().out


def test_kept_energy_warning_threshold_is_checked_at_load():
    from compact_dist.training.train_config import load_train_config

    with pytest.raises(ValueError, match="kept_energy_warn_below"):
        load_train_config(None, ["logging.kept_energy_warn_below=1.5"])


@pytest.mark.usefixtures("megatron_tp1")
def test_report_names_layers_and_warns_only_below_the_threshold_with_the_right_advice():
    from compact_dist.training.quality import KeptEnergyReport

    model = torch.nn.ModuleDict({
        "qkv": build("column", N, M, LayerCompression(ratio=RATIO), tp_comm_buffer_name="qkv"),
        "fc2": build("row", N, M, LayerCompression(ratio=RATIO), tp_comm_buffer_name="fc2")})
    pca = CompressionConfig(ratio=RATIO, resample_interval=50)
    report = KeptEnergyReport(model, pca, warn_below=0.8)
    report.record(50, torch.tensor([0.2, 0.2]))
    assert report.warning() is None  # the measurement at step T scores the P of the init
    scalars = report.record(100, torch.tensor([0.9, 0.6]))
    assert scalars["quality/kept_energy/qkv"] == pytest.approx(0.9)
    assert scalars["quality/kept_energy/role/fc2"] == pytest.approx(0.6)
    assert scalars["quality/kept_energy/worst"] == pytest.approx(0.6)
    assert "worst 0.600 fc2" in report.fields()
    assert "resample_interval (now 50)" in report.warning()  # mean 0.75 < 0.8
    report.record(150, torch.tensor([0.9, 0.8]))
    assert report.warning() is None  # mean 0.85
    assert "lowest mean 0.200 at step 50" in report.summary()
    gaussian = KeptEnergyReport(model, CompressionConfig(ratio=RATIO, projection="gaussian"),
                                warn_below=0.8)
    gaussian.record(400, torch.tensor([0.25, 0.25]))  # after T = 200: warns
    assert "compression.projection=pca" in gaussian.warning()
