"""The correction loop measured: oracle corrections, coarse auto-labels, uncertainty-chosen regions, fine-tuning.

A pathologist corrects a few regions, the model is fine-tuned, and the next regions to correct are proposed.  This
benchmark plays that loop with an *oracle* corrector (who reveals the ground truth of the regions it is shown) and
scores the model on images no round ever touches.

Part 1, GlaS colon glands (real H&E, ``shared/realdata/glas-test-subset``, 1 µm/px).  The 20 images are split by
image: the 5 the shipped ``glands`` model holds out are the **test set**; of the other 15, 3 (seeded choice) are
fully labelled and train the round-0 model (the single-scale FPN, so that every configuration's rounds fit the CPU
budget), and 12 form the **pool**.  Each round the oracle reveals K regions of 128 x 128 µm of the pool and the
current model is fine-tuned (`napari_hrseg.training.fine_tune`) on

- (a) the corrections only (labels outside the revealed regions ignored), or
- (b) the corrections plus the current model's coarse auto-labels of every pool image (its argmax where the top
  probability is above ``--threshold``, ignored elsewhere; the hierarchical multi-scale attention paper's recipe),

with the regions chosen

- (i) by uncertainty, top K: `napari_hrseg.training.rank_regions` (mean margin uncertainty over tissue) over the
  pool's candidate regions not yet revealed, most uncertain first, at most one per image per round (while other
  images have candidates),
- (ii) by uncertainty, sampled: the same scores, K regions drawn without replacement with probability proportional
  to the score (`napari_hrseg.training.ranking.sample_regions`, stochastic batch acquisition), or
- (iii) at random among the same candidates.

Every round's model is scored (mIoU over background and gland, and gland Dice, on the test images at 1 µm/px,
whole-image passes).  Each configuration runs with ``--seeds`` seeds (the random choice and the fine-tuning's
crops); the tables give mean ± sd.

Part 2, domain shift.  The shipped ``tissue`` model (MagNet, trained on the virtual slide's ``"he"`` palette) meets
virtual slides stained with another palette (``--palette``, default ``"he-faded"``): a pool window of one virtual
slide (seed 4, on its tumour's border) and a test window of another (seed 0, the held-out slide).  Round 0 is the
shipped model; the loop then runs with regions chosen by uncertainty, (a) and (b), fine-tuning MagNet's segmenter
(the pixels changed; its refiner reads probability maps).  The table also gives the test
window's score in the training palette, the level the loop tries to recover.

Run:  python benchmarks/bench_loop.py [--quick] [--rounds 4] [--k 4] [--seeds 3] [--steps 40] [--json OUT]
      [--strategies uncertainty,sampled,random]
On one thread of a two-core machine shared with other work, part 1's top-K and random configurations took 25
minutes and its two sampled ones 9 (a separate, less contended run; ``--strategies`` picks them), part 2 20 minutes;
``--skip-shift`` and ``--skip-glas`` run the parts as two processes side by side (docs/models.md has the tables).
``--quick``: two rounds, one seed, a few minutes.  ``--score-on-pool`` scores the GlaS rounds on the pool's pixels
no round has revealed instead of the test images: a development set on which to compare ways of choosing regions
without tuning them to the test set.  Torch runs on ``--threads`` threads (default 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from napari_hrseg.geometry import Region  # noqa: E402
from napari_hrseg.models import HrsegModel, create_model, load_model, to_input_tensor  # noqa: E402
from napari_hrseg.models.config import IGNORE_INDEX  # noqa: E402
from napari_hrseg.training import (  # noqa: E402
    PRESETS,
    ArraySource,
    ConfusionMatrix,
    FineTuneFinished,
    Sample,
    TrainConfig,
    candidate_regions,
    fine_tune,
    hard_labels,
    pair_files,
    rank_regions,
    train,
)
from napari_hrseg.training.predict import PixelGrid, predict_probabilities  # noqa: E402
from napari_hrseg.training.ranking import sample_regions, tissue_mask  # noqa: E402
from napari_hrseg.training.recipes import MagNetRecipe  # noqa: E402
from napari_hrseg.training.shipped import GLANDS_HELD_OUT, default_cache, default_realdata  # noqa: E402
from napari_hrseg.training.windows import virtual_window  # noqa: E402

log = logging.getLogger("bench_loop")

MPP = 1.0
#: The round-0 glands model: a small FPN (0.47 M parameters).
SMALL_FPN = dict(widths=(16, 32, 64, 128), fpn_width=32, head_width=32)
SEED_IMAGES = 3


# ============================================================================================== data
@dataclass
class Image:
    """One image at the model's pixel size with its ground truth."""

    key: str
    image: np.ndarray  # (H, W, 3) uint8
    truth: np.ndarray  # (H, W) uint8


