"""
Data throughput on one CPU core: the built-in synthetic dataset at 64 and 256 px (each transform), and
ImageFolder + ADM center crop / EQ-VAE crop on a temporary folder of JPEGs.

    OMP_NUM_THREADS=1 python bench/bench_data.py [--seconds 3]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def throughput(dataset, seconds):
    """Items per second (CPU time of this process, and wall time) for sequential __getitem__."""
    dataset[0]   # warm caches
    n, i = 0, 0
    c0, w0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - w0 < seconds:
        dataset[i % len(dataset)]
        n, i = n + 1, i + 1
    return n / (time.process_time() - c0), n / (time.perf_counter() - w0)


def main(args):
    torch.set_num_threads(1)   # one core: this is what one DataLoader worker gets
    rows = []
    for res in (64, 256):
        for transform in ("center", "center_flip", "eqvae"):
            ds = data.build_dataset("synthetic", res, transform, num_images=10000)
            rows.append((f"synthetic {res}px {transform}", *throughput(ds, args.seconds)))

    # ImageFolder: JPEGs of typical ImageNet size (500 x 375), quality 90, in 4 class folders.
    with tempfile.TemporaryDirectory() as root:
        src = data.SyntheticImages(args.num_files, 500)
        for i in range(args.num_files):
            folder = os.path.join(root, f"class{i % 4}")
            os.makedirs(folder, exist_ok=True)
            arr = ((src[i][0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)[:375]
            Image.fromarray(arr).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
        t = time.perf_counter()
        for _ in range(10):
            data.ImageFolder(root)
        rows.append((f"ImageFolder scan ({args.num_files} files)", None, 10 / (time.perf_counter() - t)))
        for res in (64, 256):
            for transform in ("center", "center_flip", "eqvae"):
                ds = data.build_dataset(root, res, transform)
                rows.append((f"ImageFolder 500x375 jpg -> {res}px {transform}", *throughput(ds, args.seconds)))

    print(f"{'what':48s} {'items/s (cpu)':>14s} {'items/s (wall)':>15s}")
    for name, cpu, wall in rows:
        print(f"{name:48s} {cpu if cpu is not None else float('nan'):14.1f} {wall:15.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--num-files", type=int, default=200, help="JPEGs written for the ImageFolder runs")
    main(parser.parse_args())
