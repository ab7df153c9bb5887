"""Data-aware projections (pca / gradient), the merge scale, and Adam moments on resample."""

import copy

import pytest
import torch

from compact_dist.core.basis import SubspaceSketch, kept_fraction, transport_map
from compact_dist.core.config import CompressionConfig, LayerCompression
from compact_dist.core.moments import reset_moments, subspace_step_count, transport_moments
from compact_dist.core.subspace import SubspaceStepper, optimizer_param_groups
from layer_utils import build

N, M, RATIO = 64, 48, 0.25
pytestmark = pytest.mark.usefixtures("megatron_tp1")


def low_rank_input(tokens: int, n: int, rank: int, seed: int = 0, noise: float = 0.05):
    """X [tokens, 1, n] whose energy lies mostly in a random rank-`rank` subspace U (n x rank),
    plus isotropic noise; returns (X, U)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, rank, generator=gen))
    scales = torch.linspace(3.0, 1.0, rank)
    x = (torch.randn(tokens, rank, generator=gen) * scales) @ u.t()
    x = x + noise * torch.randn(tokens, n, generator=gen)
    return x.unsqueeze(1), u


def energy(x: torch.Tensor, blocks: torch.Tensor) -> float:
    """Fraction of ||X||^2 that the span of a (block-diagonal) P keeps, per block summed."""
    kb, b, _ = blocks.shape
    xb = x.reshape(-1, kb, b)
    kept = 0.0
    for j in range(kb):
        q, _ = torch.linalg.qr(blocks[j].double())
        kept += (xb[:, j].double() @ q).pow(2).sum().item()
    return kept / x.double().pow(2).sum().item()


def _train_steps(layer, cfg, inputs, probe=None):
    model = torch.nn.ModuleList([layer])
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.0), lr=1e-3)
    stepper = SubspaceStepper(model, cfg)
    for x in inputs:
        stepper.before_step(probe)
        y, _ = layer(x)
        opt.zero_grad()
        y.pow(2).mean().backward()
        opt.step()
        stepper.after_step(1e-3, 0.0, opt)
    return opt, stepper


@pytest.mark.parametrize("kind, blocks", [("column", 1), ("row", 4)])
def test_pca_captures_the_dominant_subspace_and_gaussian_does_not(kind, blocks):
    rank = int(RATIO * N)
    x, _ = low_rank_input(512, N, rank // blocks if kind == "row" else rank)
    if kind == "row":  # each block gets its own low-rank slice
        parts = [low_rank_input(512, N // blocks, rank // blocks, seed=j)[0]
                 for j in range(blocks)]
        x = torch.cat(parts, dim=-1)
    comp = dict(ratio=RATIO, row_parallel_blocks=blocks)
    gauss = build(kind, N, M, LayerCompression(**comp))
    pca = build(kind, N, M, LayerCompression(**comp))
    cfg = CompressionConfig(projection="pca", resample_interval=50, moments_on_resample="keep",
                            **comp)
    _train_steps(pca, cfg, [x])  # step 0 sketches X, P switches after it
    assert pca.projection_epoch == 1 and pca.basis is not None
    p = pca.projection_blocks()
    eye = torch.eye(p.shape[-1]).expand_as(p.transpose(1, 2) @ p)
    torch.testing.assert_close(p.transpose(1, 2) @ p, eye, atol=1e-5, rtol=0)
    pca_energy, gauss_energy = energy(x, p), energy(x, gauss.projection_blocks())
    assert pca_energy >= 0.95, pca_energy
    assert gauss_energy < 0.7, gauss_energy
    # the merge scale is update_scale, for an orthonormal P as for a Gaussian one
    assert pca.merge_scale == 1.0


def test_gradient_probe_finds_gradient_row_space_and_leaves_grads_alone():
    """G = dY^T X lives in the span of the directions that dY selects; the probe's P captures
    >= 95% of ||G||^2 while X itself is isotropic (so PCA of X could not find it)."""
    rank = int(RATIO * N)
    layer = build("column", N, M, LayerCompression(ratio=RATIO))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 1, N, generator=gen)
    u, _ = torch.linalg.qr(torch.randn(N, rank, generator=gen))
    target = torch.randn(M, N, generator=gen) @ (u @ u.t())  # loss pulls W only along U

    def probe():
        y, _ = layer(x.clone().requires_grad_())  # parameters are frozen in the probe
        return (y * (x @ target.t())).mean()

    model = torch.nn.ModuleList([layer])
    cfg = CompressionConfig(ratio=RATIO, projection="gradient", moments_on_resample="keep")
    stepper = SubspaceStepper(model, cfg)
    assert stepper.before_step(probe)
    assert layer.subspace_factor.grad is None and layer.bias.grad is None
    with torch.no_grad():
        dy = x @ target.t() / x.shape[0]
        grad = torch.einsum("tbm,tbn->mn", dy, x)
    stepper.after_step(0.0, 0.0)
    p = layer.projection_blocks()[0]
    kept = (grad.double() @ p.double()).pow(2).sum() / grad.double().pow(2).sum()
    assert kept >= 0.95, kept
    assert not stepper.before_step(probe)  # next estimate only at the next resample


def test_gradient_projection_without_probe_is_an_error():
    layer = build("column", N, M, LayerCompression(ratio=RATIO))
    cfg = CompressionConfig(ratio=RATIO, projection="gradient")
    x = torch.randn(8, 1, N)
    with pytest.raises(ValueError, match="probe_loss"):
        _train_steps(layer, cfg, [x])
    stepper = SubspaceStepper(torch.nn.ModuleList([layer]), cfg)
    with pytest.raises(RuntimeError, match="no probe"):
        stepper.after_step(0.0, 0.0)


def test_forward_with_unmerged_factor_applies_the_merge_scale():
    """W_eff = W0 + s A P^T: outputs with a non-zero A equal outputs after the merge."""
    layer = build("row", N, M, LayerCompression(ratio=RATIO,
                                                row_parallel_blocks=4, update_scale=0.3))
    x, _ = low_rank_input(64, N, 8)
    cfg = CompressionConfig(ratio=RATIO, projection="pca", row_parallel_blocks=4,
                            update_scale=0.3)
    _train_steps(layer, cfg, [x])
    assert layer.merge_scale == pytest.approx(0.3)
    with torch.no_grad():
        layer.subspace_factor.normal_()
    before, _ = layer(x)
    layer.merge_subspace()
    after, _ = layer(x)
    torch.testing.assert_close(before, after, atol=1e-4, rtol=1e-4)


def test_transport_keeps_the_first_moment_when_the_new_basis_spans_the_old():
    """P_new = P_old Q (a rotation within the same span): M_new P_new^T == M_old P_old^T."""
    layer = build("row", N, M, LayerCompression(ratio=RATIO,
                                                row_parallel_blocks=2))
    model = torch.nn.ModuleList([layer])
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.0), lr=1e-3)
    x = torch.randn(32, 1, N)
    layer(x)[0].pow(2).mean().backward()
    opt.step()
    layer.merge_subspace()
    old = torch.linalg.qr(torch.randn(2, N // 2, 8))[0]
    rot = torch.linalg.qr(torch.randn(2, 8, 8))[0]
    new = old @ rot
    r = transport_map(old, new)
    torch.testing.assert_close(r, rot, atol=1e-5, rtol=0)
    state = opt.state[layer.subspace_factor]
    m_old, v_old = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    transport_moments(opt, [layer.subspace_factor], [r], [kept_fraction(old, new, r)])

    def full(m, basis):  # M P^T for a block-diagonal P
        return torch.cat([m[:, j * 8:(j + 1) * 8] @ basis[j].t() for j in range(2)], dim=1)

    assert m_old.abs().max() > 1e-4
    torch.testing.assert_close(full(state["exp_avg"], new), full(m_old, old), atol=1e-8,
                               rtol=1e-4)
    assert (state["exp_avg_sq"] >= 0).all()
    # second moment: v (R o R); a signed permutation keeps it exactly
    perm = torch.eye(8)[torch.randperm(8)] * torch.tensor([1.0, -1.0] * 4)
    state["exp_avg_sq"].copy_(v_old)
    state["exp_avg"].copy_(m_old)
    transport_moments(opt, [layer.subspace_factor], [perm.expand(2, 8, 8)],
                      [torch.ones(2, 8)])
    torch.testing.assert_close(state["exp_avg_sq"],
                               torch.cat([v_old[:, :8] @ perm.abs(), v_old[:, 8:] @ perm.abs()],
                                         dim=1), atol=0, rtol=1e-6)


@pytest.mark.parametrize("beta2", [0.95, 0.999])
def test_transport_new_directions_start_no_larger_than_the_steady_step(beta2):
    """Half of P_new's directions are new (orthogonal to P_old). Adam (step count kept by
    transport) then takes its first update there with a transported second moment; it must
    be at most 1.5x the steady-state update (without the prior of moments.py: ~2.5x at
    beta2 0.95, ~17x at 0.999), while the kept directions move as before."""
    rows, kb, n_b, r_b = 64, 2, N // 2, 8
    layer = build("row", N, M, LayerCompression(ratio=RATIO, row_parallel_blocks=kb))
    factor = layer.subspace_factor
    assert factor.shape == (M, kb * r_b)
    opt = torch.optim.AdamW(optimizer_param_groups(torch.nn.ModuleList([layer]), 0.0), lr=1.0,
                            betas=(0.9, beta2))
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(kb, n_b, n_b, generator=gen))[0]
    old = basis[..., :r_b]
    new = torch.cat([basis[..., :r_b // 2], basis[..., r_b:r_b + r_b // 2]], dim=-1)
    row_scale = torch.linspace(0.5, 2.0, M)[:, None]  # rows with other gradient scales

    def grad(p):  # G P per block for a fresh G [M, N]
        g = torch.randn(M, kb, n_b, generator=gen) * row_scale[:, :, None]
        return torch.einsum("mkn,knr->mkr", g, p).reshape(M, kb * r_b)

    def update(p):
        before = factor.detach().clone()
        factor.grad = grad(p)
        opt.step()
        return (factor.detach() - before).abs().view(M, kb, r_b)

    steady = torch.stack([update(old).mean() for _ in range(1500)][-300:]).mean()
    r = transport_map(old, new, orthonormal_old=True)
    c = kept_fraction(old, new, r)
    torch.testing.assert_close(c, torch.tensor([1.0] * 4 + [0.0] * 4).expand(kb, r_b),
                               atol=1e-5, rtol=0)
    transport_moments(opt, [factor], [r], [c])
    first = update(new)
    fresh, kept = first[..., r_b // 2:].mean() / steady, first[..., :r_b // 2].mean() / steady
    assert fresh <= 1.5, f"first update in new directions {fresh:.2f}x the steady state"
    assert fresh >= 0.2  # they do move
    assert 0.8 <= kept <= 1.25, f"kept directions {kept:.2f}x the steady state"


def _update_after(opt, param, grad):
    before = param.detach().clone()
    param.grad = grad.clone()
    opt.step()
    return (param.detach() - before).abs().mean().item()


def test_reset_restarts_bias_correction_so_the_next_update_is_a_first_update():
    """After a reset, Adam's next update has the size of a fresh optimizer's first update
    (lr per coordinate for a constant gradient), not several times the normal step."""
    lr = 1e-2
    layer = build("column", N, M, LayerCompression(ratio=RATIO))
    model = torch.nn.ModuleList([layer])
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.0), lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    factor = layer.subspace_factor
    for _ in range(20):
        layer.bias.grad = torch.ones_like(layer.bias)
        _update_after(opt, factor, torch.randn(factor.shape, generator=gen))
    reset_moments(opt)
    assert subspace_step_count(opt) == 0
    assert opt.state[factor]["exp_avg"].abs().sum() == 0
    layer.bias.grad = None
    first = _update_after(opt, factor, torch.randn(factor.shape, generator=gen))
    assert first == pytest.approx(lr, rel=1e-3)  # |m_hat / sqrt(v_hat)| = 1 at step 1
    # the other groups keep their state
    assert opt.state[layer.bias]["step"] == 20


def test_sketch_extra_columns_are_seeded_per_global_block():
    prev = torch.randn(2, 16, 4)
    a = SubspaceSketch(prev, "pca", seed=1, layer_id=3, epoch=5, first_block=2)
    b = SubspaceSketch(prev, "pca", seed=1, layer_id=3, epoch=5, first_block=2)
    c = SubspaceSketch(prev, "pca", seed=1, layer_id=3, epoch=6, first_block=2)
    assert torch.equal(a.test_basis, b.test_basis)
    assert not torch.allclose(a.test_basis, c.test_basis)
    assert a.top() is None  # nothing accumulated: the caller keeps its P


def test_dependent_defaults_keep_unbiased_random_and_gaussian_moments_kept():
    assert CompressionConfig().projection == "pca"
    assert CompressionConfig().moments_on_resample == "transport"
    assert CompressionConfig(mode="unbiased").projection == "gaussian"
    assert CompressionConfig(mode="unbiased", projection="pca").projection == "pca"
    assert CompressionConfig(projection="gaussian").moments_on_resample == "keep"
    assert CompressionConfig(projection="gaussian",
                             moments_on_resample="transport").moments_on_resample == "transport"


@pytest.mark.parametrize("bad, match", [
    ({"projection": "svd"}, "projection"),
    ({"update_scale": 0.0}, "update_scale"),
    ({"moments_on_resample": "project"}, "moments_on_resample"),
])
def test_bad_projection_settings_fail_at_load(bad, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig(**bad)


@pytest.mark.parametrize("override, match", [
    (["recompute.granularity=full"], "recompute"),
    (["train.zero_stage=3", "compression.base_dtype=bf16"], "ZeRO-3"),
])
def test_gradient_projection_with_unsupported_layouts_fails_at_load(override, match):
    from compact_dist.training.train_config import load_train_config

    with pytest.raises(ValueError, match=match):
        load_train_config(None, ["compression.projection=gradient", *override])
    load_train_config(None, ["compression.projection=pca", *override])  # pca supports both


def _projector(blocks: torch.Tensor) -> torch.Tensor:
    """Block-diagonal orthogonal projector P P^T of an orthonormal block P."""
    return torch.block_diag(*[b @ b.t() for b in blocks.double()])


def _estimates_agree(rank, tp):
    """DP=2 (tp=1: each rank sketches its half of the batch) or TP=2 (column-parallel with
    and without sequence parallelism, row-parallel with 8 blocks): every rank ends with
    bit-identical P where P is replicated, and P spans what a single process finds on the
    whole input. CPU ranks would compute the same bits from the same reduced sketch anyway;
    GPUs need not (reduction order, kernels), so here each rank perturbs its reduced sketch
    in the last bits: only the broadcasts (_share_bases) make P identical."""
    import torch.distributed as dist

    import compact_dist.core.subspace as subspace
    from layer_utils import layer_config

    solve = subspace.top_eigenvectors

    def perturbed(sketches):
        gen = torch.Generator().manual_seed(rank)
        for sketch in sketches:
            noise = torch.randn(sketch.sums.shape, generator=gen).to(sketch.sums.dtype)
            sketch.sums.mul_(1 + noise * 2.0 ** -21)
        return solve(sketches)

    subspace.top_eigenvectors = perturbed

    world = dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]
    n, s, b = 64, 16, 4
    x_full = torch.cat([low_rank_input(s, n // 8, 2, seed=j, noise=0.01)[0] for j in range(8)],
                       dim=-1).expand(s, b, n) * torch.linspace(1, 2, b).view(1, b, 1)
    x_full = x_full + 0.01 * torch.randn(s, b, n, generator=torch.Generator().manual_seed(5))
    cases = [("column", False), ("row", False)] + ([("column", True)] if tp > 1 else [])
    for kind, sp in cases:
        comp = LayerCompression(ratio=RATIO, row_parallel_blocks=8)
        ref = build(kind, n, M, comp, tp_group=singles[rank])
        ref.start_sketch("pca").add_input(x_full)
        p_ref = ref.sketch.top()
        ours = build(kind, n, M, comp, config=layer_config(
            sequence_parallel=sp, tensor_model_parallel_size=tp))
        if tp == 1:
            x_in = x_full.chunk(world, 1)[rank]
        elif kind == "column":
            x_in = x_full.chunk(tp, 0)[rank] if sp else x_full
        else:
            x_in = x_full.chunk(tp, -1)[rank]
            p_ref = p_ref.chunk(tp, 0)[rank]
        stepper = SubspaceStepper(torch.nn.ModuleList([ours]), CompressionConfig(
            ratio=RATIO, projection="pca", row_parallel_blocks=8, moments_on_resample="keep"))
        ours(x_in)
        stepper.after_step(0.0, 0.0)
        p = ours.projection_blocks()
        gathered = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(gathered, p)
        if tp == 1 or kind == "column":
            assert all(torch.equal(g, p) for g in gathered), (kind, sp)
        torch.testing.assert_close(_projector(p), _projector(p_ref), atol=2e-4, rtol=0,
                                   msg=f"{kind} sp={sp} tp={tp}")


@pytest.mark.parametrize("tp", [1, 2])
def test_pca_estimate_is_identical_across_ranks_and_matches_one_process(tp):
    from distributed import run_distributed

    run_distributed(_estimates_agree, 2, tp, tp=tp)


def _saved_bases(tag_dir):
    """The data-aware P of every compact layer in a DeepSpeed module checkpoint (they travel
    in the layers' extra state)."""
    name = "mp_rank_00_model_states.pt"  # ZeRO-3: one per data-parallel rank, rank 0's here
    path = tag_dir / name if (tag_dir / name).exists() else tag_dir / f"zero_pp_rank_0_{name}"
    module = torch.load(path, weights_only=False)["module"]
    return [(k, v["basis"]) for k, v in module.items()
            if k.endswith("_extra_state") and isinstance(v, dict) and "basis" in v]


@pytest.mark.parametrize("stage, extra, total, resume_at", [
    (3, ["compression.resample_interval=2"], 6, 3),
])
def test_checkpoint_restores_data_aware_p_bit_exactly_and_resume_reproduces_losses(
        tmp_path, stage, extra, total, resume_at):
    """compact-train with pca + transport, checkpoint mid-run, resumed: the next losses and
    the final P equal the uninterrupted run's (T=2: estimates in steps 1, 2, 4, 6, resumed
    after 3)."""
    from test_train import small, train_many

    ckpt = tmp_path / "ckpt"
    common = small(tmp_path, f"train.train_steps={total}", "compression.projection=pca",
                   f"train.zero_stage={stage}", "compression.moments_on_resample=transport",
                   f"checkpoint.dir={ckpt}", f"checkpoint.save_interval={resume_at}",
                   "checkpoint.keep_last=5", *extra)
    final_dir = tmp_path / "final"  # the full run's last checkpoint, moved aside
    runs = train_many(2, [("full", common), (  # one launch; resumed as if the job died there
        "resumed", common, (str(ckpt), f"step_{resume_at:08d}", str(final_dir)))], tmp_path)
    assert runs["resumed.latest_before"] == f"step_{total:08d}"
    full, resumed = runs["full"]["losses"], runs["resumed"]["losses"]
    final = _saved_bases(final_dir)
    saved = _saved_bases(ckpt / f"step_{resume_at:08d}")
    assert len(saved) == 8 and all(basis is not None for _, basis in saved)
    assert resumed == pytest.approx(full[resume_at:], rel=1e-6, abs=1e-6)
    again = _saved_bases(ckpt / f"step_{total:08d}")
    assert [k for k, _ in again] == [k for k, _ in final]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(final, again))