def read_images(sources) -> list[Image]:
    out = []
    for s in sources:
        h, w = s.size_at(MPP)
        sample = s.read(Region(0, 0, h, w), MPP)
        out.append(Image(s.key, sample.image, sample.labels))
    return out


def glas_split(root: Path, seed: int = 0) -> tuple[list[Image], list[Image], list[Image]]:
    """(seed set, pool, test) of GlaS images at 1 µm/px (see the module docstring)."""
    sources = pair_files(root / "glas-test-subset", PRESETS["glas"])
    test = [s for s in sources if s.key in GLANDS_HELD_OUT]
    rest = [s for s in sources if s.key not in GLANDS_HELD_OUT]
    order = np.random.default_rng(seed).permutation(len(rest))
    seed_set = [rest[i] for i in order[:SEED_IMAGES]]
    pool = [rest[i] for i in order[SEED_IMAGES:]]
    return read_images(seed_set), read_images(pool), read_images(test)


# ============================================================================================== scoring
@torch.no_grad()
def score(model: HrsegModel, images: Sequence[Image]) -> dict[str, float]:
    """mIoU (classes present in truth or prediction) and mean foreground Dice over ``images``, whole-image passes."""
    model.eval()
    cm = ConfusionMatrix(model.config.num_classes)
    for im in images:
        x = to_input_tensor(im.image[None], model.config, model.device).contiguous()
        cm.update(model(x)["logits"].argmax(1)[0].cpu().numpy(), im.truth)
    s = cm.scores()
    return {"miou": s["miou"], "dice": s["dice"]}


# ============================================================================================== the loop
@dataclass
class Oracle:
    """Reveals the ground truth of the regions it is shown; remembers what it revealed."""

    pool: Sequence[Image]
    revealed: dict[str, np.ndarray] = field(default_factory=dict)  # key -> labels, IGNORE_INDEX elsewhere
    shown: list[tuple[int, Region]] = field(default_factory=list)

    def reveal(self, index: int, region: Region) -> None:
        im = self.pool[index]
        labels = self.revealed.setdefault(im.key, np.full(im.truth.shape, IGNORE_INDEX, np.uint8))
        labels[region.slices] = im.truth[region.slices]
        self.shown.append((index, region))

    def unrevealed(self) -> list[Image]:
        """The pool with the revealed regions' truth ignored: a development set that no test image enters."""
        out = []
        for im in self.pool:
            truth = im.truth.copy()
            if im.key in self.revealed:
                truth[self.revealed[im.key] != IGNORE_INDEX] = IGNORE_INDEX
            out.append(Image(im.key, im.image, truth))
        return out

    def corrections(self) -> list[Sample]:
        by_key = {im.key: im for im in self.pool}
        return [Sample(by_key[k].image, labels, key=k) for k, labels in self.revealed.items()]


