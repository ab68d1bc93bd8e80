"""
Datasets and transforms every stage shares: ImageFolder, the ADM center crop, the EQ-VAE random crop,
the built-in synthetic dataset, and the latent/token caches.

Every dataset item is (image, label) with image a float tensor (3, H, W) in [-1, 1] (uint8 / 127.5 - 1, i.e.
torchvision's ToTensor followed by Normalize(0.5, 0.5)) and label an int. Random transforms draw from the global
python / numpy / torch RNGs, exactly like the reference pipelines, so train_utils.ResumableLoader can seed them per
sample and a resumed run sees the same crops.
"""
import collections
import colorsys
import functools
import hashlib
import json
import math
import os
import random
import socket
import warnings
import zipfile

import numpy as np
import torch
from PIL import Image


#################################################################################
#                      uint8 <-> [-1, 1] conversion, image grids                #
#################################################################################

def to_uint8(x):
    """[-1, 1] tensor -> uint8 tensor via clamp(127.5 x + 128, 0, 255) (DiT/ADM sample convention)."""
    # The +128 (not +127.5) followed by truncation rounds to nearest: 127.5 x + 127.5 + 0.5, floored.
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)


def pil_to_tensor(pil_image):
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1] (= ToTensor + Normalize(0.5, 0.5))."""
    arr = np.asarray(pil_image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def save_image_grid(x, path, nrow=8, padding=2, row_labels=None):
    """Write a batch x: (B, C, H, W) in [-1, 1] (C = 1 or 3) as one PNG grid, nrow images per row; row_labels: a
    caption per grid row, written in a margin on the left."""
    x = x.detach().float().cpu()
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"save_image_grid expects (B, 1|3, H, W), got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    b, _, h, w = x.shape
    ncol = min(nrow, b)
    nrows = math.ceil(b / ncol)
    # Same layout as torchvision.utils.make_grid: `padding` black pixels around and between the tiles.
    grid = torch.zeros(3, nrows * (h + padding) + padding, ncol * (w + padding) + padding, dtype=torch.uint8)
    imgs = to_uint8(x)
    for i in range(b):
        r, c = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top:top + h, left:left + w] = imgs[i]
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if row_labels:
        from PIL import ImageDraw
        margin = 8 + 6 * max(len(s) for s in row_labels)  # PIL's default bitmap font: ~6 px a character
        labelled = Image.new("RGB", (picture.width + margin, picture.height), "white")
        labelled.paste(picture, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        for r, text in enumerate(row_labels[:nrows]):
            draw.text((4, padding + r * (h + padding) + h // 2 - 5), text, fill="black")
        picture = labelled
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    picture.save(path)
    return path


def save_npz(path, images=None, **arrays):
    """Write an ADM-layout .npz atomically (a temporary file, then a rename): images as arr_0 (uint8, N x H x W x 3,
    the samples / reference-batch layout of openai/guided-diffusion's evaluator) plus any other arrays."""
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ADM .npz images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
        arrays = {"arr_0": images, **arrays}
    path = str(path)
    tmp = f"{path}.tmp.{os.getpid()}.npz"  # np.savez appends .npz to names without it
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


#################################################################################
#          Image sets for the metrics: ADM .npz files and image folders         #
#################################################################################
# An image set is anything with len() and read(start, end) -> uint8 (n, H, W, 3). ADM .npz files (arr_0, uint8
# NHWC) are streamed from the zip member rather than loaded whole: 50K images at 512 px are 39 GB.

def load_numpy(path):
    """np.load of a .npy / .npz (no pickles), or one error that names the file: numpy's own says neither which file
    nor why (BadZipFile for a truncated download, a pickle complaint for a foreign file)."""
    try:
        if path.endswith(".npz") and os.path.isfile(path) and not zipfile.is_zipfile(path):
            raise ValueError("not a zip archive")
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} cannot be read as a numpy .npy / .npz file ({type(e).__name__}: {e}); a "
                         f"truncated download or another format?") from None


class NpzImages:
    """The arr_0 array of an ADM .npz, read in slices."""
    def __init__(self, path):
        self.path = path
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not an .npz archive (a truncated or foreign file?); expected an ADM .npz with "
                             f"arr_0 (uint8 N x H x W x 3)")
        with zipfile.ZipFile(path) as zf:
            if "arr_0.npy" not in zf.namelist():
                raise KeyError(f"{path} holds no images: no arr_0 (keys: {[n[:-4] for n in zf.namelist()]})")
            with zf.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"arr_0 in {path}: unsupported .npy format version {version}")
                self.offset = f.tell()
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"arr_0 in {path} has shape {shape}; "
                             "expected (N, H, W, 3) uint8 images (ADM layout, NHWC)")
        if dtype != np.uint8:
            raise ValueError(f"arr_0 in {path} has dtype {dtype}; expected uint8 in [0, 255] (ADM layout). "
                             "Convert with np.clip(127.5 * x + 128, 0, 255).astype(np.uint8) for images in [-1, 1].")
        if fortran:
            raise ValueError(f"arr_0 in {path} is stored in Fortran order; save it C-contiguous")
        self.shape, self.dtype = tuple(shape), dtype
        self.image_size = self.shape[1:3]
        self._file, self._pos = None, None

    def __len__(self):
        return self.shape[0]

    def read(self, start, end):
        item = int(np.prod(self.shape[1:]))
        if self._file is None or self._pos > start:      # (re)open: zip members only seek forward cheaply
            self.close()
            self._zip = zipfile.ZipFile(self.path)
            self._file = self._zip.open("arr_0.npy")
            self._file.seek(self.offset)
            self._pos = 0
        if self._pos < start:
            self._file.seek(self.offset + start * item)
        buf = self._file.read((end - start) * item)
        self._pos = end
        return np.frombuffer(buf, dtype=np.uint8).reshape(end - start, *self.shape[1:])

    def close(self):
        if self._file is not None:
            self._file.close()
            self._zip.close()
            self._file = None


class FolderImages:
    """Every image under a folder (recursive, sorted paths), all of one size, as uint8 RGB."""
    def __init__(self, root):
        self.path = root
        self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                            if f.lower().endswith(IMG_EXTENSIONS))
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root}")
        with Image.open(self.files[0]) as im:
            self.size = im.size
        self.image_size = self.size[::-1]

    def __len__(self):
        return len(self.files)

    def read(self, start, end):
        out = []
        for f in self.files[start:end]:
            with Image.open(f) as im:
                if im.size != self.size:
                    raise ValueError(f"images in {self.path} differ in size: {self.files[0]} is {self.size}, "
                                     f"{f} is {im.size}; center-crop them to one size first")
                out.append(np.asarray(to_rgb8(im)))
        return np.stack(out)


