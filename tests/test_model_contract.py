"""The contract every registered architecture keeps (segmentation_models.pytorch's shared model test).

One test, parametrized over `list_models()`, so an architecture registered later is covered without editing
this file: forward and backward at an odd, non-square size in every training phase, every parameter that
should learn gets a gradient, eval output is deterministic, a save/load round trip gives identical outputs,
and a ``model.safetensors`` holding a pickle is refused without running it.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from napari_hrseg.errors import ModelError, UnsafeCheckpointError
from napari_hrseg.models import (
    IGNORE_INDEX,
    Batch,
    create_model,
    import_torch_state_dict,
    list_models,
    load_model,
    save_model,
)
from napari_hrseg.models.weights import WEIGHTS_FILE

HEIGHT, WIDTH = 97, 131  # odd and non-square: catches H/W swaps and stride rounding


def make_batch(task: str, num_classes: int, n: int = 2, seed: int = 0) -> Batch:
    """Random image; random class labels (semantic) or a few disc-shaped instances (instance models)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, HEIGHT, WIDTH, generator=g)
    if task == "semantic":
        labels = torch.randint(0, num_classes, (n, HEIGHT, WIDTH), generator=g)
        labels[:, :3] = IGNORE_INDEX
        return Batch(image, labels)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    rng = np.random.default_rng(seed)
    instances = np.zeros((n, HEIGHT, WIDTH), np.int64)
    for i in range(n):
        for obj in range(1, 5):
            cy, cx, r = rng.integers(12, HEIGHT - 12), rng.integers(12, WIDTH - 12), rng.integers(5, 10)
            instances[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = obj
    inst = torch.from_numpy(instances)
    return Batch(image, (inst > 0).long(), instances=inst)


def tensors(outputs: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in outputs.items() if isinstance(v, torch.Tensor)}


def assert_same_outputs(a: dict, b: dict) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"output {k!r} differs"


@pytest.mark.parametrize("name", list_models())
def test_model_contract(name, tmp_path):
    torch.manual_seed(0)
    probe = create_model(name)
    num_classes = 3 if probe.task == "semantic" else 2
    model = create_model(name, num_classes=num_classes)
    batch = make_batch(model.task, num_classes)

    # --- forward and backward in every training phase; every learnable parameter gets a gradient
    phases = tuple(getattr(model, "train_phases", ())) or (None,)
    learned: set[str] = set()
    for phase in phases:
        if phase is not None:
            model.train_phase = phase
        model.train()
        model.zero_grad(set_to_none=True)
        losses = model.loss(model(batch.image), batch)
        loss = losses["loss"]
        assert loss.ndim == 0 and torch.isfinite(loss), f"phase {phase}: loss {loss}"
        loss.backward()
        missing = []
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0:
                missing.append(pname)
            else:
                learned.add(pname)
        assert not missing, f"phase {phase}: no gradient for {missing[:8]}"
    never = sorted(set(dict(model.named_parameters())) - learned)
    assert not never, f"parameters no phase trains: {never[:8]}"
    if phases != (None,):
        model.train_phase = phases[0]

    # --- deterministic eval output at the input size
    model.eval()
    x = batch.image[:1]
    with torch.no_grad():
        first, second = model(x), model(x)
    assert_same_outputs(first, second)
    if model.task == "semantic" or "logits" in first:
        assert first["logits"].shape == (1, num_classes, HEIGHT, WIDTH)
        assert torch.isfinite(first["logits"]).all()

    # --- save / load round trip: same config, same outputs
    directory = save_model(model, tmp_path / name)
    assert sorted(os.listdir(directory)) == ["config.json", WEIGHTS_FILE]
    loaded = load_model(directory)
    assert not loaded.training and loaded.config == model.config
    with torch.no_grad():
        assert_same_outputs(first, loaded(x))

    # --- a torch pickle renamed to model.safetensors is refused, not unpickled
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    with pytest.raises(UnsafeCheckpointError):
        load_model(directory)


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_in_safetensors_is_refused_without_running(tmp_path):
    model = create_model("fpn", num_classes=2, widths=(8, 8, 8, 8), stem_width=8, fpn_width=8, head_width=8)
    directory = save_model(model, tmp_path / "m")
    marker = tmp_path / "pwned"
    (directory / WEIGHTS_FILE).write_bytes(pickle.dumps({"weight": _RunsCode(str(marker))}))
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        load_model(directory)
    assert not marker.exists()


def test_import_refuses_checkpoints_with_custom_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "extra": _RunsCode(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match="code execution"):
        import_torch_state_dict(path)
    assert not marker.exists()

    good = tmp_path / "good.pth"
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}
    torch.save({"state_dict": state, "epoch": 3}, good)
    loaded = import_torch_state_dict(good)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ModelError, match="state dict"):
        import_torch_state_dict(not_a_state_dict)