def candidates(pool: Sequence[Image], size: int) -> list[tuple[int, Region]]:
    """Every pool image's ``size`` tiles with at least 10 % tissue (the same filter `rank_regions` applies)."""
    out = []
    for i, im in enumerate(pool):
        for r in candidate_regions(im.image.shape[:2], size):
            if tissue_mask(im.image[r.slices]).mean() >= 0.1:
                out.append((i, r))
    return out


def choose(model: HrsegModel, pool: Sequence[Image], cands: list[tuple[int, Region]], shown: set, k: int,
           how: str, rng: np.random.Generator, halo: int) -> list[tuple[int, Region]]:
    """The next ``k`` regions: the most uncertain (``"uncertainty"``: `rank_regions` per image, merged), drawn in
    proportion to their uncertainty (``"sampled"``: `sample_regions`) or random ones (``"random"``)."""
    left = [c for c in cands if (c[0], c[1].as_tuple()) not in shown]
    if how == "random":
        pick = rng.choice(len(left), size=min(k, len(left)), replace=False)
        return [left[int(i)] for i in pick]
    scored, image_of = [], {}
    for i, im in enumerate(pool):
        regions = [r for j, r in left if j == i]
        if regions:
            for rr in rank_regions(model, im.image, regions, halo=halo):
                scored.append(rr)
                image_of[id(rr)] = i
    if how == "sampled":
        return [(image_of[id(rr)], rr.region) for rr in sample_regions(scored, k, rng=rng)]
    if how != "uncertainty":
        raise ValueError(f"unknown strategy {how!r}")
    ranked = sorted(((rr.score, image_of[id(rr)], rr.region) for rr in scored), key=lambda t: -t[0])
    # At most one region per image per round while other images have candidates: the most uncertain regions of
    # one image are often alike (one blurry gland, one stain artefact), and a round spent on them teaches little.
    picked, used = [], set()
    for _, i, r in ranked:
        if len(picked) < k and i not in used:
            picked.append((i, r))
            used.add(i)
    for _, i, r in ranked:
        if len(picked) < k and (i, r) not in picked:
            picked.append((i, r))
    return picked


def coarse_labels(model: HrsegModel, pool: Sequence[Image], threshold: float, halo: int) -> list[Sample]:
    """The model's hard auto-labels of every pool image (argmax where confident, ignored elsewhere)."""
    out = []
    for im in pool:
        probs = predict_probabilities(model, PixelGrid.of(im.image), tile=max(im.image.shape[:2]), halo=halo)
        out.append(Sample(im.image, hard_labels(probs, threshold), key=im.key))
    return out


def run_loop(model0: HrsegModel, pool: Sequence[Image], test: Sequence[Image], *, rounds: int, k: int, size: int,
             how: str, coarse: bool, seed: int, steps: int, threshold: float, halo: int, rank_halo: int,
             crop: int, lr: float, recipe=None, on_pool: bool = False) -> list[dict[str, float]]:
    """Scores after rounds 0..R of one configuration (on ``test``, or with ``on_pool`` on the pool's unrevealed
    pixels)."""
    rng = np.random.default_rng(seed)
    oracle = Oracle(pool)
    cands = candidates(pool, size)
    model = model0
    scores = [score(model, oracle.unrevealed() if on_pool else test)]
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        shown = {(i, r.as_tuple()) for i, r in oracle.shown}
        for i, r in choose(model, pool, cands, shown, k, how, rng, rank_halo):
            oracle.reveal(i, r)
        auto = coarse_labels(model, pool, threshold, halo) if coarse else None
        gen = fine_tune(model, oracle.corrections(), auto, steps=steps, crop=crop, lr=lr, seed=seed * 100 + rnd,
                        device="cpu", recipe=recipe)
        for event in gen:
            if isinstance(event, FineTuneFinished):
                model = event.model
        scores.append(score(model, oracle.unrevealed() if on_pool else test))
        log.info("%s %s seed %d round %d: miou %.4f (%.0f s)", "b" if coarse else "a", how, seed, rnd,
                 scores[-1]["miou"], time.perf_counter() - t0)
    return scores


