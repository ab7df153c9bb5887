import pytest

from compact_dist.core.config import CompressionConfig, LayerCompression


def test_defaults_resolve_per_role():
    cfg = CompressionConfig(ratios={"fc1": 0.5}, layers=["qkv", "fc1"])
    assert cfg.ratio == 0.25
    assert cfg.for_role("qkv").ratio == 0.25
    assert cfg.for_role("fc1").ratio == 0.5
    assert cfg.for_role("proj") is None
    assert CompressionConfig(enabled=False).for_role("qkv") is None
    assert CompressionConfig(rank=16).for_role("fc2").rank == 16


def test_rank_for_blocks():
    lc = LayerCompression(ratio=0.25)
    assert lc.rank_for(64, 1) == 16
    assert lc.rank_for(64, 8) == 16  # 8 blocks of 8 columns -> 2 each
    assert LayerCompression(rank=24).rank_for(64, 8) == 24


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": 0.0}, "greater than 0"),
        ({"ratio": 1.5}, "less than or equal to 1"),
        ({"ratio": 0.5, "rank": 8}, "only one of 'ratio' and 'rank'"),
        ({"mode": "lowrank"}, "subspace"),
        ({"layers": ["qkv", "attn"]}, "qkv"),
        ({"layers": ["qkv", "qkv"]}, "twice"),
        ({"ratios": {"fc1": 2.0}}, r"ratios\[fc1\]"),
        ({"rank": 8, "ratios": {"fc1": 0.5}}, "cannot be combined"),
        ({"resample_interval": 0}, "greater than or equal to 1"),
        ({"base_dtype": "fp16"}, "fp32"),
        ({"typo_field": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_config_raises_one_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**kwargs)


def test_bad_layer_shapes_raise():
    with pytest.raises(ValueError, match="multiple of the 8 projection blocks"):
        LayerCompression(rank=12).rank_for(64, 8)
    with pytest.raises(ValueError, match="not divisible into 8"):
        LayerCompression(ratio=0.5).rank_for(60, 8)
    with pytest.raises(ValueError, match="exceeds"):
        LayerCompression(rank=100).rank_for(64, 1)
    with pytest.raises(ValueError, match="exactly one"):
        LayerCompression()


def test_tp_must_divide_row_blocks_before_any_process_group():
    CompressionConfig(row_parallel_blocks=8).check_parallel(4)
    with pytest.raises(ValueError, match="divisible by the tensor-model-parallel size 3"):
        CompressionConfig(row_parallel_blocks=8).check_parallel(3)
    CompressionConfig(row_parallel_blocks=8, layers=["qkv", "fc1"]).check_parallel(3)


def test_shipped_yaml_loads_and_bad_yaml_fails(tmp_path):
    from pathlib import Path

    shipped = Path(__file__).parents[1] / "configs" / "compression.yaml"
    cfg = CompressionConfig.from_yaml(str(shipped))
    assert cfg == CompressionConfig()
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratio: 3\n")
    with pytest.raises(ValueError, match="ratio"):
        CompressionConfig.from_yaml(str(bad))


def test_compression_yaml_errors_are_one_line(tmp_path):
    """from_yaml: a syntax error names the file, line and column; an empty file and an
    unknown key are refused, the key's nearest valid name suggested."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratio: 0.5\nlayers: [qkv\n")
    with pytest.raises(ValueError) as info:
        CompressionConfig.from_yaml(str(bad))
    assert str(info.value).startswith(f"{bad}:3:1: YAML syntax error: ")
    assert "\n" not in str(info.value)
    bad.write_text("# nothing\n")
    with pytest.raises(ValueError, match="is empty"):
        CompressionConfig.from_yaml(str(bad))
    bad.write_text("ratoi: 0.5\n")
    with pytest.raises(ValueError, match=r"^unknown key 'ratoi'; did you mean 'ratio'\?$"):
        CompressionConfig.from_yaml(str(bad))


def test_help_config_lists_every_key_with_type_default_and_meaning(capsys):
    """`compact-train --help-config`: every key of every section of the typed config appears
    with its type, default and a meaning; --help points at it."""
    from compact_dist.training.config_help import config_keys
    from compact_dist.training.train import main
    from compact_dist.training.train_config import TrainConfig

    main(["--help-config"])
    printed = capsys.readouterr().out.splitlines()
    rows = {r["key"]: r for r in config_keys()}
    expected = {f"{section}.{name}" for section, info in TrainConfig.model_fields.items()
                for name in info.annotation.model_fields}
    assert set(rows) == expected and len(expected) > 60
    for key, row in rows.items():
        assert row["meaning"].strip(), f"{key} has no meaning"
        at = next(i for i, line in enumerate(printed) if line.split()[:1] == [key])
        assert printed[at].split(None, 1)[1] == f"{row['type']}, default {row['default']}"
        assert printed[at + 1].strip() == row["meaning"]
    assert rows["model.position_embedding"]["default"] == "rope"
    assert rows["train.zero_stage"]["type"] == "0 | 1 | 2 | 3"
    assert rows["model.num_query_groups"]["type"] == "int or null"
    assert rows["compression.ratio"]["default"] == "0.25"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--help-config" in capsys.readouterr().out


def test_wandb_project_without_wandb_is_one_line_before_any_process_group(monkeypatch):
    import importlib.util

    from compact_dist.training.train_config import load_train_config

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    cfg = load_train_config(None, ["logging.wandb_project=runs"])
    with pytest.raises(ValueError, match=r"^logging.wandb_project is set but wandb is not "
                                         r"installed \(pip install wandb"):
        cfg.check_environment(world_size=1, has_cuda=False)
    load_train_config(None).check_environment(world_size=1, has_cuda=False)  # unset: fine
