"""data.py: synthetic scenes, ImageFolder, ADM / EQ-VAE crops, uint8 conversion, grids, encoded caches. Expected
values come from hand computation, closed forms or independent code (torchvision, explicit loops), never from data.py
itself."""
import json
import os
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data


#################################################################################
#                              Synthetic dataset                                #
#################################################################################

def test_synthetic_deterministic_per_index_and_seed():
    a, b = data.SyntheticImages(20, 32, seed=0), data.SyntheticImages(20, 32, seed=0)
    x3, y3 = a[3]
    assert torch.equal(x3, a[3][0]) and torch.equal(x3, b[3][0])          # same (index, seed) -> same image
    assert y3 == 3 and a[13][1] == 3 and len(a) == 20                      # label = index % 10
    assert not torch.equal(x3, a[4][0])
    assert not torch.equal(x3, data.SyntheticImages(20, 32, seed=1)[3][0])  # other seed -> other scene
    assert torch.equal(a[-1][0], a[19][0])
    with pytest.raises(IndexError):
        a[20]


@pytest.mark.parametrize("res", [8, 17, 50, 64])
def test_synthetic_any_resolution_range_and_uint8_levels(res):
    x, y = data.SyntheticImages(4, res, seed=2)[1]
    assert x.shape == (3, res, res) and x.dtype == torch.float32 and isinstance(y, int)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05
    k = (x.double() + 1) * 127.5                                          # items sit on uint8 levels k/127.5 - 1
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert torch.equal(data.to_uint8(x).long(), k.round().long())        # so to_uint8 recovers them exactly


def _colour_features(ds, n):
    feats, labels = [], []
    for i in range(n):
        x, y = ds[i]
        feats.append(torch.cat([x.mean((1, 2)), x.std((1, 2))]).numpy())
        labels.append(y)
    return np.array(feats), np.array(labels)


