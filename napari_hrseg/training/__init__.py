"""Training, auto-labelling and fine-tuning (headless: no Qt, no napari).

- `datasets`: labelled sources (file pairs, arrays, slides with label pyramids), pairing rules, the split by
  image, random crops at the model's pixel size;
- `augment`: flips, rotations, HED stain jitter, brightness/contrast;
- `metrics`: mIoU, Dice, and instance Dice / AJI / PQ exactly as ``eval_instances.py``;
- `trainer`: `train`, a generator of typed events, cancelable; `recipes`: per-architecture preparation and phases;
- `lineage`: parent, data fingerprint, seed, metrics of a model version;
- `autolabel`: coarse labels (argmax where the teacher is confident, ignore elsewhere) in zarr;
- `finetune`: `fine_tune` from corrections plus coarse labels, a generator that saves a new version;
- `ranking`: candidate regions by uncertainty, for choosing where to correct.
"""

from .augment import Augment
from .autolabel import CoarseLabels, coarse_labels, hard_labels, iter_coarse_labels, open_coarse_labels, storage_report
from .cancel import CancelToken, is_cancelled
from .datasets import (
    PRESETS,
    ArraySource,
    CropSampler,
    FileSource,
    PairingRule,
    SlideSource,
    dataset_fingerprint,
    detect_layout,
    pair_files,
    split_by_image,
)
from .finetune import FineTuneFinished, fine_tune, merge_corrections
from .lineage import make_lineage, next_version
from .metrics import ConfusionMatrix, InstanceScores, instance_scores, semantic_scores
from .ranking import RankedRegion, candidate_regions, rank_regions, uncertainty_map
from .recipes import Phase, Recipe, recipe_for, register_recipe
from .samples import Sample
from .trainer import PhaseStarted, TrainConfig, TrainingFinished, TrainStep, Validated, evaluate, train

__all__ = [
    "Augment",
    "ArraySource",
    "CancelToken",
    "CoarseLabels",
    "ConfusionMatrix",
    "CropSampler",
    "FileSource",
    "FineTuneFinished",
    "InstanceScores",
    "PRESETS",
    "PairingRule",
    "Phase",
    "PhaseStarted",
    "RankedRegion",
    "Recipe",
    "Sample",
    "SlideSource",
    "TrainConfig",
    "TrainStep",
    "TrainingFinished",
    "Validated",
    "candidate_regions",
    "coarse_labels",
    "dataset_fingerprint",
    "detect_layout",
    "evaluate",
    "fine_tune",
    "hard_labels",
    "instance_scores",
    "is_cancelled",
    "iter_coarse_labels",
    "make_lineage",
    "merge_corrections",
    "next_version",
    "open_coarse_labels",
    "pair_files",
    "rank_regions",
    "recipe_for",
    "register_recipe",
    "semantic_scores",
    "split_by_image",
    "storage_report",
    "train",
    "uncertainty_map",
]
