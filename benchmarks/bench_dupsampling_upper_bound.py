"""DUpsampling's upper-bound experiment (Tian et al., CVPR 2019, section 3) on real pathology labels.

How well can a label map be recovered from an r-times compressed form?  For each dataset the label images are
split by image into a fitting half and a held-out half.  On the held-out labels:

- **bilinear**: the one-hot map is downsampled r times (area average: each r x r block becomes its class
  fractions, C numbers per block), upsampled bilinearly (align_corners=False) and argmaxed;
- **DUpsampling, C~ = k**: each r x r one-hot block is encoded with the PCA basis W fitted on the fitting half
  (``x = W^T (v - mean)``, k numbers per block), decoded with ``W x + mean`` and `pixel_shuffle`, and argmaxed.
  C~ = C stores exactly as many numbers per block as the bilinear baseline.

Score: mIoU over background and foreground, confusion accumulated over all held-out pixels.  Sizes not divisible
by r are padded (edge values) and cropped back.  Data (read-only, ``$HRSEG_REALDATA`` or ../shared/realdata):

- GlaS (20 colon-gland test images, binary gland masks), fit on 10 / held out 10 (alternating);
- MICCAI 2015 nuclei (15 tiles, nuclei foreground = instance label > 0), the 40x tiles reduced to 20x
  (2 x 2 area average >= 0.5) so all are ~0.5 µm/px; fit on 8 / held out 7 (alternating).

Run:  python benchmarks/bench_dupsampling_upper_bound.py [--ratios 4 8 16] [--components 2 8 32]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from napari_hrseg.models.dupsampling import dupsample, encode_labels, fit_dupsampling_basis

REALDATA = Path(os.environ.get("HRSEG_REALDATA", Path(__file__).resolve().parents[1].parent / "shared" / "realdata"))
MICCAI_40X = {f"image{i:02d}" for i in range(8, 16)}  # README_training.txt: images 08-15 are 40x


def glas_labels() -> list[np.ndarray]:
    files = sorted((REALDATA / "glas-test-subset" / "labels_binary").glob("*.png"))
    return [(np.asarray(Image.open(f)) > 0).astype(np.int64) for f in files]


def miccai_labels() -> list[np.ndarray]:
    out = []
    for f in sorted((REALDATA / "miccai2015-nuclei").glob("image??_label.png")):
        fg = (np.asarray(Image.open(f)) > 0).astype(np.float32)
        if f.name[:7] in MICCAI_40X:
            h, w = (fg.shape[0] // 2) * 2, (fg.shape[1] // 2) * 2
            fg = fg[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        out.append((fg >= 0.5).astype(np.int64))
    return out


def confusion(pred: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(truth.ravel() * classes + pred.ravel(), minlength=classes * classes).reshape(classes, classes)


def miou(conf: np.ndarray) -> float:
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    return float(np.mean(inter / np.maximum(union, 1)))


def padded(labels: np.ndarray, r: int) -> torch.Tensor:
    h, w = labels.shape
    return torch.from_numpy(np.pad(labels, ((0, (-h) % r), (0, (-w) % r)), mode="edge"))[None]


def bilinear_reconstruction(labels: np.ndarray, r: int, classes: int) -> np.ndarray:
    t = padded(labels, r)
    onehot = F.one_hot(t, classes).permute(0, 3, 1, 2).float()
    small = F.avg_pool2d(onehot, r)
    up = F.interpolate(small, size=t.shape[-2:], mode="bilinear", align_corners=False)
    return up.argmax(1)[0, : labels.shape[0], : labels.shape[1]].numpy()


def dupsampling_reconstruction(labels: np.ndarray, r: int, classes: int, basis, mean) -> np.ndarray:
    t = padded(labels, r)
    rec = dupsample(encode_labels(t, basis, mean, r, classes), basis, mean, r)
    return rec.argmax(1)[0, : labels.shape[0], : labels.shape[1]].numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--components", type=int, nargs="*", default=[2, 8, 32])
    args = parser.parse_args(argv)
    if not REALDATA.is_dir():
        raise SystemExit(f"real data not found at {REALDATA}; set HRSEG_REALDATA")

    classes = 2
    datasets = {"GlaS glands": glas_labels(), "MICCAI nuclei (20x)": miccai_labels()}
    header = ["dataset", "r", "fit / held-out images", "bilinear (C=2 per block)"]
    header += [f"DUpsampling C~={k}" for k in args.components]
    print("# DUpsampling upper bound: mIoU (%) of labels reconstructed from their r-times compressed form")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|")
    for name, labels in datasets.items():
        fit, held_out = labels[0::2], labels[1::2]
        for r in args.ratios:
            conf_bil = np.zeros((classes, classes), np.int64)
            for lab in held_out:
                conf_bil += confusion(bilinear_reconstruction(lab, r, classes), lab, classes)
            cells = [name, str(r), f"{len(fit)} / {len(held_out)}", f"{100 * miou(conf_bil):.2f}"]
            for k in args.components:
                n_feat = r * r * classes
                if k > n_feat:
                    cells.append("n/a")
                    continue
                basis, mean = fit_dupsampling_basis(fit, classes, r, k)
                conf = np.zeros((classes, classes), np.int64)
                for lab in held_out:
                    conf += confusion(dupsampling_reconstruction(lab, r, classes, basis, mean), lab, classes)
                cells.append(f"{100 * miou(conf):.2f}")
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