def test_synthetic_classes_are_distinguishable():
    Xtr, Ytr = _colour_features(data.SyntheticImages(200, 24, seed=0), 200)
    Xte, Yte = _colour_features(data.SyntheticImages(200, 24, seed=1), 200)
    # Per-class mean colour differs: one-way ANOVA F statistic per channel (F ~ 1 if classes were the same;
    # the 1% critical value for (9, 190) degrees of freedom is about 2.5).
    for c in range(3):
        m, grand = Xtr[:, c], Xtr[:, c].mean()
        between = sum((Ytr == k).sum() * (m[Ytr == k].mean() - grand) ** 2 for k in range(10)) / 9
        within = sum(((m[Ytr == k] - m[Ytr == k].mean()) ** 2).sum() for k in range(10)) / (len(m) - 10)
        assert between / within > 10
    # A nearest-centroid classifier on mean/std colour, fit on seed 0 and tested on seed 1, beats chance (0.1).
    mu, sd = Xtr.mean(0), Xtr.std(0)
    centroids = np.stack([((Xtr[Ytr == k] - mu) / sd).mean(0) for k in range(10)])
    pred = np.argmin(((((Xte - mu) / sd)[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (pred == Yte).mean() > 0.4


def _orientation_histogram(images, bins=12):
    """Counts of strong-gradient pixels per orientation (mod pi), Sobel gradients (nearly isotropic)."""
    hist = np.zeros(bins)
    for g in images:
        sm_y = g[:-2] + 2 * g[1:-1] + g[2:]                       # smooth along y, then difference along x
        gx = sm_y[:, 2:] - sm_y[:, :-2]
        sm_x = g[:, :-2] + 2 * g[:, 1:-1] + g[:, 2:]
        gy = sm_x[2:] - sm_x[:-2]
        mag, ang = np.hypot(gx, gy), np.mod(np.arctan2(gy, gx), np.pi)
        strong = mag > 0.2 * mag.max()
        hist += np.histogram(ang[strong], bins=bins, range=(0, np.pi))[0]
    return hist / hist.sum() * bins                              # 1.0 = uniform share


def test_synthetic_edges_at_all_orientations():
    ds = data.SyntheticImages(100, 48, seed=0)
    h = _orientation_histogram([ds[i][0].mean(0).numpy() for i in range(100)])
    assert h.min() > 0.6 and h.max() < 1.5, h
    # The statistic can fail: axis-aligned boxes pile up at 0 and 90 degrees.
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(20):
        g = np.zeros((48, 48))
        for _ in range(5):
            x0, y0 = rng.integers(0, 40, 2)
            g[y0:y0 + rng.integers(4, 20), x0:x0 + rng.integers(4, 20)] = rng.random()
        boxes.append(g)
    hb = _orientation_histogram(boxes)
    assert hb.max() > 3


def test_synthetic_scene_is_resolution_independent_and_windows_render_exactly():
    hi, lo = data.SyntheticImages(4, 96), data.SyntheticImages(4, 24)
    for i in range(4):
        a = hi.render(i).reshape(3, 24, 4, 24, 4).mean((2, 4))   # 4x4 box average of the 96 px render
        assert np.abs(a - lo.render(i)).mean() < 0.05             # same scene (fine gratings fade at 24 px)
    # A window (x0, y0, side) with aligned pixel centres equals the matching block of a bigger render.
    small, big = data.SyntheticImages(4, 16), data.SyntheticImages(4, 32)
    assert np.allclose(small.render(2, (0.25, 0.5, 0.5)), big.render(2)[:, 16:32, 8:24], atol=1e-5)


def test_synthetic_flip_and_eqvae_crop_via_build_dataset():
    plain = data.build_dataset("synthetic", 16, "center", num_images=7)
    assert isinstance(plain, data.SyntheticImages) and len(plain) == 7
    flip = data.build_dataset("synthetic", 16, "center_flip", num_images=7)
    x = plain[5][0]
    seen = set()
    for s in range(8):
        torch.manual_seed(s)
        y = flip[5][0]
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
        seen.add(torch.equal(y, x))
    assert seen == {True, False}
    crop = data.build_dataset("synthetic", 16, "eqvae", num_images=7)
    outs = []
    for s in range(3):
        random.seed(s), np.random.seed(s)
        outs.append(crop[5][0])
    assert outs[0].shape == (3, 16, 16) and not torch.equal(outs[0], outs[1])
    random.seed(1), np.random.seed(1)
    assert torch.equal(crop[5][0], outs[1])                        # the crop follows the global RNGs


#################################################################################
#                                  ImageFolder                                  #
#################################################################################

def _write(path, size=(20, 12), colour=(10, 200, 30), mode="RGB", fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.new("RGB", size, colour)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _write(str(root / "b_dogs" / "x.png"))
    _write(str(root / "a_cats" / "sub" / "deep" / "y.JPG"), fmt="JPEG")
    _write(str(root / "a_cats" / "z.jpeg"), mode="L")                 # greyscale -> RGB
    _write(str(root / "c_owls" / "w.bmp"), mode="P")
    _write(str(root / "c_owls" / "v.WebP"), mode="RGBA")
    (root / "c_owls" / "notes.txt").write_text("not an image")
    _write(str(root / "a_cats" / ".hidden.png"))                      # hidden files are skipped
    (root / "b_dogs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return root


def test_imagefolder_scan_labels_and_rgb(folder):
    ds = data.ImageFolder(folder)
    assert ds.classes == ["a_cats", "b_dogs", "c_owls"]
    rel = [(os.path.relpath(p, folder), y) for p, y in ds.samples]
    assert rel == [("a_cats/sub/deep/y.JPG", 0), ("a_cats/z.jpeg", 0), ("b_dogs/bad.png", 1),
                   ("b_dogs/x.png", 1), ("c_owls/v.WebP", 2), ("c_owls/w.bmp", 2)]
    img, y = ds[1]
    assert img.mode == "RGB" and img.size == (20, 12) and y == 0
    assert ds[5][0].mode == "RGB" and ds[4][0].mode == "RGB"
    assert ds.num_skipped == 0


def test_imagefolder_corrupt_file_is_skipped_with_warning(folder):
    ds = data.ImageFolder(folder)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        img, y = ds[2]                                               # bad.png -> the next file, x.png
        assert y == 1 and np.asarray(img)[0, 0].tolist() == [10, 200, 30]
        assert ds.num_skipped == 1
        assert any("bad.png" in str(m.message) for m in w)
        n = len(w)
        ds[2], ds[3]
        assert len(w) == n and ds.num_skipped == 1                   # warned once per file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = [ds[i] for i in range(len(ds))]                      # a full pass never raises
    assert len(items) == 6


def test_imagefolder_flat_folder_subset_and_transform(tmp_path):
    for i in range(5):
        _write(str(tmp_path / f"im{i}.png"), size=(40, 30), colour=(i * 50, 0, 255))
    ds = data.ImageFolder(tmp_path, num_images=3)
    assert ds.classes == [tmp_path.name] and len(ds) == 3
    assert [os.path.basename(p) for p, _ in ds.samples] == ["im0.png", "im1.png", "im2.png"]
    assert {y for _, y in ds.samples} == {0}
    ds = data.build_dataset(str(tmp_path), 16, "center")
    x, y = ds[1]
    assert x.shape == (3, 16, 16) and y == 0
    # (50, 0, 255) / 127.5 - 1 on a uniform image
    assert torch.allclose(x[:, 8, 8], torch.tensor([50 / 127.5 - 1, -1.0, 1.0]), atol=1e-6)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolder(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as e:
        data.ImageFolder(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value) and ".jpg" in str(e.value) and ".png" in str(e.value)
    with pytest.raises(ValueError, match="center_flip"):
        data.build_dataset(str(tmp_path), 16, "random")


#################################################################################
#                                     Crops                                     #
#################################################################################

def test_center_crop_arr_hand_checked():
    # 96 x 32 (W x H), size 32: no halving (32 < 64), scale 1, left = (96 - 32) // 2 = 32 -> the middle third.
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, 32:64] = (200, 100, 50)
    out = np.asarray(data.center_crop_arr(Image.fromarray(arr), 32))
    assert out.shape == (32, 32, 3) and (out == (200, 100, 50)).all()
    # Odd leftover: 35 x 32 -> left = 1, so output columns 0 and 31 are input columns 1 and 32.
    arr = np.zeros((32, 35, 3), np.uint8)
    arr[:, 1], arr[:, 32] = 255, 128
    out = np.asarray(data.center_crop_arr(Image.fromarray(arr), 32))
    assert (out[:, 0] == 255).all() and (out[:, 31] == 128).all() and (out[:, 1:31] == 0).all()
    out = np.asarray(data.center_crop_arr(Image.fromarray(arr.transpose(1, 0, 2).copy()), 32))  # 32 x 35: top = 1
    assert (out[0] == 255).all() and (out[31] == 128).all() and (out[1:31] == 0).all()
    # 256 px one-pixel checkerboard, size 64: two exact 2x BOX halvings average it to mid-grey, then scale 1.
    chk = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    out = np.asarray(data.center_crop_arr(Image.fromarray(np.stack([chk] * 3, -1)), 64)).astype(int)
    assert out.shape == (64, 64, 3) and np.abs(out - 127.5).max() <= 1
    # Sizes: halving stops once the short side < 2 * size; upscaling small images works too.
    for w, h, s in [(130, 130, 64), (500, 333, 64), (50, 1000, 32), (10, 7, 16)]:
        assert data.center_crop_arr(Image.new("RGB", (w, h)), s).size == (s, s)


def test_area_resize_hand_checked():
    row = np.array([[0, 100, 200]], np.uint8)[..., None]                         # (1, 3, 1)
    # 3 -> 2: output pixels average [0, 1.5] and [1.5, 3]: (0 + 50) / 1.5 = 33.3, (50 + 200) / 1.5 = 166.7
    assert data.area_resize(row, 1, 2)[0, :, 0].tolist() == [33, 167]
    # 3 -> 4 (enlarging: OpenCV's fixed-point linear kernel with area weights): output 1 is source 0 and 1 with
    # weights rint(2048 / 3) = 683 and 1365: row = 100 * 1365 = 136500; ((2048 * (136500 >> 4)) >> 16 + 2) >> 2 = 67
    assert data.area_resize(row, 1, 4)[0, :, 0].tolist() == [0, 67, 133, 200]
    # OpenCV's three roundings of a tie. Factor 2 (integer path): (sum + 2) >> 2, .5 rounds up: 2 / 4 -> 1, 10 / 4 -> 3.
    blk = np.array([[0, 0, 0, 2], [1, 1, 4, 4]], np.uint8)[..., None]
    assert data.area_resize(blk, 1, 2)[0, :, 0].tolist() == [1, 3]
    # Factor 4 (integer path): sum * (1.f / 16), half to even: 8 / 16 = 0.5 -> 0, 24 / 16 = 1.5 -> 2, 2.5 -> 2.
    blk = np.zeros((4, 12, 1), np.uint8)
    blk[0, 0], blk[0, 4], blk[0, 8] = 8, 24, 40
    assert data.area_resize(blk, 1, 3)[0, :, 0].tolist() == [0, 2, 2]
    # 12 -> 9 (float path, cells of 4/3 px: weights 0.75 and 0.25, exact in float32): 2 * 0.75 = 1.5 -> 2,
    # 6 * 0.75 = 4.5 -> 4, 10 * 0.75 = 7.5 -> 8 (half to even; an exact mean rounded half up gives 5 for the 4.5).
    row = np.zeros((1, 12, 1), np.uint8)
    row[0, [0, 4, 8], 0] = [2, 6, 10]
    assert data.area_resize(row, 1, 9)[0, :, 0].tolist() == [2, 0, 0, 4, 0, 0, 8, 0, 0]
    # Shrinking is area averaging: against a brute-force double loop over output/input pixel overlaps (sizes with
    # no overlap under OpenCV's 1e-3 px cut-off, so only the float32 sums differ, far below a level).
    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in [((7, 11), (3, 4)), ((9, 4), (9, 2)), ((10, 13), (4, 5))]:
        img = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        ref = np.zeros((oh, ow))
        for o in range(oh):
            for p in range(ow):
                for i in range(h):
                    for j in range(w):
                        wy = max(0.0, min((o + 1) * h / oh, i + 1) - max(o * h / oh, i))
                        wx = max(0.0, min((p + 1) * w / ow, j + 1) - max(p * w / ow, j))
                        ref[o, p] += wy * wx * img[i, j, 0]
        ref /= h / oh * w / ow
        assert np.abs(data.area_resize(img, oh, ow)[..., 0] - ref).max() <= 0.5 + 1e-3
    # Equal size: a copy (cv::resize); grey (H, W) arrays keep their shape.
    img = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert np.array_equal(data.area_resize(img, 5, 6), img)
    assert data.area_resize(img[..., 0], 2, 3).shape == (2, 3)


def _photos():
    """Real photographs bundled in scikit-image's wheel (no download): (name, uint8 (H, W, 3))."""
    skimage_data = pytest.importorskip("skimage.data")
    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
    return [(n, getattr(skimage_data, n)()) for n in names]


def test_area_resize_equals_opencv_inter_area_on_photos():
    """area_resize == cv2.resize(INTER_AREA), bit for bit, on photographs: the official case (square crops of
    U(0.5, 1) x short side to 256, which on these photos also enlarges), integer factors, other sizes, any shape."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    cases, photos = [], _photos()
    for name, photo in photos:
        h, w = photo.shape[:2]
        short = min(h, w)
        sides = [int(short * rng.uniform(0.5, 1.0)) for _ in range(12)] + [256, 257, 255, short]
        cases += [(name, photo, s, s, 256, 256) for s in sides]                             # official
        cases += [(name, photo, k * o, k * o, o, o) for k, o in [(2, 128), (3, 100), (4, 64), (5, 40)]
                  if k * o <= short]                                                        # integer factors
        for _ in range(5):                                                                  # any shapes
            ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
            cases.append((name, photo, ch, cw, int(rng.integers(1, 2 * ch + 1)), int(rng.integers(1, 2 * cw + 1))))
    hubble = dict(photos)["hubble_deep_field"]                                              # 872 x 1000
    cases += [("hubble_deep_field", hubble, 800, 1000, 799, 999), ("hubble_deep_field", hubble, 872, 1000, 436, 250),
              ("hubble_deep_field", hubble, 600, 600, 599, 599), ("hubble_deep_field", hubble, 700, 999, 175, 333)]
    assert len(cases) >= 150
    for name, photo, ch, cw, oh, ow in cases:
        top, left = int(rng.integers(0, photo.shape[0] - ch + 1)), int(rng.integers(0, photo.shape[1] - cw + 1))
        crop = np.ascontiguousarray(photo[top:top + ch, left:left + cw])
        expected = cv2.resize(crop, (ow, oh), interpolation=cv2.INTER_AREA)
        got = data.area_resize(crop, oh, ow)
        assert got.dtype == np.uint8 and np.array_equal(got, expected), \
            f"{name} {ch}x{cw} -> {oh}x{ow}: {(got != expected).sum()} values differ"


def test_eqvae_crop_equals_official_pipeline_on_photos():
    """EQVAECrop == the official draws (numpy scale, python top then left) + albumentations' RandomCrop and
    SmallestMaxSize(256, cv2.INTER_AREA), which skips the resize when the crop is already 256."""
    cv2 = pytest.importorskip("cv2")
    crop = data.EQVAECrop(256)
    for k, (name, photo) in enumerate(_photos()):
        pil = Image.fromarray(photo)
        for seed in range(4):
            np.random.seed(seed + 10 * k), random.seed(seed + 10 * k)
            got = np.asarray(crop(pil))
            np.random.seed(seed + 10 * k), random.seed(seed + 10 * k)
            h, w = photo.shape[:2]
            side = int(min(h, w) * np.random.uniform(0.5, 1.0))
            top, left = int((h - side) * random.random()), int((w - side) * random.random())
            window = np.ascontiguousarray(photo[top:top + side, left:left + side])
            assert np.array_equal(got, cv2.resize(window, (256, 256), interpolation=cv2.INTER_AREA)), (name, seed)
    # side == size: the crop itself, untouched (astronaut is 512 x 512; the scale is drawn from U(0.5, 0.5))
    photo = dict(_photos())["astronaut"]
    np.random.seed(3), random.seed(3)
    out = np.asarray(data.EQVAECrop(256, min_crop_f=0.5, max_crop_f=0.5)(Image.fromarray(photo)))
    np.random.seed(3), random.seed(3)
    np.random.uniform(0.5, 0.5)
    top, left = int(256 * random.random()), int(256 * random.random())
    assert np.array_equal(out, photo[top:top + 256, left:left + 256])


def test_eqvae_crop_size_and_scale_range():
    # Pixel value = column index, so the output's first/last columns reveal the crop's left edge and side.
    ramp = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (200, 1, 3))
    crop = data.EQVAECrop(50)
    np.random.seed(0), random.seed(0)
    sides = []
    for _ in range(40):
        out = np.asarray(crop(Image.fromarray(ramp))).astype(float)
        assert out.shape == (50, 50, 3)
        first, last = out[:, 0, 0].mean(), out[:, -1, 0].mean()
        side = (last - first) * 50 / 49                        # centres of output pixels are side / 50 apart
        left = first - side / 100 + 0.5                        # first centre = left + side / 100 - 0.5
        assert 100 - 2 <= side <= 200 + 2 and left >= -1 and left + side <= 201
        sides.append(side)
    assert min(sides) < 120 and max(sides) > 180                # spans U(0.5, 1) x short side
    np.random.seed(5), random.seed(5)
    a = np.asarray(crop(Image.fromarray(ramp)))
    np.random.seed(5), random.seed(5)
    assert np.array_equal(a, np.asarray(crop(Image.fromarray(ramp))))


#################################################################################
#                           uint8 conversion and grids                          #
#################################################################################

def test_to_uint8_and_pil_to_tensor():
    x = torch.tensor([-1.0, 1.0, 0.0, -2.0, 2.0, 0.5])
    # clamp(127.5 x + 128): -1 -> 0.5 -> 0, 1 -> 255.5 -> 255, 0 -> 128, 0.5 -> 191.75 -> 191
    assert data.to_uint8(x).tolist() == [0, 255, 128, 0, 255, 191]
    k = torch.arange(256)
    assert torch.equal(data.to_uint8(k / 127.5 - 1).long(), k)
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ref = (torch.from_numpy(arr).permute(2, 0, 1) / 255.0 - 0.5) / 0.5     # ToTensor, then Normalize(0.5, 0.5)
    assert torch.allclose(data.pil_to_tensor(Image.fromarray(arr)), ref, atol=1e-6)


def test_save_image_grid(tmp_path):
    x = torch.rand(5, 3, 8, 6) * 2 - 1
    path = data.save_image_grid(x, str(tmp_path / "sub" / "g.png"), nrow=3)
    g = np.asarray(Image.open(path))
    assert g.shape == (2 * (8 + 2) + 2, 3 * (6 + 2) + 2, 3)          # torchvision make_grid layout, padding 2
    u8 = ((127.5 * x + 128).clamp(0, 255)).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(g[2:10, 2:8], u8[0]) and np.array_equal(g[12:20, 10:16], u8[4])
    assert (g[12:20, 18:24] == 0).all()                               # the empty sixth tile stays black


def test_resize_center_is_torchvision_resize_then_center_crop(tmp_path):
    """The reconstruction-eval pipeline: short side resized to the size, then the central square."""
    from PIL import Image
    from torchvision import transforms
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = data.ImageTransform(32, "resize_center")(Image.open(tmp_path / "a.png"))
    assert x.shape == (3, 32, 32)
    # The official EQ-VAE eval.py's transform, exactly: resized as a float tensor, not quantised.
    official = transforms.Compose([transforms.ToTensor(), transforms.Resize(32), transforms.CenterCrop(32),
                                   transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])])
    assert torch.equal(x, official(Image.open(tmp_path / "a.png")))
    # Independent route: PIL bilinear resize to 48x32 (short side 32), then crop columns 8..40.
    ref = np.asarray(Image.fromarray(arr).resize((48, 32), Image.BILINEAR))[:, 8:40]
    got = data.to_uint8(x).permute(1, 2, 0).numpy()
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_encoded_cache_shards_per_rank_resume_meta_check_and_reader(tmp_path):
    """The mechanism under the latent and token caches, with an encoder simple enough to predict by hand."""
    images = data.build_dataset("synthetic", 8, "center", num_images=5)
    cache = str(tmp_path / "cache")
    calls = []

    def encode_pair(x):  # (B, 3, 8, 8) -> (B, 2, 3): the top-left pixel of the image and of its mirror
        calls.append(len(x))
        return torch.stack([x[:, :, 0, 0], x.flip(-1)[:, :, 0, 0]], dim=1)

    meta = {"format": 1, "name": "corner", "num_images": 5, "shard_size": 2}
    kw = dict(checked=["format", "num_images", "shard_size"], batch_size=2, dtype=np.float16, log=lambda *a: None)
    data.build_encoded_cache(encode_pair, images, cache, meta, rank=1, world_size=2, **kw)
    assert sorted(os.listdir(cache)) == ["labels_00001.npy", "shard_00001.npy"]  # shard 1 only; meta.json is rank 0's
    data.build_encoded_cache(encode_pair, images, cache, meta, rank=0, world_size=2, **kw)
    assert calls == [2, 2, 1]  # one batch a shard: shard 1 (images 2, 3), then shards 0 (0, 1) and 2 (4)
    data.build_encoded_cache(encode_pair, images, cache, meta, **kw)
    assert len(calls) == 3  # finished: nothing encoded again
    with open(os.path.join(cache, "meta.json")) as f:
        assert json.load(f) == {**meta, "dtype": "float16"}               # the storage dtype is recorded
    shards = [np.load(os.path.join(cache, f"shard_{k:05d}.npy")) for k in range(3)]
    assert [s.shape for s in shards] == [(2, 2, 3), (2, 2, 3), (1, 2, 3)] and shards[0].dtype == np.float16
    pixels = np.stack([images[i][0].numpy() for i in range(5)])  # (5, 3, 8, 8)
    expected = np.stack([pixels[:, :, 0, 0], pixels[:, :, 0, 7]], axis=1).astype(np.float16)  # mirror: top-right
    assert np.array_equal(np.concatenate(shards), expected)
    labels = np.concatenate([np.load(os.path.join(cache, f"labels_{k:05d}.npy")) for k in range(3)])
    assert labels.dtype == np.int64 and labels.tolist() == [images[i][1] for i in range(5)]
    # Two DataLoader workers loading the images: the same batches (one per shard), the same files.
    calls.clear()
    data.build_encoded_cache(encode_pair, images, str(tmp_path / "workers"), meta, num_workers=2, **kw)
    assert calls == [2, 2, 1]
    for name in sorted(os.listdir(cache)):
        with open(os.path.join(cache, name), "rb") as a, open(str(tmp_path / "workers" / name), "rb") as b:
            assert a.read() == b.read(), name

    # A reader: flip=False gives the image's entry, flip=True picks each side about half the time.
    ds = data.EncodedCache(cache, flip=False)
    assert len(ds) == 5 and np.array_equal(ds._entry(4, ds._random_side()), expected[4, 0])
    ds.flip = True
    torch.manual_seed(0)
    sides = [ds._random_side() for _ in range(200)]
    assert 60 < sum(sides) < 140
    assert all(np.array_equal(ds._entry(3, side), expected[3, side]) for side in (0, 1))

    # Other settings: the error names every checked field that differs, and the recorded ones that differ too.
    with pytest.raises(ValueError) as e:
        data.build_encoded_cache(encode_pair, images, cache, {**meta, "shard_size": 3, "name": "other"}, **kw)
    msg = str(e.value)
    assert "shard_size: cache 2 vs now 3" in msg and "name: cache 'corner' vs now 'other', not checked" in msg
    assert "num_images" not in msg and len(calls) == 3


def test_encoded_cache_reads_any_number_of_shards_under_a_low_descriptor_limit(tmp_path):
    """300 one-image shards read whole (and twice, shuffled) by a process allowed 128 open files: a memory map per
    shard would hold a descriptor each and fail with 'Too many open files' (as ImageNet's 1,282 shards under 1,024)."""
    import resource  # noqa: F401  (POSIX only, as the descriptor limit itself)
    import subprocess
    import sys
    cache = str(tmp_path / "cache")
    n = 300
    entries = np.random.default_rng(0).standard_normal((n, 2, 3, 2, 2)).astype(np.float16)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return torch.full((3, 1, 1), float(i)), i % 7

    def encode_pair(x):  # the item's index -> its predetermined entry
        return torch.from_numpy(entries[x[:, 0, 0, 0].long().numpy()])

    meta = {"format": 1, "num_images": n, "shard_size": 1}
    data.build_encoded_cache(encode_pair, Items(), cache, meta, ["format"], dtype=np.float16, log=lambda *a: None)
    assert len([f for f in os.listdir(cache) if f.startswith("shard_")]) == n
    np.save(tmp_path / "expected.npy", entries)
    script = f"""
import resource, sys
import numpy as np
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import data
expected = np.load({str(tmp_path / "expected.npy")!r})
resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
ds = data.EncodedCache({cache!r})
order = list(range({n})) + list(np.random.default_rng(1).permutation({n}))
for i in order:
    for side in (0, 1):
        assert np.array_equal(ds._entry(int(i), side), expected[i, side]), (i, side)
assert ds.labels.tolist() == [i % 7 for i in range({n})]
print("read", len(order), "entries; open shard files:", len(ds._files))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"read {2 * n} entries; open shard files: {data.EncodedCache.max_open}" in out.stdout


def test_latent_cache_float16_and_caches_of_float32_before_it(tmp_path, one_thread):
    """Latents are stored in float16 (half the bytes) and read as float32; a cache of the earlier float32 layout
    (no "dtype" in meta.json) is still read, and completed in float32."""
    import models
    torch.manual_seed(0)
    vae = models.KLVAE_models["tiny"]().eval()
    images = data.build_dataset("synthetic", 64, "center", num_images=7)
    kw = dict(vae_name="tiny", batch_size=2, shard_size=3, log=lambda *a: None)
    new = str(tmp_path / "fp16")
    meta = data.build_latent_cache(vae, images, new, 64, num_workers=2, **kw)
    assert meta["dtype"] == "float16"
    # Exactly the float16 rounding of the float32 encodings of the same batches (images 0, 1 | 2 of shard 0).
    x = torch.stack([images[i][0] for i in range(3)])
    with torch.no_grad():
        direct = [vae.encode(xb) for xb in (x[:2], x[2:])]
        direct_f = [vae.encode(xb.flip(-1)) for xb in (x[:2], x[2:])]
    mean_std = torch.cat([torch.cat([p.mean, p.std], 1) for p in direct])            # (3, 8, 8, 8)
    mean_std_f = torch.cat([torch.cat([p.mean, p.std], 1) for p in direct_f])
    shard = np.load(os.path.join(new, "shard_00000.npy"))
    assert shard.dtype == np.float16 and shard.shape == (3, 2, 8, 8, 8)
    assert np.array_equal(shard[:, 0], mean_std.numpy().astype(np.float16))
    assert np.array_equal(shard[:, 1], mean_std_f.numpy().astype(np.float16))
    ds = data.LatentCache(new, mode="mean")
    z = torch.stack([ds[i][0] for i in range(3)])
    assert z.dtype == torch.float32
    assert ((z - mean_std[:, :4]).abs() <= 2 ** -11 * mean_std[:, :4].abs() + 2 ** -25).all()   # float16 rounding

    # The earlier layout: float32 shards, no "dtype" in meta.json (what the previous build_latent_cache wrote).
    old = str(tmp_path / "fp32")
    data.build_encoded_cache(lambda xb: torch.stack([torch.cat([p.mean, p.std], 1) for p in
                                                     (vae.encode(xb), vae.encode(xb.flip(-1)))], 1),
                             images, old, {k: v for k, v in meta.items() if k != "dtype"}, checked=[],
                             batch_size=2, dtype=np.float32, log=lambda *a: None)
    with open(os.path.join(old, "meta.json")) as f:
        legacy_meta = {k: v for k, v in json.load(f).items() if k != "dtype"}
    with open(os.path.join(old, "meta.json"), "w") as f:
        json.dump(legacy_meta, f)
    os.remove(os.path.join(old, "shard_00001.npy"))                 # a partial cache: completed in its own dtype
    assert data.build_latent_cache(vae, images, old, 64, **kw)["dtype"] == "float32"
    assert all(np.load(os.path.join(old, f"shard_{k:05d}.npy")).dtype == np.float32 for k in range(3))
    with open(os.path.join(old, "meta.json")) as f:
        assert json.load(f) == legacy_meta
    legacy = data.LatentCache(old, mode="mean")
    torch.testing.assert_close(torch.stack([legacy[i][0] for i in range(3)]), mean_std[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(torch.stack([legacy[i][0] for i in range(7)]),
                               torch.stack([ds[i][0] for i in range(7)]), rtol=2 ** -11, atol=2 ** -25)
    # Bytes per image (and mirror): 2 x 8 x 8 x 8 values, 4 bytes each before, 2 now.
    payload = [os.path.getsize(os.path.join(d, "shard_00000.npy")) - 128 for d in (old, new)]   # 128 B header
    assert payload == [3 * 4096, 3 * 2048]

    # A cache format this code does not know is refused by the reader.
    with open(os.path.join(new, "meta.json")) as f:
        future = {**json.load(f), "format": data.LATENT_CACHE_FORMAT + 1}
    with open(os.path.join(new, "meta.json"), "w") as f:
        json.dump(future, f)
    with pytest.raises(ValueError, match="format"):
        data.LatentCache(new)
