"""Parameters, FLOPs and CPU latency per 512 x 512 tile of every registered architecture, against ``"fpn"``.

Each model is built with its default (CPU-sized) hyper-parameters and run in eval mode under ``torch.no_grad``
on one ``1 x 3 x 512 x 512`` tile.  FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (convolutions and
matrix products; resizes, median filters, top-k and other elementwise work are not counted, so MagNet's and
RefineMask's counts are lower bounds).  Instance models are timed on ``forward()`` (their dense heads) only.
Latency is the median of ``--repeats`` timed forwards after ``--warmup`` untimed ones; the models are timed in
interleaved rounds (fpn, model A, model B, fpn, ...) so a change in machine load affects every model alike, and
each is reported as a ratio to the ``"fpn"`` baseline measured in the same rounds.

Run:  python benchmarks/bench_models.py [--threads 2] [--size 512] [--repeats 7] [--warmup 2] [--models fpn magnet]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_hrseg.models import create_model, list_models


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def time_once(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2, the CI machine)")
    parser.add_argument("--size", type=int, default=512, help="tile side in pixels")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", nargs="*", help="subset of registered names (fpn is always included)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [n for n in list_models() if not args.models or n in args.models]
    names = ["fpn"] + [n for n in names if n != "fpn"]
    x = torch.randn(1, 3, args.size, args.size)

    models, rows = {}, {}
    for name in names:
        model = create_model(name).eval()
        models[name] = model
        rows[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "flops": count_flops(model, x),
            "times": [],
        }
        for _ in range(args.warmup):
            time_once(model, x)
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name in names:
            rows[name]["times"].append(time_once(models[name], x))
    load_after = os.getloadavg()

    base = rows["fpn"]
    base_ms = statistics.median(base["times"]) * 1e3
    print(f"# Models on one {args.size} x {args.size} tile, eval, no_grad, CPU, torch.set_num_threads({args.threads})")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average {load_before[0]:.1f} before timing, {load_after[0]:.1f} after; "
          f"median of {args.repeats} interleaved runs after {args.warmup} warm-up runs")
    print()
    print("| model | task | params (M) | x fpn | GFLOPs | x fpn | latency ms (median) | min ms | x fpn |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        r = rows[name]
        med = statistics.median(r["times"]) * 1e3
        print(f"| {name} | {models[name].task} | {r['params'] / 1e6:.3f} | {r['params'] / base['params']:.2f} "
              f"| {r['flops'] / 1e9:.2f} | {r['flops'] / base['flops']:.2f} "
              f"| {med:.0f} | {min(r['times']) * 1e3:.0f} | {med / base_ms:.2f} |")
    instance = [n for n in names if models[n].task == "instance"]
    if instance:
        print()
        print(f"Instance models ({', '.join(instance)}): forward() only, i.e. the dense heads; decoding proposals and "
              "the per-object mask head (predict_instances) depend on how many objects are found and are not timed.")
    print("FLOPs count convolutions and matrix products only (not resizes, median filters, top-k).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