def test_cholesky_nystrom_equals_the_eigendecomposition_fallback(monkeypatch):
    """Full-rank C: the Cholesky path (B = L L^T) and the eigh fallback (a numerically
    singular B) give the same top subspace; a rank-deficient C still gives an orthonormal P
    spanning its range (the fallback)."""
    gen = torch.Generator().manual_seed(0)
    n, r = 48, 6
    prev = torch.linalg.qr(torch.randn(2, n, r, generator=gen))[0]
    scales = torch.logspace(0, -3, n)
    x = torch.randn(400, 2 * n, generator=gen) * scales.repeat(2)
    sketch = SubspaceSketch(prev, "pca", seed=1, layer_id=0, epoch=0, first_block=0)
    sketch.add_input(x)
    chol = sketch.top()
    real = torch.linalg.cholesky_ex
    calls = []

    def failing(b):
        calls.append(1)
        out, info = real(b)
        return out, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    fallback = sketch.top()
    assert calls  # the fallback ran
    for a, b in zip(chol, fallback):  # the same subspace: projectors agree
        torch.testing.assert_close(a @ a.T, b @ b.T, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.T @ a, torch.eye(r), atol=1e-5, rtol=0)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", real)
    low = SubspaceSketch(prev, "pca", seed=1, layer_id=0, epoch=0, first_block=0)
    low.add_input(torch.randn(400, 3, generator=gen) @ torch.randn(3, 2 * n, generator=gen))
    p = low.top()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p[0].T @ p[0], torch.eye(r), atol=1e-4, rtol=0)