def open_images(path):
    """An image set from an ADM .npz (arr_0) or a folder of images."""
    if os.path.isdir(path):
        return FolderImages(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or folder (expected an ADM .npz or a folder of images)")
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: expected an ADM .npz (arr_0 uint8 NHWC) or a folder of images")
    return NpzImages(path)


#################################################################################
#           Crops: ADM center crop (DiT, SiT, REPA) and the EQ-VAE crop         #
#################################################################################

def center_crop_arr(pil_image, image_size):
    """ADM's center crop: halve with a BOX filter while possible, BICUBIC so the short side == image_size, crop."""
    # As guided-diffusion/image_datasets.py and DiT's train.py. The exact 2x box halvings are cheap anti-aliasing
    # for big images; they change pixel values compared with one bicubic resize, and the ADM reference batches
    # (FID statistics) were made this way, so we keep them.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2   # floor: odd leftovers lose their extra row/column at the bottom/right
    left = (arr.shape[1] - image_size) // 2
    # DiT returns a PIL image (so torchvision transforms can follow); ADM returned the array.
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


# OpenCV's INTER_AREA, reproduced bit for bit (OpenCV imgproc/src/resize.cpp, hal::resize; checked against OpenCV
# 4.6, 4.12 and 5.0 on x86-64 in tests/test_data.py). The official EQ-VAE data code resizes its crops with
# cv2.resize(..., interpolation=cv2.INTER_AREA) (through albumentations), and OpenCV computes INTER_AREA in one of
# three ways, each with its own arithmetic and rounding, so an "exact area average" is off by one level on about a
# fifth of the shrinks:
# 1. integer factor k on both axes (resizeAreaFast_): integer sums of k x k blocks; for k = 2 (1, 3 or 4 channels)
#    (sum + 2) >> 2, i.e. .5 rounds up; otherwise sum * (1.f / k^2) in float32, rounded half to even (cvRound);
# 2. any other shrink (resizeArea_, computeResizeAreaTab): per output pixel, taps over the source pixels it covers,
#    weights overlap / cell width cast to float32 (overlaps under 1e-3 px dropped), summed in float32 in source
#    order, first along each source row, then over the source rows; cvRound (half to even) at the end;
# 3. enlarging on either axis (resizeGeneric_ with INTER_LINEAR's fixed-point kernels): two taps per axis with
#    11-bit integer weights that come from the area overlap of the last source pixel.
# Below, every float32 product and sum is one numpy float32 operation in OpenCV's order (numpy never fuses a multiply
# and an add), so the results are identical, and vectorised over a whole row of taps it runs about as fast as OpenCV
# (1.4 ms vs 1.0 ms for a 576 px crop to 256 on one core). An OpenCV build whose compiler fuses multiply-adds (FMA,
# common on ARM) can differ from x86-64 builds, and so from this, in rare last-bit ties.

_DBL_EPSILON = 2.220446049250313e-16
_RESIZE_COEF = 2048   # INTER_RESIZE_COEF_SCALE: the fixed-point weights of INTER_LINEAR have 11 fractional bits


def _expand_channels(idx, weights, channels):
    """Taps over pixels -> taps over the flattened (pixel, channel) axis of an (H, W * C) array."""
    if not channels:
        return idx, weights
    idx = (idx[..., None] * channels + np.arange(channels)).reshape(idx.shape[0], -1)
    return idx, np.repeat(weights, channels, axis=-1)


@functools.lru_cache(maxsize=4096)
def _area_taps(n_in, n_out, channels=0):
    """computeResizeAreaTab for a shrink n_in -> n_out: (idx, weights), each (T, n_out), T = most taps per output;
    outputs with fewer taps are padded with weight 0 (adding 0.0 leaves a float32 sum unchanged)."""
    scale = 1.0 / (n_out / n_in)   # as hal::resize computes it from cv::resize's inv_scale
    taps = []
    for d in range(n_out):
        fsx1 = d * scale
        fsx2 = fsx1 + scale
        cell = min(scale, n_in - fsx1)
        sx1, sx2 = math.ceil(fsx1), min(math.floor(fsx2), n_in - 1)
        sx1 = min(sx1, sx2)
        t = []
        if sx1 - fsx1 > 1e-3:                               # the partly covered first pixel
            t.append((sx1 - 1, (sx1 - fsx1) / cell))
        t += [(s, 1.0 / cell) for s in range(sx1, sx2)]    # fully covered pixels
        if fsx2 - sx2 > 1e-3:                               # the partly covered last pixel
            t.append((sx2, min(min(fsx2 - sx2, 1.0), cell) / cell))
        taps.append(t)
    n_taps = max(len(t) for t in taps)
    idx = np.array([[t[min(k, len(t) - 1)][0] for t in taps] for k in range(n_taps)], dtype=np.int64)
    weights = np.array([[t[k][1] if k < len(t) else 0.0 for t in taps] for k in range(n_taps)]).astype(np.float32)
    return _expand_channels(idx, weights, channels)


@functools.lru_cache(maxsize=4096)
def _linear_area_taps(n_in, n_out, channels=0):
    """hal::resize's INTER_AREA taps when enlarging: (idx (2, n_out), fixed-point weights (2, n_out) int32)."""
    inv_scale = n_out / n_in
    scale = 1.0 / inv_scale
    d = np.arange(n_out)
    s = np.floor(d * scale).astype(np.int64)
    f = ((d + 1) - (s + 1) * inv_scale).astype(np.float32)   # the part of the output pixel past source pixel s
    f = np.where(f <= 0, np.float32(0), f - np.floor(f)).astype(np.float32)
    # From the last source pixel on, both taps read it with f = 0 (OpenCV clamps x so; along y it clamps only the row
    # index, but there f = (d + 1) - n_out rounds to 0 anyway).
    f[s >= n_in - 1] = 0
    w = np.stack([np.rint((np.float32(1) - f) * np.float32(_RESIZE_COEF)),
                  np.rint(f * np.float32(_RESIZE_COEF))]).astype(np.int32)   # saturate_cast<short>: half to even
    idx = np.stack([np.minimum(s, n_in - 1), np.minimum(s + 1, n_in - 1)])
    return _expand_channels(idx, w, channels)


def _resize_area_fast(arr, kx, ky):
    """Integer factors kx, ky (resizeAreaFast_): exact integer block sums, then OpenCV's rounding."""
    h, w, c = arr.shape
    if kx == ky == 2 and c in (1, 3, 4):   # ResizeAreaFastVec: (a + b + c + d + 2) >> 2, .5 rounds up
        s = arr.astype(np.uint16)
        return ((s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2] + 2) >> 2).astype(np.uint8)
    sums = arr.reshape(h // ky, ky, w // kx, kx, c).sum(axis=(1, 3), dtype=np.int32)
    return _round_to_uint8(sums.astype(np.float32) * (np.float32(1) / np.float32(kx * ky)))   # sum * (1.f / area)


def _round_to_uint8(x):
    """saturate_cast<uchar>(float): round half to even (cvRound), then clamp to [0, 255]."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def area_resize(arr, out_h, out_w):
    """uint8 (H, W, C) -> uint8 (out_h, out_w, C), identical to cv2.resize(arr, (out_w, out_h), cv2.INTER_AREA)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim == 2:
        return area_resize(arr[:, :, None], out_h, out_w)[:, :, 0]
    h, w, c = arr.shape
    if (out_h, out_w) == (h, w):
        return arr.copy()                                         # cv::resize copies equal sizes
    scale_x, scale_y = 1.0 / (out_w / w), 1.0 / (out_h / h)
    if scale_x >= 1 and scale_y >= 1:
        kx, ky = round(scale_x), round(scale_y)                  # saturate_cast<int>: half to even, like round()
        if abs(scale_x - kx) < _DBL_EPSILON and abs(scale_y - ky) < _DBL_EPSILON:
            return _resize_area_fast(arr, kx, ky)
        src = arr.reshape(h, w * c)                               # (H, W * C): channels interleaved, as in memory
        idx, wx = _area_taps(w, out_w, c)
        rows = np.take(src, idx[0], axis=1) * wx[0]               # (H, out_w * C) float32, along each source row
        for k in range(1, len(idx)):
            rows += np.take(src, idx[k], axis=1) * wx[k]
        idx, wy = _area_taps(h, out_h)
        out = np.take(rows, idx[0], axis=0) * wy[0][:, None]      # (out_h, out_w * C), then over the source rows
        for k in range(1, len(idx)):
            out += np.take(rows, idx[k], axis=0) * wy[k][:, None]
        return _round_to_uint8(out).reshape(out_h, out_w, c)
    # Enlarging (on either axis): INTER_LINEAR's integer kernels with the area weights.
    src = arr.reshape(h, w * c).astype(np.int32)
    idx, wx = _linear_area_taps(w, out_w, c)
    rows = src[:, idx[0]] * wx[0] + src[:, idx[1]] * wx[1]       # (H, out_w * C), in 2048ths
    idx, wy = _linear_area_taps(h, out_h)
    # VResizeLinear<uchar, int, short, FixedPtCast<.., 22>>: drop 4 bits, multiply, keep the high 16, round 2 bits.
    out = (((wy[0][:, None] * (rows[idx[0]] >> 4)) >> 16) + ((wy[1][:, None] * (rows[idx[1]] >> 4)) >> 16) + 2) >> 2
    return out.astype(np.uint8).reshape(out_h, out_w, c)


class EQVAECrop:
    """The official EQ-VAE training crop: random square of side U(0.5, 1) x short side, area-resized to size."""

    def __init__(self, size, min_crop_f=0.5, max_crop_f=1.0):
        self.size, self.min_crop_f, self.max_crop_f = int(size), min_crop_f, max_crop_f

    def __call__(self, pil_image):
        """RGB PIL image -> RGB PIL image (size, size)."""
        # Reference: zelaki/eqvae ldm/data/dataset.py DatasetTrain (LDM's super-resolution data code):
        # crop side = int(short side * np.random.uniform(0.5, 1)), albumentations 0.4.3 RandomCrop (top =
        # int((H - c) * random.random()), then left likewise) and SmallestMaxSize(256, cv2.INTER_AREA). We draw from the
        # same global RNGs (numpy for the scale, python for the position) and reproduce INTER_AREA exactly (area_resize;
        # PIL's BOX filter and torch's "area" mode round fractional pixel footprints differently).
        w, h = pil_image.size
        side = max(1, int(min(h, w) * np.random.uniform(self.min_crop_f, self.max_crop_f)))
        top = int((h - side) * random.random())
        left = int((w - side) * random.random())
        # PIL crops in C, so only the crop's pixels are copied into numpy, not the whole photo.
        crop = np.asarray(pil_image.crop((left, top, left + side, top + side)), dtype=np.uint8)
        if side != self.size:   # albumentations' SmallestMaxSize skips the resize when the scale is exactly 1
            crop = area_resize(crop, self.size, self.size)
        return Image.fromarray(crop)


def random_hflip(pil_image, p=0.5):
    """Horizontal flip with probability p, drawn from the torch RNG like torchvision's RandomHorizontalFlip."""
    if torch.rand(1).item() < p:
        return pil_image.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_image


class ImageTransform:
    """PIL image -> tensor (3, size, size) in [-1, 1] with one of the named training/eval pipelines."""
    kinds = ("center", "center_flip", "eqvae", "resize_center")

    def __init__(self, size, kind="center"):
        if kind not in self.kinds:
            raise ValueError(f"unknown transform {kind!r}; valid: {', '.join(self.kinds)}")
        self.size, self.kind = int(size), kind
        self.eqvae_crop = EQVAECrop(size)

    def __call__(self, pil_image):
        if self.kind == "eqvae":
            img = self.eqvae_crop(pil_image)            # EQ-VAE fine-tuning: no flip (official data code)
        elif self.kind == "resize_center":
            # Reconstruction metrics, in the order of the official EQ-VAE eval.py: ToTensor, then Resize(size) (short
            # side, bilinear, antialiased) on the float tensor, CenterCrop(size), Normalize(0.5, 0.5): not quantised.
            from torchvision.transforms import functional as TF
            x = TF.center_crop(TF.resize(TF.to_tensor(pil_image.convert("RGB")), self.size, antialias=True), self.size)
            return (x - 0.5) / 0.5
        else:
            img = center_crop_arr(pil_image, self.size)  # DiT/SiT/REPA: ADM crop (+ flip in DiT training)
            if self.kind == "center_flip":
                img = random_hflip(img)
        return pil_to_tensor(img)


#################################################################################
#                                   ImageFolder                                 #
#################################################################################

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")


def _is_dir(entry):
    """entry.is_dir() following symlinks; None (with a warning) for one that cannot be followed (ELOOP)."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError as e:
        warnings.warn(f"ImageFolder: skipping {entry.path} ({e.strerror or e})")
        return None


def _folder_key(path):
    st = os.stat(path)
    return st.st_ino, st.st_dev


def _scan_images(folder, outside=frozenset()):
    """Sorted paths of all image files under folder (recursive, follows symlinks, skips hidden entries). A folder
    reached twice through symlinks (a loop) is scanned once; an entry that cannot be followed is skipped, warned;
    a symlink into a folder in `outside` (the dataset root, another class) is not followed, warned, so no image is
    listed under the wrong label."""
    found, stack, seen = [], [folder], set()
    while stack:
        current = stack.pop()
        try:
            key = _folder_key(current)
        except OSError as e:
            warnings.warn(f"ImageFolder: skipping {current} ({e.strerror or e}: a broken or looping symlink?)")
            continue
        if key in outside:
            warnings.warn(f"ImageFolder: skipping {current}: it leads to the dataset root or another class folder "
                          f"(a symlink cycle), whose images belong to their own label")
            continue
        if key in seen:
            continue
        seen.add(key)
        with os.scandir(current) as it:
            for entry in it:
                if entry.name.startswith("."):   # .DS_Store, macOS "._x.jpg" resource forks, .git, ...
                    continue
                is_dir = _is_dir(entry)
                if is_dir is None:
                    continue
                if is_dir:
                    stack.append(entry.path)
                elif entry.name.lower().endswith(IMG_EXTENSIONS):
                    found.append(entry.path)
    return sorted(found)


def to_rgb8(img):
    """A decoded 8-bit RGB copy of any PIL image. 16-bit and 32-bit grayscale (modes I;16*, I: 16-bit PNGs, TIFFs)
    are scaled to 8 bits, value * 255 / 65535, where PIL's convert("RGB") would clip every value above 255 (almost
    all pixels of a 16-bit photo saturate); float images (mode F) are taken as [0, 1]. convert() forces the full
    decode, so a truncated file fails here."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            a = a * 255.0 if a.max() <= 1.0 else a
        elif img.mode.startswith("I;16") or a.max() > 255:  # PIL opens a 16-bit PNG as I;16 or I
            a = a * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.floor(a + 0.5), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha dropped below
    return img.convert("RGB")


