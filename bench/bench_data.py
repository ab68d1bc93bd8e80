"""
Data throughput on one CPU core: the EQ-VAE crop + INTER_AREA resize on a 1024 x 768 photo (before / after / OpenCV,
with and without the JPEG decode), the built-in synthetic dataset at 64 and 256 px (each transform), and
ImageFolder + ADM center crop / EQ-VAE crop on a temporary folder of JPEGs.

    OMP_NUM_THREADS=1 python bench/bench_data.py [--seconds 3] [--photo some_1024x768.jpg] [--crop-only]
"""
import argparse
import io
import os
import random
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


#################################################################################
#             The EQ-VAE crop before this version (float64 numpy), kept as a reference          #
#################################################################################

def _old_area_resample_rows(f, out_size):
    """The previous data.py: exact pixel-area resampling along the first axis in float64 via a running integral."""
    n = f.shape[0]
    cum = np.zeros((n + 1,) + f.shape[1:])
    np.cumsum(f, axis=0, out=cum[1:])
    b = np.arange(out_size + 1) * (n / out_size)
    i = np.minimum(np.floor(b).astype(np.int64), n)
    frac = (b - i).reshape((-1,) + (1,) * (f.ndim - 1))
    integral = cum[i] + frac * f[np.minimum(i, n - 1)]
    return (integral[1:] - integral[:-1]) * (out_size / n)


def old_area_resize(arr, out_h, out_w):
    """The previous data.area_resize: float64 exact area mean, rounded half up (differs from OpenCV by one level on
    about a fifth of the shrinks)."""
    x = _old_area_resample_rows(arr, out_h)
    x = _old_area_resample_rows(x.transpose(1, 0, 2), out_w).transpose(1, 0, 2)
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def old_eqvae_crop(pil_image, size=256):
    """The previous data.EQVAECrop.__call__ (same draws)."""
    arr = np.asarray(pil_image, dtype=np.uint8)
    h, w = arr.shape[:2]
    side = max(1, int(min(h, w) * np.random.uniform(0.5, 1.0)))
    top = int((h - side) * random.random())
    left = int((w - side) * random.random())
    crop = arr[top:top + side, left:left + side]
    if side != size:
        crop = old_area_resize(crop, size, size)
    return Image.fromarray(crop)


def opencv_eqvae_crop(pil_image, size=256):
    """The official pipeline's arithmetic: the same draws, cv2.resize(INTER_AREA) as albumentations calls it."""
    import cv2
    w, h = pil_image.size
    side = max(1, int(min(h, w) * np.random.uniform(0.5, 1.0)))
    top = int((h - side) * random.random())
    left = int((w - side) * random.random())
    crop = np.asarray(pil_image.crop((left, top, left + side, top + side)))
    if side != size:
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return Image.fromarray(crop)


def test_photo(path=None):
    """A 1024 x 768 RGB photo: --photo, else scikit-image's bundled coffee photo resized (LANCZOS), else a synthetic
    scene; returned as PIL image and as JPEG bytes (quality 90)."""
    if path:
        img = Image.open(path).convert("RGB")
    else:
        try:
            import skimage.data
            img = Image.fromarray(skimage.data.coffee()).resize((1024, 768), Image.LANCZOS)
        except ImportError:
            x = data.SyntheticImages(1, 1024)[0][0]
            img = Image.fromarray(data.to_uint8(x).permute(1, 2, 0).numpy()[:768])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return img, buf.getvalue()


def crop_throughput(crop, pil_image, jpeg, seconds):
    """Images per second of CPU time for crop(image) on a fresh draw each time, optionally decoding the JPEG first."""
    np.random.seed(0), random.seed(0)
    for _ in range(20):   # warm up (OpenCV's tables, area_resize's cached taps for the common sides)
        crop(pil_image)
    n, c0, w0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - w0 < seconds:
        img = Image.open(io.BytesIO(jpeg)).convert("RGB") if jpeg is not None else pil_image
        crop(img)
        n += 1
    return n / (time.process_time() - c0)


def bench_eqvae_crop(args):
    """EQ-VAE crop + resize on a 1024 x 768 photo, images/s per core: before, after, OpenCV; with / without decode."""
    pil_image, jpeg = test_photo(args.photo)
    new = data.EQVAECrop(256)
    pipelines = [("before (float64 numpy)", old_eqvae_crop), ("after (data.EQVAECrop)", new)]
    try:
        import cv2
        cv2.setNumThreads(1)
        pipelines.append((f"OpenCV {cv2.__version__} INTER_AREA", opencv_eqvae_crop))
    except ImportError:
        pass
    print(f"EQ-VAE crop + resize to 256, {pil_image.size[0]}x{pil_image.size[1]} photo, one core (images/s of CPU "
          f"time):")
    print(f"  {'pipeline':32s} {'crop + resize':>14s} {'JPEG decode + crop + resize':>28s}")
    before = None
    for name, crop in pipelines:
        alone = crop_throughput(crop, pil_image, None, args.seconds)
        decoded = crop_throughput(crop, pil_image, jpeg, args.seconds)
        before = before or (alone, decoded)
        print(f"  {name:32s} {alone:9.0f} {alone / before[0]:3.1f}x {decoded:22.0f} {decoded / before[1]:3.1f}x")


def main(args):
    torch.set_num_threads(1)   # one core: this is what one DataLoader worker gets
    bench_eqvae_crop(args)
    if args.crop_only:
        return
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
    parser.add_argument("--photo", default=None, help="a photo for the EQ-VAE crop benchmark (default: scikit-image's "
                        "coffee resized to 1024 x 768)")
    parser.add_argument("--crop-only", action="store_true", help="only the EQ-VAE crop benchmark")
    main(parser.parse_args())