def test_host_solve_is_thread_count_invariant_and_matches_a_direct_eigendecomposition():
    """The k x k solves spread over a thread pool give the same bits with 1 or 3 threads,
    and the same subspace as an eigendecomposition of the explicit Nystrom approximation."""
    from compact_dist.core.basis import bases_from_factors, nystrom_factors, solve_factors

    gen = torch.Generator().manual_seed(3)
    sketches = []
    for shape in ((2, N, 8), (1, N, 16), (4, N // 4, 4), (5, N // 4, 4)):
        prev = torch.linalg.qr(torch.randn(*shape, generator=gen))[0]
        sk = SubspaceSketch(prev, "pca", seed=1, layer_id=len(sketches), epoch=0,
                            first_block=0)
        sk.add_input(torch.randn(200, shape[0] * shape[1], generator=gen))
        sketches.append(sk)
    results = []
    for threads in (1, 3):  # an estimate consumes its sketches: each run gets copies
        groups = nystrom_factors([copy.copy(sk) for sk in sketches])
        solve_factors(groups, threads=threads)
        results.append(bases_from_factors(groups, len(sketches), torch.device("cpu")))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    for sk, p in zip(sketches, results[0]):
        s, q0 = sk.sums.double(), sk.test_basis.double()
        approx = s @ torch.linalg.solve(q0.transpose(1, 2) @ s, s.transpose(1, 2))
        top = torch.linalg.eigh(0.5 * (approx + approx.transpose(1, 2)))[1][..., -sk.rank:]
        torch.testing.assert_close(_projector(p), _projector(top), atol=1e-6, rtol=0)