class ImageFolder(torch.utils.data.Dataset):
    """Images under root, label = index of the top-level subfolder in sorted order (ImageNet layout)."""

    def __init__(self, root, transform=None, num_images=None):
        root = os.path.expanduser(str(root))
        if not os.path.exists(root):
            raise FileNotFoundError(f"ImageFolder: {root} does not exist")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"ImageFolder: {root} is not a folder of images")
        self.root, self.transform = root, transform
        # Scan without opening any image (file names only), so a million-image folder lists in seconds.
        with os.scandir(root) as it:
            top = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        subdirs = [e for e in top if _is_dir(e)]
        if subdirs:
            self.classes = [e.name for e in subdirs]
            self.samples = []
            empty = []
            keys = {_folder_key(root)} | {_folder_key(d.path) for d in subdirs}
            for label, d in enumerate(subdirs):
                paths = _scan_images(d.path, outside=keys - {_folder_key(d.path)})
                empty += [] if paths else [d.name]
                self.samples += [(p, label) for p in paths]
            loose = [e.name for e in top if _is_dir(e) is False and e.name.lower().endswith(IMG_EXTENSIONS)]
            if loose:
                warnings.warn(f"ImageFolder: ignoring {len(loose)} image(s) directly in {root} (e.g. {loose[0]}): "
                              f"with class subfolders present, only images inside them are used")
            if empty and self.samples:
                # Kept as classes so labels keep their meaning (ImageNet class index = sorted folder index).
                warnings.warn(f"ImageFolder: {len(empty)} class folder(s) without images: {', '.join(empty[:5])}")
        else:
            self.classes = [os.path.basename(os.path.normpath(root))]
            self.samples = [(p, 0) for p in _scan_images(root)]
        if not self.samples:
            raise FileNotFoundError(f"ImageFolder: no images found under {root} (accepted extensions, any case: "
                                    f"{' '.join(IMG_EXTENSIONS)})")
        if num_images is not None:
            if num_images > len(self.samples):
                warnings.warn(f"ImageFolder: asked for {num_images} images, {root} has {len(self.samples)}")
            self.samples = self.samples[:num_images]   # the first N in sorted order: reproducible subsets
        self.num_skipped = 0        # unreadable files met so far (in this process; each loader worker counts its own)
        self._bad = set()

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        """RGB PIL image of sample index (raises on an unreadable file)."""
        with open(self.samples[index][0], "rb") as f:
            return to_rgb8(Image.open(f))

    def __getitem__(self, index):
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for ImageFolder of {n} images")
        index %= n
        # A corrupt file must not stop a multi-day run: warn once per file and serve the next readable one.
        for i in range(index, index + n):
            i %= n
            if i in self._bad:
                continue
            try:
                img = self.load(i)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
                self._bad.add(i)
                self.num_skipped += 1
                warnings.warn(f"ImageFolder: skipping unreadable image {self.samples[i][0]} "
                              f"({type(e).__name__}: {e})")
                continue
            return (self.transform(img) if self.transform else img), self.samples[i][1]
        raise RuntimeError(f"ImageFolder: none of the {n} files under {self.root} could be read")


