"""Architecture recipes: what a model needs around the generic training loop.

The trainer is the same for every architecture; a `Recipe` adds what one needs:

- `Recipe.prepare`: work before the first step (DUpsampling fits its fixed reconstruction basis from the
  training labels);
- `Recipe.phases`: sequential training phases, each entered by a call on the model (MagNet trains its base
  segmenter, then the refiner with the segmenter frozen; GLNet trains its global, global-to-local and
  local-to-global modes one after the other);
- `Recipe.collate`: how samples become a `Batch` (instance models get instance ids, derived from the semantic
  labels by connected components where a source has none);
- `Recipe.predict` / `Recipe.predict_instances`: the evaluation forward used on the validation split.

Recipes are registered per architecture name with `register_recipe`; `recipe_for` falls back to the plain
`Recipe`, so any registered model trains without one.  Phase 2 adds tuned recipes here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from ..errors import TrainingError
from ..models.base import Batch, HrsegModel, to_input_tensor
from ..models.config import IGNORE_INDEX
from .metrics import instances_from_semantic
from .samples import Sample

__all__ = ["Phase", "Recipe", "register_recipe", "recipe_for", "set_model_mode", "collate"]

log = logging.getLogger(__name__)

_RECIPES: dict[str, type["Recipe"]] = {}


@dataclass(frozen=True)
class Phase:
    """One sequential training phase.

    Parameters
    ----------
    name : str
        Shown in events and logs.
    fraction : float
        Share of the run's steps (fractions of a recipe are normalised to sum to 1).
    enter : callable, optional
        ``enter(model)`` switches the model into this phase (freezes parts, picks a forward); called at the
        start of the phase and again after every validation, which puts the model in eval mode.
    lr_scale : float
        Multiplier of the configured learning rate in this phase.
    min_crop : int, optional
        Smallest crop side of this phase: its crops are ``max(TrainConfig.crop, min_crop)`` px, e.g. MagNet's
        refiner needs crops whose coarsest stage still shows context, GLNet crops several local patches wide.
    scales : tuple of float, optional
        Relative scales this phase's crops are drawn at (see `CropSampler.scales`); default ``(1.0,)``.
    batch_size : int, optional
        Crops per step in this phase (default: the run's).
    """

    name: str
    fraction: float = 1.0
    enter: Callable[[HrsegModel], None] | None = None
    lr_scale: float = 1.0
    min_crop: int | None = None
    scales: tuple[float, ...] | None = None
    batch_size: int | None = None


def set_model_mode(model: HrsegModel, attribute: str, value: Any) -> None:
    """Set a model's training phase/mode, whether it is a method (``model.train_mode(v)``) or a property."""
    current = getattr(type(model), attribute, None)
    if isinstance(current, property) or not callable(getattr(model, attribute, None)):
        setattr(model, attribute, value)
    else:
        getattr(model, attribute)(value)


def collate(samples: Sequence[Sample], model: HrsegModel, *, with_instances: bool = False,
            device: torch.device | str = "cpu") -> Batch:
    """Stack samples into a `Batch` on ``device`` (images normalised with the model's mean and std).

    Parameters
    ----------
    samples : sequence of Sample
        Same-sized samples.
    model : HrsegModel
        Supplies the normalisation.
    with_instances : bool
        Add ``instances``; samples without ids get the connected components of their foreground (classes >= 1).
    """
    image = to_input_tensor(np.stack([s.image for s in samples]), model.config, device)
    labels = torch.from_numpy(np.stack([s.labels for s in samples]).astype(np.int64)).to(device)
    weight = None
    if any(s.weight is not None for s in samples):
        weight = torch.from_numpy(np.stack([
            s.weight if s.weight is not None else np.ones(s.shape, np.float32) for s in samples
        ])).to(device)
    instances = None
    if with_instances:
        ids = []
        for s in samples:
            if s.instances is not None:
                ids.append(s.instances)
            else:
                fg = tuple(range(1, model.config.num_classes))
                lab = np.where(s.labels == IGNORE_INDEX, 0, s.labels)
                ids.append(instances_from_semantic(lab, fg))
        instances = torch.from_numpy(np.stack(ids).astype(np.int64)).to(device)
    return Batch(image=image, labels=labels, instances=instances, weight=weight)


class Recipe:
    """The plain recipe: one phase, semantic batches, ``model(image)["logits"]`` for evaluation."""

    #: Architecture name this recipe is registered under (set by `register_recipe`).
    arch: ClassVar[str] = ""
    #: Whether batches carry instance ids.
    needs_instances: ClassVar[bool] = False

    def prepare(self, model: HrsegModel, samples: Callable[[int], list[Sample]]) -> dict[str, Any]:
        """Work before the first step; ``samples(n)`` draws ``n`` training crops.  Returns facts to log."""
        return {}

    def phases(self, model: HrsegModel) -> list[Phase]:
        """The sequential phases of a training run."""
        return [Phase("train", 1.0)]

    def collate(self, samples: Sequence[Sample], model: HrsegModel, device: torch.device | str) -> Batch:
        return collate(samples, model, with_instances=self.needs_instances or model.config.task == "instance",
                       device=device)

    @torch.no_grad()
    def predict(self, model: HrsegModel, image: torch.Tensor, phase: str = "") -> torch.Tensor:
        """Evaluation logits ``(N, C, H, W)`` (the model is in eval mode) during ``phase``."""
        return model(image)["logits"]

    def predict_instances(self, model: HrsegModel, image: torch.Tensor, logits: torch.Tensor) -> np.ndarray | None:
        """Instance ids ``(N, H, W)`` for instance metrics, or None: by default the 8-connected components of
        the predicted foreground of instance-task models."""
        if model.config.task != "instance":
            return None
        pred = logits.argmax(1).cpu().numpy()
        fg = tuple(range(1, model.config.num_classes))
        return np.stack([instances_from_semantic(p, fg) for p in pred])


def register_recipe(arch: str) -> Callable[[type[Recipe]], type[Recipe]]:
    """Class decorator registering a `Recipe` subclass for architecture ``arch``."""

    def decorate(cls: type[Recipe]) -> type[Recipe]:
        if arch in _RECIPES and _RECIPES[arch] is not cls:
            raise TrainingError(f"a recipe for {arch!r} is registered twice", subject=cls.__name__)
        cls.arch = arch
        _RECIPES[arch] = cls
        return cls

    return decorate


def recipe_for(model_or_arch: HrsegModel | str) -> Recipe:
    """The recipe of an architecture (the plain `Recipe` when it has none)."""
    arch = model_or_arch if isinstance(model_or_arch, str) else model_or_arch.config.arch
    return _RECIPES.get(arch, Recipe)()


# ---------------------------------------------------------------------------------------------- recipes
@register_recipe("magnet")
class MagNetRecipe(Recipe):
    """MagNet: the base segmenter first, then the refiner with the segmenter frozen (``model.train_phase``).

    MagNet's official code trains the backbone separately and then only the refinement module; here one run
    does both, ``segmenter_fraction`` of the steps for the segmenter.

    The segmenter segments every stage (the whole region at the coarsest scale, patches at the finer ones), so
    by default it trains on crops drawn at all of the model's scales (``config.scales``), as MagNet trains its
    backbone on patches of every scale; the single-scale baselines use the same network.

    Parameters
    ----------
    segmenter_fraction : float
        Share of the steps for the segmenter phase; 1 trains the segmenter only (e.g. fine-tuning for a new stain:
        the refiner reads probability maps, not pixels, so a stain change does not reach it).
    multiscale_segmenter : bool
        Draw the segmenter's crops at every scale of ``config.scales`` (else at 1.0 only).
    refiner_crop : int, optional
        Minimum crop side of the refiner phase, in model pixels.  The refiner learns from the coarsest stage's
        view of the whole crop, so the crop should show the context that stage is meant to see: e.g.
        ``patch_size / scales[0]`` (1024 px for 256-px patches and scales (0.25, 0.5, 1)).  Default: the run's.
    refiner_batch_size : int, optional
        Crops per step in the refiner phase (default the run's).
    """

    def __init__(self, *, segmenter_fraction: float = 0.6, multiscale_segmenter: bool = True,
                 refiner_crop: int | None = None, refiner_batch_size: int | None = None):
        if not 0 < segmenter_fraction <= 1:
            raise TrainingError(f"segmenter_fraction={segmenter_fraction} is not in (0, 1]", subject="magnet recipe")
        self.segmenter_fraction = segmenter_fraction
        self.multiscale_segmenter = multiscale_segmenter
        self.refiner_crop = refiner_crop
        self.refiner_batch_size = refiner_batch_size

    def phases(self, model: HrsegModel) -> list[Phase]:
        scales = tuple(float(s) for s in model.config.scales) if self.multiscale_segmenter else None
        segmenter = Phase("segmenter", self.segmenter_fraction,
                          lambda m: set_model_mode(m, "train_phase", "segmenter"), scales=scales)
        if self.segmenter_fraction >= 1:
            return [segmenter]
        return [
            segmenter,
            Phase("refiner", 1 - self.segmenter_fraction, lambda m: set_model_mode(m, "train_phase", "refiner"),
                  min_crop=self.refiner_crop, batch_size=self.refiner_batch_size),
        ]

    @torch.no_grad()
    def predict(self, model: HrsegModel, image: torch.Tensor, phase: str = "") -> torch.Tensor:
        # While the segmenter trains, the untrained refiner would hide its progress: validate the segmenter.
        if phase == "segmenter" and hasattr(model, "segment"):
            return model.segment(image)
        return model(image)["logits"]


@register_recipe("glnet")
class GLNetRecipe(Recipe):
    """GLNet's three sequential modes (``model.train_mode``): 1 global only, 2 global-to-local with the global
    branch frozen, 3 local-to-global with the local branch frozen.  Step shares follow the official schedule
    (120, 50 and 120 epochs); learning-rate scales its 5e-5 / 2e-5 / 5e-5.

    Crops are at least ``patches_wide`` local patches (``size_p``) wide: on one patch the global and local views
    coincide and the global-to-local sharing has nothing to add (phase 1 measured: 768-px crops with 256-px
    patches, with a learning rate of 1e-3; 1e-2 diverged).
    """

    #: Official schedule: 120, 50 and 120 epochs.
    OFFICIAL_FRACTIONS = (120 / 290, 50 / 290, 120 / 290)

    def __init__(self, *, patches_wide: int = 3, fractions: tuple[float, float, float] | None = None):
        self.patches_wide = int(patches_wide)
        self.fractions = tuple(fractions) if fractions is not None else self.OFFICIAL_FRACTIONS
        if len(self.fractions) != 3 or any(f <= 0 for f in self.fractions):
            raise TrainingError(f"fractions={fractions} must be three positive shares", subject="glnet recipe")

    def phases(self, model: HrsegModel) -> list[Phase]:
        crop = self.patches_wide * int(model.params.get("size_p", 256))
        f1, f2, f3 = self.fractions
        return [
            Phase("global", f1, lambda m: set_model_mode(m, "train_mode", 1), min_crop=crop),
            Phase("global-to-local", f2, lambda m: set_model_mode(m, "train_mode", 2), lr_scale=0.4, min_crop=crop),
            Phase("local-to-global", f3, lambda m: set_model_mode(m, "train_mode", 3), min_crop=crop),
        ]


@register_recipe("dupsampling")
class DUpsamplingRecipe(Recipe):
    """DUpsampling: fit the fixed reconstruction basis ``W`` by PCA on one-hot training labels before training
    (the reproducers' recipe: a learnt ``W`` collapses to nearest-like blocks), then train as usual.

    A model that already has a fitted basis (fine-tuning, or training on from ``--init``) keeps it: its decoder
    was trained against that ``W``.  Blocks with unknown pixels are left out of the fit; when every block has
    some (sparse corrections, coarse auto-labels), unknown pixels count as background instead.
    """

    #: Training crops whose labels the basis is fitted on.
    basis_crops = 32

    def prepare(self, model: HrsegModel, samples: Callable[[int], list[Sample]]) -> dict[str, Any]:
        from ..models.dupsampling import fit_dupsampling_basis  # the architecture module owns the fit

        mean = getattr(model, "basis_mean", None)
        if mean is not None and bool(torch.any(mean != 0)):
            return {"dupsampling_basis": "kept (already fitted)"}
        labels = [s.labels for s in samples(self.basis_crops)]
        n_components = int(model.basis.shape[1])  # type: ignore[union-attr]
        ignore_as = None
        try:
            basis, mean = fit_dupsampling_basis(labels, model.config.num_classes, int(model.ratio), n_components)
        except ValueError:
            ignore_as = 0
            basis, mean = fit_dupsampling_basis(labels, model.config.num_classes, int(model.ratio), n_components,
                                                ignore_as=0)
        model.set_basis(basis, mean)  # type: ignore[operator]
        return {"dupsampling_basis_crops": len(labels), "dupsampling_components": n_components,
                "dupsampling_ignore_as": ignore_as}


@register_recipe("refinemask")
class RefineMaskRecipe(Recipe):
    """RefineMask: batches carry instance ids (the head's targets are cropped from them per RoI); validation
    scores the instances of ``model.predict_instances`` (its own proposals) with AJI and PQ."""

    needs_instances = True

    def predict_instances(self, model: HrsegModel, image: torch.Tensor, logits: torch.Tensor) -> np.ndarray | None:
        if not hasattr(model, "predict_instances"):
            return super().predict_instances(model, image, logits)
        return np.stack([np.asarray(model.predict_instances(image[i:i + 1]).labels) for i in range(image.shape[0])])