# ============================================================================================== part 1: GlaS
def train_round0(seed_set: Sequence[Image], steps: int) -> HrsegModel:
    """The round-0 model: a small FPN trained on the fully labelled seed images."""
    torch.manual_seed(0)
    model = create_model("fpn", num_classes=2, class_names=("background", "gland"), mpp=MPP, name="glands-loop",
                         **SMALL_FPN)
    sources = [ArraySource(im.image, im.truth, key=im.key) for im in seed_set]
    for _ in train(model, sources, (), TrainConfig(steps=steps, batch_size=4, crop=192, lr=2e-3, warmup_steps=10,
                                                   seed=0, device="cpu")):
        pass
    return model.eval()


def mean_sd(values: Sequence[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f}" if v.size == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def print_table(title: str, configs: dict[str, list[list[dict[str, float]]]], metric: str) -> None:
    names = list(configs)
    rounds = len(next(iter(configs.values()))[0])
    print(f"\n{title}")
    head = f"{'round':>5}  " + "".join(f"{n:>22}" for n in names)
    print(head)
    print("-" * len(head))
    for r in range(rounds):
        print(f"{r:>5}  " + "".join(f"{mean_sd([run[r][metric] for run in configs[n]]):>22}" for n in names))


def part_glas(args) -> dict[str, Any]:
    seed_set, pool, test = glas_split(Path(args.realdata))
    log.info("GlaS: %d seed images %s, pool of %d, test %d", len(seed_set), [im.key for im in seed_set], len(pool),
             len(test))
    t0 = time.perf_counter()
    model0 = train_round0(seed_set, args.round0_steps)
    log.info("round-0 model trained in %.0f s: %s", time.perf_counter() - t0, score(model0, test))
    configs: dict[str, list] = {}
    for coarse in (False, True):
        for how in args.strategies:
            name = f"({'b' if coarse else 'a'}) {how}"
            configs[name] = [
                run_loop(model0, pool, test, rounds=args.rounds, k=args.k, size=128, how=how, coarse=coarse,
                         seed=s, steps=args.steps, threshold=args.threshold, halo=64, rank_halo=64, crop=160,
                         lr=args.lr, on_pool=args.score_on_pool)
                for s in range(args.seeds)
            ]
    n_cand = len(candidates(pool, 128))
    print(f"\nPart 1: GlaS loop. Pool {len(pool)} images ({n_cand} candidate regions of 128 x 128 µm), test "
          f"{len(test)} held-out images; K = {args.k} regions per round, {args.steps} fine-tuning steps per round, "
          f"coarse threshold {args.threshold}, {args.seeds} seed(s); (a) corrections only, (b) corrections + coarse "
          f"auto-labels of the pool")
    on = "pool (unrevealed pixels)" if args.score_on_pool else "test"
    print_table(f"{on} mIoU (background, gland) after each round, mean ± sd over seeds", configs, "miou")
    print_table(f"{on} gland Dice after each round", configs, "dice")
    print("\nmean of rounds 1.. (the loop's area under the curve), mean ± sd over seeds")
    for metric in ("miou", "dice"):
        print(f"{metric:>5}  " + "".join(f"{mean_sd([np.mean([r[metric] for r in run[1:]]) for run in runs]):>22}"
                                         for runs in configs.values()))
    final = {n: float(np.mean([run[-1]["miou"] for run in runs])) for n, runs in configs.items()}
    for how in args.strategies:
        print(f"final round, {how}: (b) - (a) {final[f'(b) {how}'] - final[f'(a) {how}']:+.4f} mIoU")
    for how in (h for h in args.strategies if h != "random" and "random" in args.strategies):
        print(f"final round, {how} - random: (a) {final[f'(a) {how}'] - final['(a) random']:+.4f}, "
              f"(b) {final[f'(b) {how}'] - final['(b) random']:+.4f} mIoU")
    return {"configs": configs, "pool": [im.key for im in pool], "seed_set": [im.key for im in seed_set],
            "test": [im.key for im in test]}


# ============================================================================================== part 2: domain shift
def part_shift(args) -> dict[str, Any]:
    model0 = load_model(args.shift_model)
    cache = default_cache()
    # A new stain changes the pixels, which only MagNet's segmenter reads (its refiner reads probability maps):
    # the loop adapts the segmenter, at every scale it segments.
    recipe = MagNetRecipe(segmenter_fraction=1.0) if model0.config.arch == "magnet" else None

    def window(seed: int, stain: str) -> Image:
        src = virtual_window(seed, "border", window=args.shift_window, size=16384, mpp=MPP, stain=stain, cache=cache)
        return read_images([src])[0]

    pool = [window(4, args.palette)]
    test = [window(0, args.palette)]
    home = score(model0, [window(0, "he")])
    log.info("domain shift: %s on palette %r; test window in 'he': %s", model0.config.label, args.palette, home)
    configs: dict[str, list] = {}
    for coarse in (False, True):
        name = f"({'b' if coarse else 'a'}) uncertainty"
        configs[name] = [run_loop(model0, pool, test, rounds=args.shift_rounds, k=args.shift_k, size=256,
                                  how="uncertainty", coarse=coarse, seed=0, steps=args.shift_steps,
                                  threshold=args.threshold, halo=0, rank_halo=64, crop=256, lr=args.lr,
                                  recipe=recipe)]
    print(f"\nPart 2: domain shift. Shipped model {model0.config.label} ({model0.config.arch}, trained on the 'he' "
          f"palette) on virtual slides stained {args.palette!r}: pool = slide 4's tumour border, test = slide 0's "
          f"({args.shift_window} px at 1 µm/px); K = {args.shift_k} regions of 256 x 256 µm per round, "
          f"{args.shift_steps} steps")
    print(f"same test window in the training palette 'he': mIoU {home['miou']:.3f}, Dice {home['dice']:.3f}")
    print_table(f"test mIoU (5 classes) on {args.palette!r} after each round", configs, "miou")
    print_table(f"test Dice (mean over the 4 tissue classes) on {args.palette!r} after each round", configs, "dice")
    return {"configs": configs, "home": home, "palette": args.palette}


# ============================================================================================== main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds, 1 seed, fewer steps: a smoke run")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--k", type=int, default=4, help="regions revealed per round (GlaS)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="fine-tuning steps per round (GlaS)")
    p.add_argument("--round0-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="coarse-label confidence (for two classes 0.5 would keep every pixel)")
    p.add_argument("--palette", default="he-faded", help="stain palette of the domain-shift case")
    p.add_argument("--shift-model", default="tissue", help="model of the domain-shift case (shipped name or folder)")
    p.add_argument("--shift-window", type=int, default=1024)
    p.add_argument("--shift-rounds", type=int, default=3)
    p.add_argument("--shift-k", type=int, default=2)
    p.add_argument("--shift-steps", type=int, default=60)
    p.add_argument("--strategies", type=lambda s: s.split(","), default=["uncertainty", "sampled", "random"],
                   help="GlaS region choices, comma-separated: uncertainty (top K), sampled, random")
    p.add_argument("--score-on-pool", action="store_true",
                   help="GlaS: score every round on the pool's unrevealed pixels instead of the test images (a "
                        "development set for comparing region choices without looking at the test set)")
    p.add_argument("--skip-glas", action="store_true")
    p.add_argument("--skip-shift", action="store_true")
    p.add_argument("--realdata", default=str(default_realdata()))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write every score here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seeds, args.steps, args.round0_steps = 2, 1, 20, 120
        args.shift_rounds, args.shift_steps = 1, 20
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_glas:
        results["glas"] = part_glas(args)
    if not args.skip_shift:
        results["shift"] = part_shift(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s on {args.threads} thread(s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