#################################################################################
#                             Built-in synthetic dataset                        #
#################################################################################
# Natural-looking scenes drawn on the fly so every stage runs without downloading anything. What makes scale and
# rotation equivariance meaningful on them: occluding shapes ("dead leaves") with log-uniform sizes (a 1/f size
# distribution, like natural images), edges and textures at all orientations, smooth lighting gradients and 1/f
# noise. The scene is defined in continuous coordinates [0, 1]^2 and rendered with analytic anti-aliasing (coverage
# from the signed distance to each edge, one pixel wide), so any resolution shows the same scene, and a random crop
# can be rendered directly (no resampling). Classes differ in palette (hue band), preferred shape and texture
# frequency, so a small classifier can tell them apart (used to judge generated samples offline).

SHAPES = ("ellipse", "rectangle", "polygon", "stripes")
_NOISE_CELLS = (2, 4, 8, 16, 32)   # value-noise octaves, lattice cells per image side


def _class_styles(num_classes):
    """Fixed per-class look (independent of the dataset seed): palette, preferred shape, texture frequency."""
    rng = np.random.default_rng([20250213, num_classes])
    styles = []
    for k in range(num_classes):
        hue = k / num_classes
        main = [colorsys.hsv_to_rgb((hue + rng.uniform(-0.03, 0.03)) % 1, rng.uniform(0.45, 0.95),
                                    rng.uniform(0.4, 0.95)) for _ in range(3)]
        dark = colorsys.hsv_to_rgb(hue, rng.uniform(0.3, 0.8), rng.uniform(0.12, 0.3))
        accent = colorsys.hsv_to_rgb((hue + 0.5) % 1, rng.uniform(0.4, 0.8), rng.uniform(0.6, 0.95))
        # Texture frequency 3..24 cycles per image, in an order unrelated to the hue so both cues carry information.
        rank = (k * 7) % num_classes / max(num_classes - 1, 1)
        styles.append(dict(palette=np.array(main + [dark, accent], dtype=np.float32),
                           shape=k % len(SHAPES), freq=3.0 * 8.0 ** rank))
    return styles


def _interp_matrix(coords, cells):
    """(len(coords), cells + 1) smooth interpolation weights of a lattice at 0, 1/cells, ..., 1."""
    pos = np.clip(coords * cells, 0, cells - 1e-6)
    i = np.floor(pos).astype(np.int64)
    t = pos - i
    t = t * t * (3 - 2 * t)   # smoothstep: no visible kinks at the lattice lines
    m = np.zeros((len(coords), cells + 1), dtype=np.float32)
    rows = np.arange(len(coords))
    m[rows, i] = 1 - t
    m[rows, i + 1] = t
    return m


