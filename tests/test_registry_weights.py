"""The registry's errors, hyper-parameter checks, and config.json / weights round trips."""

from __future__ import annotations

import json

import pytest
import torch

from napari_hrseg.errors import ModelError, UnknownModelError
from napari_hrseg.models import (
    HrsegModel,
    ModelConfig,
    build_model,
    create_model,
    list_models,
    load_model,
    model_class,
    register_model,
    save_model,
)

TINY_FPN = {"widths": (8, 8, 16, 16), "stem_width": 8, "fpn_width": 8, "head_width": 8}


def test_builtin_architectures_are_registered():
    assert {"fpn", "magnet", "hmsa", "dupsampling"} <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("lookup", [create_model, model_class])
def test_unknown_name_raises_and_lists_known_names(lookup):
    with pytest.raises(UnknownModelError) as info:
        lookup("segformer")
    message = str(info.value)
    assert "segformer" in message
    for name in list_models():
        assert name in message


def test_unknown_hyper_parameter_raises_and_lists_accepted_ones():
    with pytest.raises(ModelError) as info:
        create_model("fpn", widht=(8, 8, 8, 8))
    assert "widht" in str(info.value) and "widths" in str(info.value)
    with pytest.raises(ModelError, match="unknown hyper-parameters"):
        build_model(ModelConfig(arch="magnet", params={"n_point": 3}))


def test_registering_twice_or_a_non_model_is_refused():
    class Other(HrsegModel):
        pass

    with pytest.raises(ModelError, match="twice"):
        register_model("fpn")(Other)
    assert model_class("fpn") is not Other
    with pytest.raises(ModelError, match="not an HrsegModel"):
        register_model("not-a-model")(dict)
    assert "not-a-model" not in list_models()


def test_config_json_round_trip(tmp_path):
    config = ModelConfig(
        arch="magnet",
        num_classes=3,
        class_names=("background", "gland", "nucleus"),
        class_colors=("#000000", "#e69f00", "#56b4e9"),
        mpp=0.25,
        mean=(0.5, 0.4, 0.6),
        std=(0.2, 0.2, 0.2),
        scales=(0.125, 0.5, 1.0),
        params={"patch_size": (64, 96), "n_points": 0.5, **TINY_FPN},
        name="glands",
        version="3",
        lineage={"parent": "glands@2", "seed": 7},
    )
    path = config.save(tmp_path)
    assert json.loads(path.read_text())["scales"] == [0.125, 0.5, 1.0]
    loaded = ModelConfig.load(tmp_path)
    assert loaded == config
    assert loaded.label == "glands@3"
    a, b = build_model(config), build_model(loaded)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(ModelError, match="unknown keys"):
        ModelConfig.from_dict({"arch": "fpn", "colour": "red"})
    with pytest.raises(ModelError, match="no 'arch'"):
        ModelConfig.from_dict({"num_classes": 2})
    with pytest.raises(ModelError, match="class names"):
        ModelConfig(arch="fpn", num_classes=3, class_names=("a", "b"))
    with pytest.raises(ModelError, match="JSON"):
        ModelConfig(arch="fpn", params={"widths": object()})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelConfig.load(tmp_path)
    with pytest.raises(ModelError, match="no config.json"):
        ModelConfig.load(tmp_path / "missing")


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    model = create_model("fpn", num_classes=2, **TINY_FPN)
    directory = save_model(model, tmp_path / "m")
    wider = model.config.evolve(params={**model.config.params, "head_width": 16})
    wider.save(directory)
    with pytest.raises(ModelError, match="do not match"):
        load_model(directory)
    with pytest.raises(ModelError, match="no model directory or shipped model"):
        load_model("no-such-model-anywhere")


def test_save_replaces_an_existing_version_atomically(tmp_path):
    first = create_model("fpn", num_classes=2, **TINY_FPN)
    second = create_model("fpn", num_classes=2, **TINY_FPN)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)
    save_model(first, tmp_path / "m")
    save_model(second, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    for k, v in second.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind
