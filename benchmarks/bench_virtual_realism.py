"""How much the virtual slide looks like real H&E: colour statistics, and a model trained on real nuclei applied to it.

1. Colour: for the GlaS colon images, the 20x MICCAI 2015 tiles (TCGA) and the virtual slide under each stain
   palette (8 crops of 960 x 640 level-0 px on the tumour border, GlaS's field of view), print the mean and
   standard deviation of RGB, the share of near-white pixels, the mean colour of tissue pixels, and Macenko stain
   vectors with the median and 99th percentile of the H and E concentrations (Macenko et al., ISBI 2009; the
   same code on every image set).  Per class, the virtual slide's tissue colours against GlaS's gland and
   non-gland pixels (from the GlaS masks).
2. Model (``--model DIR``, a nucleus model trained on real tiles only, e.g. with
   ``napari-hrseg train --model fpn --data ../shared/realdata/miccai2015-nuclei --steps 400 --crop 192 --out DIR``):
   foreground Dice of its nuclei against the virtual slide's exact nucleus mask, per palette, against its Dice on
   real 20x MICCAI tiles in the same run (ratio = virtual / real; those tiles were seen in training except the
   validation split, so the real Dice is optimistic).

Run:  python benchmarks/bench_virtual_realism.py [--seed 0] [--model DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from napari_hrseg.virtual import STAIN_PALETTES, virtual_slide  # noqa: E402
from napari_hrseg.virtual.params import NORMAL_EPITHELIUM, STROMA, TUMOUR_EPITHELIUM  # noqa: E402

REALDATA = Path(os.environ.get("HRSEG_REALDATA", REPO.parent / "shared" / "realdata"))


def macenko(rgb: np.ndarray, beta: float = 0.15, alpha: float = 1.0):
    """Stain vectors (columns H, E) and the 50th / 99th percentiles of their concentrations (Macenko 2009)."""
    od = -np.log10((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / 255.0)
    tissue = od[~np.any(od < beta, axis=1)]
    _, eig = np.linalg.eigh(np.cov(tissue.T))
    proj = tissue @ eig[:, 1:3]
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = eig[:, 1:3] @ np.array([np.cos(lo), np.sin(lo)])
    v2 = eig[:, 1:3] @ np.array([np.cos(hi), np.sin(hi)])
    he = np.array([v1, v2]).T if v1[0] > v2[0] else np.array([v2, v1]).T
    he = he * np.sign(he.sum(axis=0))
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    return he, np.percentile(conc, 50, axis=1), np.percentile(conc, 99, axis=1)


def describe(name: str, px: np.ndarray) -> None:
    px = px.reshape(-1, 3).astype(np.float64)
    white = px.mean(axis=1) >= 215
    he, c50, c99 = macenko(px)
    f = lambda a: "(" + ", ".join(f"{v:.0f}" for v in a) + ")"
    g = lambda a: "(" + ", ".join(f"{v:.2f}" for v in a) + ")"
    print(
        f"{name:<18} mean {f(px.mean(0))} std {f(px.std(0))} white {white.mean():.2f} tissue {f(px[~white].mean(0))}"
        f" | H {g(he[:, 0])} E {g(he[:, 1])} H,E median {g(c50)} p99 {g(c99)}"
    )


def real_sets() -> dict[str, np.ndarray]:
    glas = sorted(glob.glob(str(REALDATA / "glas-test-subset" / "images" / "*.png")))
    miccai = sorted(glob.glob(str(REALDATA / "miccai2015-nuclei" / "image0[1-7].png")))  # the 20x tiles
    load = lambda files: np.concatenate([np.asarray(Image.open(f).convert("RGB")).reshape(-1, 3) for f in files])
    return {"GlaS": load(glas), "MICCAI 2015 20x": load(miccai)}


def virtual_crops(seed: int, stain: str):
    vs = virtual_slide(seed, stain=stain)
    r = vs.border_region(2048)
    crops = []
    for k in range(8):
        y, x = r.row + (k // 4) * 900, r.col + (k % 4) * 500 - 600
        crops.append((vs, y, x, np.asarray(vs.slide.levels[0][y : y + 640, x : x + 960].compute())))
    return crops


def class_colours(seed: int) -> None:
    glands, other = [], []
    for f in sorted(glob.glob(str(REALDATA / "glas-test-subset" / "images" / "*.png"))):
        im = np.asarray(Image.open(f).convert("RGB")).reshape(-1, 3).astype(np.float64)
        mask = np.asarray(Image.open(f.replace("images", "labels_binary"))).reshape(-1) > 0
        dark = im.mean(axis=1) < 215
        glands.append(im[mask & dark])
        other.append(im[~mask & dark])
    f = lambda a: "(" + ", ".join(f"{v:.0f}" for v in a) + ")"
    gland_mean, other_mean = np.concatenate(glands).mean(0), np.concatenate(other).mean(0)
    print(f"GlaS gland pixels (non-white) {f(gland_mean)}, other tissue {f(other_mean)}")
    vs = virtual_slide(seed)
    r = vs.border_region(2048)
    img = np.asarray(vs.slide.levels[1][r.row // 2 : r.row // 2 + 1024, r.col // 2 : r.col // 2 + 1024].compute())
    sem = np.asarray(vs.semantic[1][r.row // 2 : r.row // 2 + 1024, r.col // 2 : r.col // 2 + 1024].compute())
    img = img.reshape(-1, 3).astype(np.float64)
    sem = sem.reshape(-1)
    dark = img.mean(axis=1) < 215
    for k in (STROMA, NORMAL_EPITHELIUM, TUMOUR_EPITHELIUM):
        print(f"virtual 'he' {vs.class_names[k]:<18} (non-white) {f(img[(sem == k) & dark].mean(0))}")


def model_check(model_dir: str, seed: int) -> None:
    import torch

    from napari_hrseg.models.base import to_input_tensor
    from napari_hrseg.models.weights import load_model

    model = load_model(model_dir)
    torch.set_num_threads(1)

    def nuclei(img: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(to_input_tensor(np.ascontiguousarray(img), model.config))
        logits = out["logits"] if isinstance(out, dict) else out
        return logits.argmax(1)[0].numpy() > 0

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)

    real = []
    for f in sorted(glob.glob(str(REALDATA / "miccai2015-nuclei" / "image0[1-7].png"))):
        im = np.asarray(Image.open(f).convert("RGB"))[:512, :512]
        gt = np.asarray(Image.open(f.replace(".png", "_label.png")))[:512, :512] > 0
        real.append(dice(nuclei(im), gt))
    real_dice = float(np.mean(real))
    print(f"\nnucleus model {model_dir} ({model.config.arch}, {model.config.mpp} µm/px)")
    print(f"real MICCAI 20x tiles: Dice {real_dice:.3f}")
    print(f"{'palette':<10} {'Dice':>6} {'precision':>9} {'recall':>7} {'virtual / real':>14}")
    for stain in STAIN_PALETTES:
        vs = virtual_slide(seed, stain=stain)
        r = vs.border_region(2048)
        tp = fp = fn = 0
        for k in range(4):
            y, x = r.row + 512 * (k // 2), r.col + 512 * (k % 2)
            pred = nuclei(np.asarray(vs.slide.levels[0][y : y + 512, x : x + 512].compute()))
            gt = np.asarray(vs.instances[0][y : y + 512, x : x + 512].compute()) > 0
            tp += int((pred & gt).sum())
            fp += int((pred & ~gt).sum())
            fn += int((~pred & gt).sum())
        d = 2 * tp / max(2 * tp + fp + fn, 1)
        print(f"{stain:<10} {d:>6.3f} {tp / max(tp + fp, 1):>9.3f} {tp / max(tp + fn, 1):>7.3f} {d / real_dice:>14.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="a nucleus model directory trained on real H&E (see the module docstring)")
    args = ap.parse_args(argv)
    for name, px in real_sets().items():
        describe(name, px)
    for stain in STAIN_PALETTES:
        describe(f"virtual {stain}", np.concatenate([c[-1].reshape(-1, 3) for c in virtual_crops(args.seed, stain)]))
    print()
    class_colours(args.seed)
    if args.model:
        model_check(args.model, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