class SyntheticImages(torch.utils.data.Dataset):
    """Procedural class-conditional images: item = (tensor (3, R, R) in [-1, 1], label = index % num_classes)."""
    # Each item is a pure function of (index, seed, resolution); the class looks are fixed (seed-independent),
    # so a classifier trained on one seed judges images of another. flip: DiT's random horizontal flip (torch
    # RNG); random_crop: the EQ-VAE crop, drawn from the global numpy / python RNGs like EQVAECrop.

    def __init__(self, num_images, resolution, num_classes=10, seed=0, flip=False, random_crop=False):
        if num_images < 1 or resolution < 1 or num_classes < 1:
            raise ValueError(f"SyntheticImages needs num_images, resolution, num_classes >= 1, got "
                             f"{num_images}, {resolution}, {num_classes}")
        self.num_images, self.resolution = int(num_images), int(resolution)
        self.num_classes, self.seed = int(num_classes), int(seed)
        self.flip, self.random_crop = flip, random_crop
        self.styles = _class_styles(self.num_classes)
        self.classes = [f"{k}_{SHAPES[s['shape']]}" for k, s in enumerate(self.styles)]
        self._interp_cache = {}

    def __len__(self):
        return self.num_images

    def label(self, index):
        """Class of item index: index % num_classes (balanced, and known without rendering)."""
        return index % self.num_classes

    def render(self, index, window=(0.0, 0.0, 1.0)):
        """Scene of item index as float32 (3, R, R) in [0, 1]; window = (x0, y0, side) of the scene to show."""
        R = self.resolution
        x0, y0, side = window
        px = side / R                                                       # one pixel in scene units
        u = (x0 + (np.arange(R) + 0.5) * px).astype(np.float32)             # pixel centres, columns
        v = (y0 + (np.arange(R) + 0.5) * px).astype(np.float32)             # pixel centres, rows
        # A private generator per (seed, index) (SeedSequence mixes both, so streams are independent) makes the
        # item deterministic whatever the order, worker or process. All numbers are drawn up front, whatever the
        # window shows, so crops and resolutions of one item show the same scene; batched draws keep it fast.
        rng = np.random.default_rng([self.seed, index])
        style = self.styles[self.label(index)]
        pal, npal = style["palette"], len(style["palette"])
        g = rng.random(8).tolist()                                          # global scene parameters
        lattices = [rng.standard_normal((c + 1, c + 1)).astype(np.float32) for c in _NOISE_CELLS]
        n = 8 + int(g[0] * 12)                                              # 8..19 shapes
        P = rng.random((n, 24))                                             # one row of uniforms per shape
        V = rng.random((n, 6)) * (2 * math.pi)                              # polygon vertex angles

        # Background: a smooth gradient between two class colours at a random orientation.
        k0 = int(g[1] * 3)
        c0 = pal[k0] * (0.6 + 0.5 * g[2])
        c1 = pal[(k0 + 1 + int(g[3] * 2)) % 3] * (0.6 + 0.5 * g[4])
        th = 2 * math.pi * g[5]
        t = ((u[None, :] - 0.5) * math.cos(th) + (v[:, None] - 0.5) * math.sin(th)) * 0.7 + 0.5  # (R, R)
        img = c0[:, None, None] + (c1 - c0)[:, None, None] * t[None]       # (3, R, R)

        # 1/f value noise: octaves of 2..32 cells per side, amplitude halving as the frequency doubles.
        full = tuple(window) == (0.0, 0.0, 1.0)
        octaves = [self._interp(v, c, full) @ (lat * (0.24 / c)) @ self._interp(u, c, full).T
                   for c, lat in zip(_NOISE_CELLS, lattices)]               # each (R, R)
        img *= 1 + sum(octaves)[None]
        detail = (octaves[-2] + octaves[-1]) * 8     # the fine octaves, reused as a texture inside shapes
        light = 2 * math.pi * g[6]

        # Occluding shapes, back to front, largest first; radius log-uniform in [0.02, 0.5] (density ~ 1/r).
        P = P[np.argsort(-P[:, 0])]
        for row, vert in zip(P.tolist(), V):
            r = 0.02 * 25.0 ** row[0]
            kind = style["shape"] if row[1] < 0.5 else int(row[2] * len(SHAPES))
            cx, cy = -0.1 + 1.2 * row[3], -0.1 + 1.2 * row[4]
            angle = 2 * math.pi * row[5]
            aspect = math.exp(1.4 * row[6] - 0.7)
            a, b = r * math.sqrt(aspect), r / math.sqrt(aspect)             # half-axes
            if row[7] < 0.15:   # clutter: a colour from another class or a neutral tone
                colour = np.array(colorsys.hsv_to_rgb(row[8], 0.6 * row[22], 0.2 + 0.7 * row[23]), np.float32)
            else:
                colour = pal[int(row[8] * npal)] * (0.85 + 0.3 * np.array(row[19:22], np.float32))
            colour2 = pal[int(row[9] * npal)]
            freq = style["freq"] * math.exp(0.6 * row[10] - 0.3)            # texture cycles per scene unit
            tex_angle, phase = math.pi * row[11], 2 * math.pi * row[12]
            contrast = 0.05 + 0.3 * row[13]
            use_grating = row[14] < 0.6
            shade = 0.35 * row[15]
            soft = 0.012 * row[17] if row[16] < 0.3 else 0.0                # some out-of-focus edges
            n_vert = 3 + int(row[18] * 4)

            # Bounding box in pixels; skip what the window does not see.
            ext = math.hypot(a, b) + soft + 2 * px
            i0, i1 = max(0, math.floor((cx - ext - x0) / px)), min(R, math.ceil((cx + ext - x0) / px))
            j0, j1 = max(0, math.floor((cy - ext - y0) / px)), min(R, math.ceil((cy + ext - y0) / px))
            if i0 >= i1 or j0 >= j1:
                continue
            X = u[None, i0:i1] - np.float32(cx)                             # (1, w)
            Y = v[j0:j1, None] - np.float32(cy)                             # (h, 1)
            ca, sa = math.cos(angle), math.sin(angle)
            qx, qy = X * ca + Y * sa, Y * ca - X * sa                       # (h, w) shape-local coordinates

            # Signed distance to the outline (scene units, negative inside).
            if kind == 1:      # rectangle
                d = np.maximum(np.abs(qx) - a, np.abs(qy) - b)
            elif kind == 2:    # convex polygon: vertices on the ellipse in angular order, d = max over edges
                phi = np.sort(vert[:n_vert])
                vx, vy = a * np.cos(phi), b * np.sin(phi)
                ex, ey = np.append(vx[1:], vx[0]) - vx, np.append(vy[1:], vy[0]) - vy
                norm = np.hypot(ex, ey) + 1e-12
                nx, ny = (ey / norm).astype(np.float32), (-ex / norm).astype(np.float32)  # outward (CCW order)
                off = (nx * vx + ny * vy).astype(np.float32)
                d = (qx[None] * nx[:, None, None] + qy[None] * ny[:, None, None] - off[:, None, None]).max(0)
            else:              # ellipse (and the stripes' outline): scaled circle distance, aspect <= 2
                d = (np.sqrt((qx / a) ** 2 + (qy / b) ** 2) - 1) * math.sqrt(a * b)
            alpha = np.minimum(np.maximum(0.5 - d * (1 / max(px, soft)), 0), 1)  # coverage, 1 px (or soft) wide

            # Fill: colour x lighting x texture; stripes are a two-colour square wave.
            lit = 1 + (X * (shade * math.cos(light) / ext) + Y * (shade * math.sin(light) / ext))
            if kind == 3 or use_grating:
                tx = X * np.float32(2 * math.pi * freq * math.cos(tex_angle)) + \
                    (Y * np.float32(2 * math.pi * freq * math.sin(tex_angle)) + np.float32(phase))
                wave = np.sin(tx)
            if kind == 3:
                # Anti-aliased square wave: distance to the zero crossing ~ wave / (2 pi f), in pixels.
                m = np.minimum(np.maximum(wave * (1 / (2 * math.pi * freq * px)) + 0.5, 0), 1)
                fill = (colour2[:, None, None] + (colour - colour2)[:, None, None] * m[None]) * lit[None]
            else:
                if use_grating:
                    # Fade gratings whose period nears 2 pixels instead of letting them alias.
                    period_px = 1.0 / (freq * px)
                    tex = wave * (contrast * min(max((period_px - 2.0) / 2.0, 0.0), 1.0))
                else:
                    tex = detail[j0:j1, i0:i1] * contrast
                fill = colour[:, None, None] * (lit * (1 + tex))[None]
            sl = img[:, j0:j1, i0:i1]
            sl += alpha[None] * (fill - sl)                                 # "over" compositing, in place
        return np.clip(img, 0, 1)

    def _interp(self, coords, cells, full_window):
        """Lattice interpolation matrix (R, cells + 1), cached for the full-image window (the common case)."""
        if not full_window:
            return _interp_matrix(coords, cells)
        if cells not in self._interp_cache:
            self._interp_cache[cells] = _interp_matrix(coords, cells)
        return self._interp_cache[cells]

    def __getitem__(self, index):
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for SyntheticImages of {self.num_images} images")
        index %= self.num_images
        window = (0.0, 0.0, 1.0)
        if self.random_crop:
            # EQ-VAE's crop (see EQVAECrop), drawn from the same global RNGs, rendered directly at full sharpness.
            side = np.random.uniform(0.5, 1.0)
            top = (1 - side) * random.random()     # rows first, as albumentations draws h_start then w_start
            left = (1 - side) * random.random()
            window = (left, top, side)
        img = self.render(index, window)
        # Quantise to uint8 levels like a decoded image file, so to_uint8 of an item recovers exact PNG values.
        x = torch.from_numpy(np.floor(img * 255 + 0.5)) / 127.5 - 1.0
        if self.flip and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        return x, self.label(index)


#################################################################################
#                                 build_dataset                                 #
#################################################################################

def build_dataset(data, resolution, transform="center", num_images=None, seed=0):
    """data = "synthetic", "synthetic:SEED" (another draw of the same classes: held-out images) or an image folder;
    transform in center | center_flip | eqvae | resize_center; items in [-1, 1]."""
    if transform not in ImageTransform.kinds:
        raise ValueError(f"unknown transform {transform!r}; valid: {', '.join(ImageTransform.kinds)}")
    if data.startswith("synthetic:") and not os.path.exists(data):
        try:
            data, seed = "synthetic", int(data.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--data {data}: 'synthetic:SEED' takes a whole number, e.g. synthetic:3") from None
    if data == "synthetic":
        # The scene is continuous: "center" renders it whole, "center_flip" adds DiT's random flip, and "eqvae"
        # renders the EQ-VAE random crop window directly (same crop distribution; no resampling needed).
        return SyntheticImages(num_images or 10000, resolution, seed=seed, flip=transform == "center_flip",
                               random_crop=transform == "eqvae")
    return ImageFolder(data, transform=ImageTransform(resolution, transform), num_images=num_images)


#################################################################################
#                            Latent and Token Caches                            #
#################################################################################
# The autoencoder is frozen in stage 2, so its output for an image never changes, and encoding every image each step
# costs more than a DiT-B step (fast-DiT's precomputed latents nearly doubled its training speed). So each
# stage 2 script encodes its dataset once, image and horizontal mirror, and trains from the cache:
# - latents (DiT, SiT, REPA): the posterior mean and std of both; each read then draws a fresh flip and a fresh
#   z = mean + std * eps, so training on the cache sees the same distribution as encoding on the fly (REPA trains this
#   way too);
# - tokens (MaskGIT): the VQ-GAN's code indices of both; each read picks one at random (DiT's random flip). The
#   MaskGIT reference tokenises inside its loop and draws Resize(256) + RandomCrop(256) each epoch; a cache holds one
#   crop per image, the ADM center crop (on ImageNet a mild difference: the short side is already resized to 256).
#
# Layout of a cache folder (format 1):
#   meta.json              autoencoder fingerprint, resolution, dataset size, entry shape, shard size, storage dtype
#   labels_00000.npy       (n,) int64 class labels of images [k * shard_size, (k + 1) * shard_size)
#   shard_00000.npy        (n, 2, ...) entries of [no flip, flip]: latents (n, 2, 2C, h, w) float16 holding
#                          [mean (C) | std (C)]; tokens (n, 2, h, w) uint16 (int32 beyond 65,536 codes)
# Latents are stored in float16 (meta "dtype"): half the bytes (ImageNet at 256 px with SD-VAE: 32 KiB per image and
# mirror, 39 GiB instead of 78), and its rounding (relative 2^-11, about 5e-3 on a mean of 10) is far below the
# noise of the first diffusion step. Caches made before meta recorded a dtype hold float32 and are read, and completed,
# as such; readers take the dtype from each shard's header.
# Shards are written to a temporary name and renamed (shard last, so a shard file marks a finished shard); rank r
# writes shards k with k % world_size == r, so no two ranks touch the same file, and a rerun skips finished shards.
# Images are decoded by DataLoader workers (num_workers) while the main process encodes.

LATENT_CACHE_FORMAT = 1
TOKEN_CACHE_FORMAT = 1


def vae_fingerprint(vae):
    """sha256 (first 16 hex digits) of the autoencoder's weights: names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def dataset_fingerprint(dataset):
    """sha256 (first 16 hex digits) of which images a dataset holds, in order, with their labels: the relative file
    paths of an ImageFolder (its scan, no file is opened), the parameters of the synthetic set; and the transform.
    Not the root or the contents: a copy of the dataset elsewhere (a node-local disk) reuses the cache, and an
    edited copy under the same names is not told apart."""
    h = hashlib.sha256()
    if isinstance(dataset, SyntheticImages):
        h.update(f"synthetic:{dataset.num_images}:{dataset.resolution}:{dataset.num_classes}:{dataset.seed}".encode())
    else:
        for path, label in dataset.samples:
            h.update(f"{os.path.relpath(path, dataset.root)}\t{label}\n".encode())
        t = dataset.transform
        h.update(f"{getattr(t, 'kind', type(t).__name__)}:{getattr(t, 'size', '')}".encode())
    return h.hexdigest()[:16]


def _tmp_name(path):
    # host and process: unique even when nodes share the folder (a process id repeats across machines)
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def _atomic_save_npy(path, array):
    """np.save to a temporary file in the same folder, then rename: readers never see half a file."""
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _atomic_write_json(path, obj):
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _cache_barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _check_cache_meta(cache_dir, found, expected, checked, what):
    """A cache built with another autoencoder, resolution or dataset is an error that names what differs."""
    diff = [f"{k}: cache {found.get(k)!r} vs now {expected[k]!r}" for k in checked if found.get(k) != expected[k]]
    if diff:
        # The fields that are only recorded (the autoencoder's path, say) help to tell which run built the cache.
        diff += [f"({k}: cache {found.get(k)!r} vs now {v!r}, not checked)" for k, v in expected.items()
                 if k not in checked and found.get(k) != v]
        raise ValueError(f"{what} {cache_dir} was built with different settings:\n  " + "\n  ".join(diff)
                         + "\nUse another cache folder, or delete this one to rebuild it.")


@torch.no_grad()
def build_encoded_cache(encode_pair, dataset, cache_dir, meta, checked, rank=0, world_size=1, batch_size=32,
                        dtype=np.float16, device="cpu", log=print, what="cache", num_workers=0, legacy_dtype=None):
    """
    Encode `dataset` (items (image (3, R, R) in [-1, 1], label), deterministic: no random flip) into cache_dir, this
    rank's unfinished shards only: encode_pair(x (B, 3, R, R) on device) -> (B, 2, ...) entries of [image, mirror],
    stored as dtype (meta["dtype"]). meta (holding num_images and shard_size) is written to meta.json; an existing one
    must agree on the keys in `checked`, and a cache begun before meta recorded a dtype is completed in legacy_dtype.
    num_workers DataLoader workers load the images. Every rank must call it (it synchronises). Returns meta.
    """
    device, n, shard_size = torch.device(device), len(dataset), int(meta["shard_size"])
    meta_path = os.path.join(cache_dir, "meta.json")
    found = None
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            found = json.load(f)
        _check_cache_meta(cache_dir, found, meta, checked, what)
    # A partial cache is completed in the dtype its finished shards have.
    dtype = np.dtype(dtype if found is None else found.get("dtype", legacy_dtype if legacy_dtype else dtype))
    meta = {**meta, "dtype": dtype.name}
    _cache_barrier()  # everyone has read (and checked) the old meta before rank 0 may write it
    os.makedirs(cache_dir, exist_ok=True)
    if rank == 0 and found is None:
        _atomic_write_json(meta_path, meta)
    _cache_barrier()

    num_shards = -(-n // shard_size)
    shard_path = lambda k: os.path.join(cache_dir, f"shard_{k:05d}.npy")
    mine = [k for k in range(num_shards) if k % world_size == rank]
    todo = [k for k in mine if not os.path.exists(shard_path(k))]
    if rank == 0:
        log(f"{what.capitalize()} {cache_dir}: {num_shards} shard(s) of {shard_size} images, "
            f"{len(mine) - len(todo)} of rank 0's {len(mine)} already done")

    def encode_shards(todo):
        # One loader over the given unfinished shards, in order, its batches never crossing a shard's end.
        batches = {k: [list(range(i, min(i + batch_size, (k + 1) * shard_size, n)))
                       for i in range(k * shard_size, min((k + 1) * shard_size, n), batch_size)] for k in todo}
        batch_iter = iter(torch.utils.data.DataLoader(dataset, batch_sampler=[b for k in todo for b in batches[k]],
                                                      num_workers=num_workers if todo else 0,
                                                      pin_memory=device.type == "cuda"))
        for done, k in enumerate(todo):
            entries, labels = [], []
            for _ in batches[k]:
                x, y = next(batch_iter)                                               # (B, 3, R, R), (B,)
                labels += [int(lab) for lab in y]
                entry = encode_pair(x.to(device, non_blocking=True)).cpu().numpy()    # (B, 2, ...)
                entries.append(entry.astype(dtype))
                if dtype.kind == "f" and not np.isfinite(entries[-1]).all():
                    raise ValueError(f"{what}: an encoding in shard {k} does not fit {dtype.name} (largest magnitude "
                                     f"{np.abs(entry).max():.3g})")
            _atomic_save_npy(os.path.join(cache_dir, f"labels_{k:05d}.npy"), np.asarray(labels, dtype=np.int64))
            _atomic_save_npy(shard_path(k), np.concatenate(entries))
            if rank == 0:
                log(f"  {what}: shard {k + 1}/{num_shards} written (rank 0: {done + 1}/{len(todo)})")
        del batch_iter   # stops the workers

    encode_shards(todo)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return meta  # one process (or ranks run one after the other by hand): nothing else is building shards
    _cache_barrier()
    # Every rank reads every shard. On a folder all nodes share, they are all here now. On a node's local disk
    # (--cache-latents /local/...) a node sees only its own ranks' shards, and meta.json only on rank 0's node:
    # each node then completes its own copy, the shards missing here split over this node's processes (torchrun's
    # LOCAL_RANK of LOCAL_WORLD_SIZE). Collective: every rank takes part, with nothing to do on a shared folder.
    local_rank, local_world = node_local_rank(rank, world_size)
    missing = [k for k in range(num_shards) if not os.path.exists(shard_path(k))]
    if missing and local_rank == 0:
        log(f"{what.capitalize()} {cache_dir}: {len(missing)} of {num_shards} shard(s) built on other nodes are "
            f"not visible here (a node-local folder): this node's {local_world} process(es) build them too")
    if local_rank == 0 and not os.path.exists(meta_path):
        _atomic_write_json(meta_path, meta)
    encode_shards([k for i, k in enumerate(missing) if i % local_world == local_rank])
    _cache_barrier()
    still = [k for k in range(num_shards) if not os.path.exists(shard_path(k))]
    if still or not os.path.exists(meta_path):
        raise FileNotFoundError(f"{what} {cache_dir}: after every rank finished, rank {rank} (local rank "
                                f"{local_rank} of {local_world}) still misses {len(still)} of {num_shards} shard(s) "
                                f"(first: {still[:3]}){'' if os.path.exists(meta_path) else ' and meta.json'}: the "
                                f"processes of one node must share one folder (LOCAL_RANK / LOCAL_WORLD_SIZE as "
                                f"torchrun sets them), on a shared filesystem or a disk of that node")
    return meta


def node_local_rank(rank=0, world_size=1):
    """(this process's rank on its node, processes on its node): torchrun's LOCAL_RANK and LOCAL_WORLD_SIZE, or a
    single node when they are not set."""
    if "LOCAL_RANK" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    return rank, world_size


@torch.no_grad()
def build_latent_cache(vae, dataset, cache_dir, resolution, vae_name="", data_name="", rank=0, world_size=1,
                       batch_size=32, shard_size=1000, device="cpu", log=print, num_workers=0):
    """The KL autoencoder's posterior (mean | std) of every image and its mirror (build_encoded_cache). Returns meta."""
    probe = vae.encode(dataset[0][0][None].to(device)).mean  # (1, C, h, w): the latent shape for this resolution
    meta = {"format": LATENT_CACHE_FORMAT, "vae": str(vae_name), "vae_sha256": vae_fingerprint(vae),
            "resolution": int(resolution), "latent_norm": vae.latent_norm(), "num_images": len(dataset),
            "latent_shape": list(probe.shape[1:]), "shard_size": int(shard_size), "data": str(data_name),
            "data_sha256": dataset_fingerprint(dataset)}

    def encode_pair(x):  # (B, 3, R, R) -> (B, 2, 2C, h, w)
        posteriors = [vae.encode(xi) for xi in (x, x.flip(-1))]  # DiT's random flip, both ways
        return torch.stack([torch.cat([p.mean, p.std], dim=1) for p in posteriors], dim=1).float()

    # The normalisation is applied when a cached latent is read; it is checked all the same, so a generator is
    # never trained on latents normalised otherwise than the autoencoder it will decode with.
    checked = ["format", "vae_sha256", "resolution", "latent_norm", "num_images", "latent_shape", "shard_size",
               "data_sha256"]
    # float16 (see the layout notes above); caches made before meta recorded a dtype are float32.
    return build_encoded_cache(encode_pair, dataset, cache_dir, meta, checked, rank, world_size, batch_size,
                               np.float16, device, log, what="latent cache", num_workers=num_workers,
                               legacy_dtype=np.float32)


@torch.no_grad()
def build_token_cache(vq, dataset, cache_dir, resolution, vqgan_name="", data_name="", rank=0, world_size=1,
                      batch_size=64, shard_size=1000, device="cpu", log=print, num_workers=0):
    """The VQ-GAN's code indices of every image and its mirror (build_encoded_cache). Returns meta."""
    grid = list(vq.encode_indices(dataset[0][0][None].to(device)).shape[1:])  # (h, w) for this resolution
    codebook_size = int(vq.quantize.embedding.weight.shape[0])
    meta = {"format": TOKEN_CACHE_FORMAT, "vqgan": str(vqgan_name), "vqgan_sha256": vae_fingerprint(vq),
            "resolution": int(resolution), "data": str(data_name), "num_images": len(dataset), "grid": grid,
            "codebook_size": codebook_size, "shard_size": int(shard_size),
            "num_classes": len(getattr(dataset, "classes", [])) or None, "data_sha256": dataset_fingerprint(dataset)}

    def encode_pair(x):  # (B, 3, R, R) -> (B, 2, h, w), fp32 tokeniser
        return torch.stack([vq.encode_indices(xi) for xi in (x, x.flip(-1))], dim=1)

    checked = ["format", "vqgan_sha256", "resolution", "data", "num_images", "grid", "codebook_size", "shard_size",
               "data_sha256"]
    dtype = np.uint16 if codebook_size <= 2 ** 16 else np.int32
    return build_encoded_cache(encode_pair, dataset, cache_dir, meta, checked, rank, world_size, batch_size,
                               dtype, device, log, what="token cache", num_workers=num_workers, legacy_dtype=dtype)


class EncodedCache(torch.utils.data.Dataset):
    """A finished cache's shards, read entry by entry at file offsets; subclasses turn an image's [image, mirror]
    entry into an item."""
    what = "cache"
    format = None     # the cache format a subclass reads (meta["format"])
    # Shard files held open per process, least recently used closed first. A memory map per shard would hold a file
    # descriptor each (Python's mmap keeps a dup of it): ImageNet's 1,282 shards then exceed the usual limit of 1,024
    # descriptors ("Too many open files"). Shuffled reads rarely hit the same shard twice in a row, so most reads are
    # open + pread + close, a few microseconds from the page cache; the few held open serve in-order reads.
    max_open = 32

    def __init__(self, cache_dir, flip=True):
        meta_path = os.path.join(cache_dir, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{cache_dir} is not a {self.what} (no meta.json)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.format is not None and self.meta.get("format") != self.format:
            raise ValueError(f"{self.what} {cache_dir} has format {self.meta.get('format')!r}; this code reads format "
                             f"{self.format}. Rebuild it in another folder (or delete this one).")
        self.cache_dir, self.flip = cache_dir, flip
        self.shard_size = self.meta["shard_size"]
        num_shards = -(-self.meta["num_images"] // self.shard_size)
        missing = [k for k in range(num_shards) if not os.path.exists(self._path("shard", k))]
        if missing:
            raise FileNotFoundError(f"{self.what} {cache_dir} is incomplete: {len(missing)} of {num_shards} shards "
                                    f"missing (first: {missing[:3]}); rerun the same command to finish it")
        self.labels = np.concatenate([np.load(self._path("labels", k)) for k in range(num_shards)])
        self._layout = {}                        # shard -> (entry shape, dtype, offset of entry 0), read once
        self._files = collections.OrderedDict()  # shard -> open file descriptor, least recently used first

    def _path(self, kind, k):
        return os.path.join(self.cache_dir, f"{kind}_{k:05d}.npy")

    def __len__(self):
        return len(self.labels)

    def __getstate__(self):
        # Descriptors mean nothing in another process (DataLoader workers started by spawn): each opens its own.
        return dict(self.__dict__, _files=collections.OrderedDict())

    def close(self):
        """Close the shard files this process holds open (reads reopen them)."""
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except Exception:   # interpreter shutdown: os may be gone already
            pass

    def _shard_layout(self, k):
        """(entry shape, dtype, byte offset of entry 0) of shard k, from its .npy header (NumPy's format.py)."""
        if k not in self._layout:
            path = self._path("shard", k)
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"{path}: .npy format version {version} is not one np.save writes here")
                shape, fortran_order, dtype = read_header(f)
                if fortran_order or len(shape) < 2 or shape[1] != 2:
                    raise ValueError(f"{path}: expected a C-order (n, 2, ...) array, found shape {shape}")
                self._layout[k] = (tuple(shape[2:]), dtype, f.tell())
        return self._layout[k]

    def _fd(self, k):
        fd = self._files.pop(k, None)
        if fd is None:
            while len(self._files) >= self.max_open:
                os.close(self._files.popitem(last=False)[1])
            fd = os.open(self._path("shard", k), os.O_RDONLY)
        self._files[k] = fd   # now the most recently used
        return fd

    def _entry(self, index, side):
        """Item `index`'s stored entry for side 0 (image) or 1 (mirror), in the dtype it was stored in."""
        k, j = divmod(index, self.shard_size)
        shape, dtype, offset = self._shard_layout(k)
        size = dtype.itemsize * math.prod(shape)
        data = os.pread(self._fd(k), size, offset + (2 * j + side) * size)   # entries are rows of a C-order array
        if len(data) != size:
            raise OSError(f"{self._path('shard', k)} is truncated: entry {j} side {side} is past its end")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()   # a writable copy (torch.from_numpy)

    def _random_side(self):
        """DiT's random flip (p = 0.5) from the global torch RNG, which ResumableLoader seeds per sample and epoch."""
        return int(torch.rand(()) < 0.5) if self.flip else 0


class LatentCache(EncodedCache):
    """
    A finished latent cache as a dataset: item = (unscaled latent (C, h, w), label). mode "sample" draws a random
    flip (if flip) and z = mean + std * eps, a fresh posterior sample at every read; mode "mean" returns the posterior
    mean of the unflipped image.
    """
    what, format = "latent cache", LATENT_CACHE_FORMAT

    def __init__(self, cache_dir, mode="sample", flip=True):
        if mode not in ("sample", "mean"):
            raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
        super().__init__(cache_dir, flip)
        self.mode = mode

    def __getitem__(self, index):
        side = 0 if self.mode == "mean" else self._random_side()
        mean, std = torch.from_numpy(self._entry(index, side)).float().chunk(2, dim=0)  # (C, h, w) each, fp32
        if self.mode == "mean":
            return mean, int(self.labels[index])
        return mean + std * torch.randn_like(mean), int(self.labels[index])


class TokenCache(EncodedCache):
    """A finished token cache as a dataset: item = (tokens (h, w) long, label), the mirror's on a random flip."""
    what, format = "token cache", TOKEN_CACHE_FORMAT

    def __getitem__(self, index):
        tokens = torch.from_numpy(self._entry(index, self._random_side()).astype(np.int64))  # (h, w)
        return tokens, int(self.labels[index])


class LatentsWithImages(torch.utils.data.Dataset):
    """Cached latents beside the images they were encoded from (same index, both unflipped): REPA's encoder needs
    the pixels. Item: (latent (C, h, w), label, image (3, R, R) in [-1, 1])."""

    def __init__(self, latents, images):
        if len(latents) != len(images):
            raise ValueError(f"latent cache holds {len(latents)} items but the dataset {len(images)} images")
        self.latents, self.images = latents, images

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, index):
        z, y = self.latents[index]
        return z, y, self.images[index][0]


def latent_training_set(args, vae, vae_name, rank=0, world_size=1, device="cpu", log=print, flip=True,
                        with_images=False):
    """
    The training set of a latent generative model (DiT, SiT, REPA) from its command-line options: with
    --cache-latents the latent cache (built or completed first, every rank its own shards; items (z, label) with a
    fresh posterior sample per read), else the images (items (image, label), encoded by the training loop).
    flip: DiT's random horizontal flip; with_images: REPA's items (z, label, image), the image for DINOv2.
    """
    if not args.cache_latents:
        return build_dataset(args.data, args.image_size, "center_flip" if flip else "center", args.num_images)
    images = build_dataset(args.data, args.image_size, "center", num_images=args.num_images)
    build_latent_cache(vae, images, args.cache_latents, args.image_size, vae_name=vae_name, data_name=args.data,
                       rank=rank, world_size=world_size, batch_size=args.cache_batch_size,
                       shard_size=args.cache_shard_size, device=device, log=log,
                       num_workers=getattr(args, "num_workers", 0))
    latents = LatentCache(args.cache_latents, flip=flip)
    return LatentsWithImages(latents, images) if with_images else latents
