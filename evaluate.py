"""
Stage 4: every number the EQ-VAE paper reports, from one script.

    python evaluate.py fid SAMPLES REFERENCE           # FID, sFID, Inception Score, precision, recall (ADM evaluator)
    python evaluate.py stats IMAGES --out ref.npz       # ADM reference batch: arr_0 (10K), mu, sigma, mu_s, sigma_s
    python evaluate.py recon --vae PATH --data D        # rFID, PSNR, SSIM, LPIPS (the official EQ-VAE eval.py)
    python evaluate.py equivariance --vae PATH --data D # equivariance error Delta (App. C.3)
    python evaluate.py id LATENTS.npy                   # intrinsic dimension: TwoNN (Table 5) and Levina-Bickel MLE
    python evaluate.py latents --vae PATH --data D --out DIR   # PCA-as-RGB pictures (Fig. 1), power and DCT spectra
    python evaluate.py alignment --vae PATH --data D    # the latent's alignment with DINOv2 (CKA, projected cosine)
    python evaluate.py latent-stats --vae PATH --data D [--write EXPORT]  # the shift and scale a generator needs

Each run prints one JSON object on stdout and a readable table on stderr. Feature extraction runs on every rank
under `torchrun` (each rank takes a contiguous shard, rank 0 gathers and computes the metric) and as plain python.
The FID Inception network lives in this file and loads pytorch-fid's pt_inception-2015-12-05 weights unchanged.

Generation metrics follow openai/guided-diffusion's evaluations/evaluator.py (the DiT, SiT, REPA and EQ-VAE tables):
--protocol adm (default) feeds the network as ADM's TensorFlow graph does (TF1 bilinear resize to 299, (x - 128) / 128;
equal to torch-fidelity's "inception-v3-compat"); --protocol pytorch-fid resizes and scales as pytorch-fid. IS from
softmax(pool_3 @ W) without the bias, consecutive splits of 5000; P/R with k = 3 on squared distances, fp16 as ADM.
Reconstruction as the official EQ-VAE eval.py: latent = posterior sample (seeded per image), PSNR per image on uint8
(peak 255) then averaged, SSIM as torchmetrics' StructuralSimilarityIndexMeasure() on the float decoder output,
LPIPS (VGG) on the decoder output, rFID with pytorch-fid's preprocessing between the uint8 inputs and reconstructions.
Equivariance error: App. C.3 with E = posterior mean, image and latent resized bilinearly as the official code.
"""
import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import sys
import warnings

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import checkpoints
import data
import models
import train_utils
# The equivariance error (App. C.3) lives in models.py, beside the autoencoders, because finetune_eqvae.py's
# dashboard computes the very same number; evaluate.py re-exports it.
from models import (decoder_fn, encoder_fn, equivariance_error, is_vq, psnr, rotate, scale, ssim,  # noqa: E402,F401
                    summarize_equivariance)
to_uint8 = data.to_uint8


#################################################################################
#                  FID Inception network (pytorch-fid, TF 2015-12-05)            #
#################################################################################
# pytorch-fid's port of the TensorFlow Inception graph that FID, sFID and IS were defined on: torchvision's
# Inception3 layout with 1008 classes, where the pool branches of Mixed_5b-5d, 6b-6e and 7b average without the
# zero padding (TensorFlow's avg_pool) and Mixed_7c's pool branch is a max pool (an oddity of that graph).
# Parameter names equal pytorch-fid's so pt_inception-2015-12-05-6726825d.pth loads as is; torch-fidelity's
# weights-inception-2015-12-05-6726825d.pth is the same port of the same graph (same names, same hash suffix).
# The protocol is only the preprocessing: "adm" as ADM's TF graph (and torch-fidelity), "pytorch-fid" as
# pytorch-fid. The two give different features, so statistics made one way never meet samples made the other.

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU."""
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TensorFlow's 3x3 average pool ignores the padded zeros (pytorch-fid's FID patch).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d (35 x 35): 1x1, 5x5, double 3x3 and pool branches."""
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b-6e (17 x 17): factorised 7x7 branches. forward returns (output, branch1x1 output)."""
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        # b1 is also returned: Mixed_6d's 1x1 branch is TF's "mixed_6/conv", the sFID features.
        return torch.cat([b1, b7, bd, self.branch_pool(_tf_avg_pool(x))], 1), b1


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c (8 x 8): expanded filter bank; pool branch average (7b) or max (7c, as the TF graph)."""
    def __init__(self, in_channels, pool="avg"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def tf1_resize_bilinear(x, size=299):
    """
    TensorFlow 1's ResizeBilinear (align_corners=False, no half-pixel centres), which ADM's Inception graph applies
    to its input: per axis, source = float32(i) * float32(in / out), neighbours floor and floor + 1 (clamped), x then
    y interpolated. Same arithmetic as torch-fidelity's interpolate_compat_tensorflow.py (bit-exact).
    x: (N, C, H, W) float32 -> (N, C, size, size).
    """
    def axis(n):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n / size, dtype=torch.float32)
        lo = src.long()
        return lo, (lo + 1).clamp_max(n - 1), src - lo.float()
    (y0, y1, fy), (x0, x1, fx) = axis(x.shape[2]), axis(x.shape[3])
    top, bot = x[:, :, y0], x[:, :, y1]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx
    bot = bot[..., x0] + (bot[..., x1] - bot[..., x0]) * fx
    return top + (bot - top) * fy[:, None]


PROTOCOLS = ("adm", "pytorch-fid")


class FIDInceptionV3(nn.Module):
    """The FID Inception network: uint8-range images -> pool3 (2048), sFID spatial (2023) and IS logits (1008)."""
    def __init__(self, protocol="adm"):
        super().__init__()
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
        self.protocol = protocol
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        # Random weights only matter for tests (real use loads the TF weights): He init keeps activations O(1)
        # through the 94 conv layers, so random-weight features are not vanishingly small.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        self.eval()

    @torch.no_grad()
    def forward(self, images):
        """
        images: (N, 3, H, W) tensor of pixel values in [0, 255] (uint8 or float), any size.
        Returns pool (N, 2048), spatial (N, 2023) and logits (N, 1008), float32.
        """
        if self.protocol == "adm":
            # ADM's graph: float 0..255 enter at ExpandDims:0, then TF1's resize to 299 and (x - 128) / 128.
            x = (tf1_resize_bilinear(images.float()) - 128) / 128
        else:
            # pytorch-fid: [0, 1] -> torch bilinear resize to 299 (half-pixel centres, no antialias) -> [-1, 1].
            x = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                 # (N, 288, 35, 35)
        x = self.Mixed_6a(x)                                               # (N, 768, 17, 17)
        x, _ = self.Mixed_6b(x)
        x, _ = self.Mixed_6c(x)
        x, mixed_6_conv = self.Mixed_6d(x)                                 # (N, 192, 17, 17)
        x, _ = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                 # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))                                          # (N, 2048): TF's pool_3
        # sFID (ADM evaluator): the first 7 channels of mixed_6/conv, flattened in TF's NHWC order (H, W, C).
        spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)   # (N, 17 * 17 * 7)
        # IS (ADM evaluator): softmax(pool_3 @ W) with the weight of TF's softmax/logits/MatMul and no bias.
        logits = pool @ self.fc.weight.t()                                 # (N, 1008)
        return pool, spatial, logits


def load_inception(path=None, protocol="adm"):
    """The FID Inception with pytorch-fid's weights: `path`, or torch hub's cache (downloaded there if online)."""
    path = checkpoints.find_weights(FID_WEIGHTS_FILE, FID_WEIGHTS_URL, path, flag="--inception")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInceptionV3(protocol)
    load_state_dict_strict(model, state, what=f"FID Inception weights {path}")
    return model


def load_state_dict_strict(model, state, what):
    """checkpoints.load_state_dict_checked; the released file has no BatchNorm num_batches_tracked buffers (zeros)."""
    own = model.state_dict()
    state = dict(state)
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(own[k])
    checkpoints.load_state_dict_checked(model, state, what)


#################################################################################
#                  Feature extraction (sharded over ranks, cached)               #
#################################################################################

def shard(n, dist):
    """The contiguous range [start, end) of n items that this rank handles."""
    return n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size


def gather_rows(x, dist):
    """Concatenate every rank's (n_r, ...) float array in rank order (ranks may hold different n_r); float64 stays
    float64, so per-image values gathered from any number of ranks equal the one-process ones."""
    if dist.world_size == 1:
        return x
    shapes = [None] * dist.world_size
    tdist.all_gather_object(shapes, tuple(np.shape(x)))
    counts = [s[0] for s in shapes]
    row = max((s for s in shapes if s[0] > 0), default=shapes[0])[1:]      # a rank with no rows may lack columns
    dtype = torch.float64 if np.asarray(x).dtype == np.float64 else torch.float32
    padded = torch.zeros((max(counts),) + tuple(row), dtype=dtype, device=dist.device)
    if len(x):
        padded[:len(x)] = torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=dist.device)
    out = [torch.zeros_like(padded) for _ in range(dist.world_size)]
    tdist.all_gather(out, padded)
    return torch.cat([o[:c] for o, c in zip(out, counts)]).cpu().numpy()


def _cache_key(images, model):
    # Features depend on the image file (path, size, modification time, count), on the protocol and on the
    # network's weights (fingerprinted by its first and last convolutions).
    h = hashlib.sha1(f"{os.path.abspath(images.path)}|{model.protocol}".encode())
    if os.path.exists(images.path):
        st = os.stat(images.path)
        h.update(f"{st.st_size}-{st.st_mtime_ns}-{len(images)}".encode())
    for w in (model.Conv2d_1a_3x3.conv.weight, model.Mixed_7c.branch_pool.conv.weight):
        h.update(w.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(images, model, dist, batch_size=64, cache_dir=None, chunk=1000, desc="features"):
    """
    Inception features of an image set: (pool (N, 2048), spatial (N, 2023)) float32 numpy, on every rank.
    Each rank takes a contiguous run of chunks; with cache_dir every finished chunk is kept on disk, so a killed
    50K-image run resumes where it stopped.
    """
    n = len(images)
    starts = list(range(0, n, chunk))
    lo, hi = shard(len(starts), dist)
    cache = None
    if cache_dir is not None:
        cache = os.path.join(cache_dir, _cache_key(images, model))
        os.makedirs(cache, exist_ok=True)
    feats = []
    bar = tqdm(total=sum(min(s + chunk, n) - s for s in starts[lo:hi]), desc=desc, disable=not dist.is_main,
               file=sys.stderr, leave=False)
    for start in starts[lo:hi]:
        end = min(start + chunk, n)
        path = os.path.join(cache, f"{start:09d}_{end:09d}.npy") if cache else None
        if path and os.path.exists(path):
            feats.append(np.load(path))
            bar.update(end - start)
            continue
        part = []
        for b in range(start, end, batch_size):
            x = torch.from_numpy(np.array(images.read(b, min(b + batch_size, end))))
            x = x.to(dist.device).permute(0, 3, 1, 2)                            # (B, 3, H, W) uint8
            pool, spatial, _ = model(x)
            part.append(torch.cat([pool, spatial], 1).cpu().numpy())
            bar.update(len(x))
        part = np.concatenate(part)
        if path:
            np.save(path + ".tmp.npy", part)
            os.replace(path + ".tmp.npy", path)                                  # atomic: no half-written chunk
        feats.append(part)
    bar.close()
    feats = np.concatenate(feats) if feats else np.zeros((0, 2048 + 2023), np.float32)
    feats = gather_rows(feats, dist)
    return feats[:, :2048], feats[:, 2048:]


#################################################################################
#                 FID / sFID / IS / precision-recall (ADM evaluator)             #
#################################################################################

def compute_statistics(features):
    """Mean and covariance (np.cov, ddof 1) of (N, D) features, float64, as ADM and pytorch-fid compute them."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {len(features)}")
    if len(features) <= features.shape[1]:
        warnings.warn(f"{len(features)} samples for {features.shape[1]}-dim features: the covariance is singular "
                      "and the Frechet distance biased; use many more images (the papers use 50K)")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method="eig"):
    """
    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)) between two Gaussians.
    method "sqrtm": scipy.linalg.sqrtm of S1 S2 exactly as the ADM evaluator and pytorch-fid (1e-6 I added to both
    covariances if the root is not finite; a negligible imaginary part dropped, a large one an error).
    method "eig" (default, several times faster at 2048-d): S1 S2 is similar to a symmetric PSD matrix
    (L^T S1 L with S2 = L L^T; sqrt(S1) S2 sqrt(S1) restricted to S1's range when S2 is singular), so
    tr sqrtm(S1 S2) is the sum of the square roots of its eigenvalues; agrees with "sqrtm" to float precision.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in dimension: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite entries")
    diff = mu1 - mu2
    if method == "sqrtm":
        import scipy.linalg
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"Frechet distance: singular product; adding {eps} to the covariance diagonals")
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag))}")
            covmean = covmean.real
        tr_covmean = np.trace(covmean)
    elif method == "eig":
        s1, s2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
        try:
            # S2 positive definite (enough samples): S2 = L L^T and S1 S2 ~ L^T S1 L, one symmetric eigvalsh.
            chol = np.linalg.cholesky(s2)
            lam = np.linalg.eigvalsh(chol.T @ s1 @ chol)
        except np.linalg.LinAlgError:
            # Singular S2 (fewer samples than dimensions): with S1 = V diag(w) V^T, S1 S2 has the nonzero
            # eigenvalues of B^T S2 B, B = V_r sqrt(w_r) over S1's r numerically nonzero eigenvalues (r x r).
            w, v = np.linalg.eigh(s1)
            keep = w > w.max() * len(w) * np.finfo(np.float64).eps
            b = v[:, keep] * np.sqrt(w[keep])
            lam = np.linalg.eigvalsh(b.T @ s2 @ b)
        # Negative eigenvalues are round-off (the matrix is PSD); a large one means the input is not a covariance,
        # the counterpart of sqrtm's large imaginary part.
        imag = np.sqrt(np.clip(-lam, 0, None)).sum()
        if imag > 1e-3 * max(1.0, np.sqrt(np.clip(lam, 0, None)).sum()):
            raise ValueError(f"Frechet distance: imaginary component {imag} (covariances not positive semi-definite)")
        tr_covmean = np.sqrt(np.clip(lam, 0, None)).sum()
    else:
        raise ValueError(f"unknown method {method!r}; valid: 'eig', 'sqrtm'")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, split_size=5000):
    """
    ADM's Inception Score: exp(E_x KL(p(y|x) || p(y))) per consecutive split of 5000 samples, averaged.
    50K samples give 10 splits; fewer give ceil(N / 5000) splits, the last one smaller (as ADM's loop does).
    torch-fidelity shuffles into 10 equal splits instead, so only a single split compares with it.
    """
    logits = np.asarray(logits, np.float64)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))                  # log softmax
    p = np.exp(log_p)
    scores = []
    for i in range(0, len(p), split_size):
        part, log_part = p[i:i + split_size], log_p[i:i + split_size]
        # 0 log 0 = 0: classes with underflowed probability add nothing (ADM's formula would give nan there).
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (log_part - np.log(part.mean(0, keepdims=True))), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def pairwise_sq_dists(a, b, fp16=True):
    """
    Squared distances max(|a|^2 - 2 a.b + |b|^2, 0) of (n, D) x (m, D) as ADM's DistanceBlock: with fp16 in float16
    (features rounded to fp16, each op's result rounded to fp16, sums accumulated in fp32 as TF's GPU kernels do),
    and the whole block again in float32 if any entry is not finite (fp16 overflows above 65504).
    """
    if fp16:
        h, g = a.half(), b.half()
        d = ((h * h).float().sum(1).half()[:, None] - 2 * (h.float() @ g.float().t()).half()
             + (g * g).float().sum(1).half()[None]).clamp_min(0)
        if torch.isfinite(d).all():
            return d.float()
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.t() + b.pow(2).sum(1)[None]).clamp_min(0)


def manifold_radii(features, k=3, block=10000, device="cpu", fp16=True):
    """Squared distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device)
    if len(x) <= k:
        raise ValueError(f"precision/recall need more than k = {k} points per set, got {len(x)}")
    radii = torch.empty(len(x), dtype=torch.float32)
    for i in range(0, len(x), block):
        best = None                                    # running k+1 smallest (self included) per row
        for j in range(0, len(x), block):
            d = pairwise_sq_dists(x[i:i + block], x[j:j + block], fp16)
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[i:i + block] = best[:, k].cpu()           # index 0 is the point itself (distance 0)
    return radii.numpy()


def precision_recall(ref_features, sample_features, k=3, block=10000, device="cpu", fp16=True):
    """
    Improved precision/recall (Kynkaanniemi et al. 2019) as ADM's ManifoldEstimator: each point owns a ball of
    squared radius = its k-th NN distance in its own set; precision = fraction of samples inside (<=) some
    reference ball, recall = fraction of references inside some sample ball. Distances in blocks of 10000 x 10000,
    each block in fp16 unless it overflows (see pairwise_sq_dists). fp16 rounds squared distances by up to ~5e-4 of
    the squared norms, moving points that close to a ball's edge in or out: on pool3-like features (|x|^2 ~ 400,
    5000 per set) precision rose by 0.0012 and recall by 0.0024 against fp32 distances (fp16=False, torch-fidelity's
    choice).
    """
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    smp = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    r_ref = torch.as_tensor(manifold_radii(ref_features, k, block, device, fp16), device=device)
    r_smp = torch.as_tensor(manifold_radii(sample_features, k, block, device, fp16), device=device)
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for i in range(0, len(ref), block):
        for j in range(0, len(smp), block):
            d = pairwise_sq_dists(ref[i:i + block], smp[j:j + block], fp16)     # (refs, samples)
            smp_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(0)
            ref_in[i:i + block] |= (d <= r_smp[None, j:j + block]).any(1)
    return smp_in.double().mean().item(), ref_in.double().mean().item()


def read_reference(path):
    """A reference: dict with optional mu, sigma, mu_s, sigma_s (precomputed stats), the protocol they record and
    images (an image set)."""
    ref = {"path": path}
    if os.path.isfile(path) and path.endswith(".npz"):
        with data.load_numpy(path) as f:
            keys = set(f.keys())
            ref.update({k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys})
            if "protocol" in keys:
                ref["protocol"] = str(f["protocol"])
        if ("mu" in ref) != ("sigma" in ref) or ("mu_s" in ref) != ("sigma_s" in ref):
            raise KeyError(f"{path}: statistics must come in pairs (mu, sigma) and (mu_s, sigma_s); has {sorted(keys)}")
        if "arr_0" in keys:
            ref["images"] = data.NpzImages(path)
        if "mu" not in ref and "images" not in ref:
            raise KeyError(f"{path}: neither statistics (mu, sigma) nor images (arr_0); keys: {sorted(keys)}")
    else:
        ref["images"] = data.open_images(path)
    return ref


def evaluate_samples(samples, ref, model, dist, batch_size=64, cache_dir=None, k=3, pr_fp16=True):
    """Every ADM metric of an image set against a reference (read_reference). Returns (results, notes) on rank 0."""
    notes = []
    if "mu" in ref or "mu_s" in ref:
        # Stored statistics are only comparable with features made the same way (resize and scaling).
        made = ref.get("protocol")
        if made is None:
            made = "adm"
            notes.append(f"{ref.get('path')} records no protocol (as ADM's reference batches): taken as 'adm'")
        if made != model.protocol:
            raise ValueError(f"{ref.get('path')} holds statistics made with protocol {made!r}, but this run uses "
                             f"{model.protocol!r}: use --protocol {made}, or remake the reference with "
                             f"`evaluate.py stats --protocol {model.protocol}`")
    pool, spatial = extract_features(samples, model, dist, batch_size, cache_dir, desc="sample features")
    ref_pool = ref_spatial = None
    if "images" in ref:
        ref_pool, ref_spatial = extract_features(ref["images"], model, dist, batch_size, cache_dir,
                                                 desc="reference features")
        if samples.image_size != ref["images"].image_size:
            notes.append(f"samples are {samples.image_size} and reference images {ref['images'].image_size} "
                         "(H, W): both are resized to 299, but FID across resolutions is rarely what you want")
    if not dist.is_main:
        return None, notes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # As ADM's evaluator: a reference's stored statistics win over ones recomputed from its images.
        mu_r, sigma_r = (ref["mu"], ref["sigma"]) if "mu" in ref else compute_statistics(ref_pool)
        results = {"fid": frechet_distance(*compute_statistics(pool), mu_r, sigma_r), "sfid": None}
        if "mu_s" in ref:
            results["sfid"] = frechet_distance(*compute_statistics(spatial), ref["mu_s"], ref["sigma_s"])
        elif ref_spatial is not None:
            results["sfid"] = frechet_distance(*compute_statistics(spatial), *compute_statistics(ref_spatial))
        else:
            notes.append("reference has neither sFID statistics (mu_s, sigma_s) nor images: sFID skipped")
    notes += sorted({str(w.message) for w in caught})
    results["inception_score"] = inception_score(pool @ model.fc.weight.detach().double().cpu().numpy().T)
    results["precision"] = results["recall"] = None
    if ref_pool is None:
        notes.append("reference has no images (arr_0): precision and recall skipped")
    elif min(len(pool), len(ref_pool)) <= k:
        notes.append(f"precision and recall skipped: they need more than k = {k} points per set "
                     f"({len(pool)} samples, {len(ref_pool)} reference images)")
    else:
        results["precision"], results["recall"] = precision_recall(ref_pool, pool, k=k, device=dist.device,
                                                                   fp16=pr_fp16)
    results["num_samples"] = len(pool)
    results["num_reference"] = None if ref_pool is None else len(ref_pool)
    return results, notes


#################################################################################
#                      Intrinsic dimension: TwoNN and MLE                        #
#################################################################################

def knn_distances(points, k, block=2048, device="cpu"):
    """Euclidean distances (N, k) from each point to its k nearest other points, computed in row blocks."""
    x = torch.as_tensor(np.asarray(points), dtype=torch.float64, device=device).flatten(1)
    if len(x) <= k:
        raise ValueError(f"{len(x)} points are too few for {k} nearest neighbours: use more images (--num-images) "
                         f"or a smaller --k")
    sq = x.pow(2).sum(1)
    out = []
    for i in range(0, len(x), block):
        d = (sq[i:i + block, None] - 2 * x[i:i + block] @ x.t() + sq[None]).clamp_min_(0)
        rows = torch.arange(len(d), device=d.device)
        d[rows, rows + i] = float("inf")                                            # exclude the point itself
        out.append(d.topk(k, dim=1, largest=False).values.sqrt().cpu())
    return torch.cat(out).numpy()


def _drop_duplicates(values, what):
    # A point with a duplicate has a zero nearest-neighbour distance and a non-finite estimate: it is left out.
    if not np.all(np.isfinite(values)):
        warnings.warn(f"{what}: dropping {np.sum(~np.isfinite(values))} duplicate points "
                      "(zero nearest-neighbour distance)")
    return values[np.isfinite(values)]


def twonn(points, discard_fraction=0.1, device="cpu"):
    """
    TwoNN intrinsic dimension (Facco et al. 2017) of (N, D) points: mu = r2 / r1; the fraction of largest mu is
    discarded, then -log(1 - F_emp(mu)) = d log(mu) is fit through the origin by least squares with
    F_emp(mu_(i)) = i / N over the kept sorted ratios (scikit-dimension's TwoNN, DADApy).
    """
    r = knn_distances(points, 2, device=device)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = _drop_duplicates(r[:, 1] / r[:, 0], "TwoNN")
    n = len(mu)
    keep = int(n * (1 - discard_fraction))
    if keep < 2:
        raise ValueError(f"TwoNN needs more points: {n} usable")
    mu = np.sort(mu)[:keep]
    x = np.log(mu)
    y = -np.log(1 - np.arange(1, keep + 1) / n)
    return float((x @ y) / (x @ x))


def mle_id(points, k=20, device="cpu"):
    """
    Levina-Bickel maximum-likelihood intrinsic dimension with k neighbours: per point
    m_k(x)^-1 = 1/(k-1) sum_{j<k} log(T_k(x) / T_j(x)), combined as 1 / mean(m_k^-1) (MacKay and Ghahramani's
    correction; scikit-dimension's MLE default comb='mle').
    """
    t = knn_distances(points, k, device=device)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = _drop_duplicates(np.log(t[:, -1:] / t[:, :-1]).sum(1) / (k - 1), "MLE")
    if not len(inv):
        raise ValueError("MLE: every point has a duplicate")
    return float(1.0 / inv.mean())


#################################################################################
#                   Latent pictures: PCA as RGB (Fig. 1), spectrum               #
#################################################################################

def pca_rgb(latents, scale="image"):
    """(N, C, h, w) latents -> (N, 3, h, w) in [0, 1]: the top 3 principal components over all positions of all
    images (first component in red). scale "image": min-max per image (the official vis_latent.py); "sigma": one
    rule for every model, 0.5 + component / (5 std) clipped (+-2.5 standard deviations span the colour range) with
    each component's sign fixed (its largest loading positive), so pictures of different latent spaces compare."""
    n, c, h, w = latents.shape
    x = latents.permute(0, 2, 3, 1).reshape(-1, c).double()
    x = x - x.mean(0)
    vals, vecs = torch.linalg.eigh(x.t() @ x / max(1, len(x) - 1))
    vecs = vecs[:, -3:].flip(1)
    vecs = vecs * torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True)))
    rgb = (x @ vecs).reshape(n, h, w, 3).permute(0, 3, 1, 2)
    if scale == "sigma":
        return (0.5 + rgb / (5 * vals.flip(0)[:3].clamp_min(1e-12).sqrt().view(1, 3, 1, 1))).clamp(0, 1).float()
    lo = rgb.flatten(1).min(1).values.view(n, 1, 1, 1)
    hi = rgb.flatten(1).max(1).values.view(n, 1, 1, 1)
    return ((rgb - lo) / (hi - lo + 1e-8)).float()


def radial_power_spectrum(latents):
    """Radially averaged power spectrum of (N, C, h, w) latents: mean |FFT|^2 (mean removed per map) over rings of
    integer frequency radius 0 .. min(h, w) // 2, averaged over channels and images. Returns (freqs, power)."""
    z = latents.double()
    z = z - z.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fftshift(torch.fft.fft2(z).abs() ** 2, dim=(-2, -1)).mean(dim=(0, 1))   # (h, w)
    h, w = power.shape
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    radius = torch.sqrt(yy.double() ** 2 + xx.double() ** 2).round().long()
    rmax = min(h, w) // 2
    sums = torch.zeros(radius.max() + 1, dtype=torch.float64).scatter_add_(0, radius.flatten(), power.flatten())
    counts = torch.zeros_like(sums).scatter_add_(0, radius.flatten(), torch.ones_like(power.flatten()))
    return np.arange(rmax + 1), (sums / counts)[:rmax + 1].numpy()


def _nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    raw = max(hi - lo, 1e-12) / n
    step = min((m * 10 ** np.floor(np.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return np.arange(np.ceil(lo / step) * step, hi + step * 1e-6, step)


def plot_curves(path, curves, xlabel="frequency (cycles / latent)", ylabel="power", log_y=True, title="",
                size=(720, 440)):
    """
    A line plot (PNG, PIL only) of {label: (x, y)} or {label: (x, y, spread)} curves: points marked, a band of
    +-spread where given (e.g. the standard deviation over seeds), round ticks (log10 y: labelled 10^k), the legend
    in its own column right of the axes, so it never covers a curve.
    """
    from PIL import ImageDraw
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    legend_w = 12 + 6 * max(len(k) for k in curves)
    left, top, right, bottom = 64, 28, size[0] - legend_w - 16, size[1] - 46
    tf = (lambda v: np.log10(np.maximum(v, 1e-30))) if log_y else (lambda v: v)
    data_ = {}
    for k, c in curves.items():
        x, y = np.asarray(c[0], float), np.asarray(c[1], float)
        s = np.asarray(c[2], float) if len(c) > 2 else np.zeros_like(y)
        data_[k] = (x, tf(y), tf(np.maximum(y - s, 1e-30) if log_y else y - s), tf(y + s))
    xs = np.concatenate([d[0] for d in data_.values()])
    ys = np.concatenate([np.concatenate(d[1:]) for d in data_.values()])
    x0, x1 = xs.min(), max(xs.max(), xs.min() + 1e-9)
    y0, y1 = ys.min(), max(ys.max(), ys.min() + 1e-9)
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)
    px = lambda v: left + (v - x0) / (x1 - x0) * (right - left)
    py = lambda v: bottom - (v - y0) / (y1 - y0) * (bottom - top)
    draw.rectangle([left, top, right, bottom], outline="black")
    for xv in _nice_ticks(x0, x1):
        draw.line([(px(xv), bottom), (px(xv), bottom + 4)], fill="black")
        draw.text((px(xv) - 3 * len(f"{xv:g}"), bottom + 6), f"{xv:g}", fill="black")
    for yv in (np.arange(np.ceil(y0), np.floor(y1) + 1) if log_y and y1 - y0 >= 2 else _nice_ticks(y0, y1)):
        draw.line([(left - 4, py(yv)), (left, py(yv))], fill="black")
        draw.text((4, py(yv) - 5), f"1e{yv:g}" if log_y and y1 - y0 >= 2 else
                  f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}", fill="black")
    draw.text(((left + right) // 2 - 3 * len(xlabel), size[1] - 20), xlabel, fill="black")
    draw.text((4, 8), ylabel + (f"  ({title})" if title else ""), fill="black")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
    for i, (label, (x, y, lo, hi)) in enumerate(data_.items()):
        c = colors[i % len(colors)]
        if np.any(hi > lo):
            draw.polygon([(px(a), py(b)) for a, b in zip(x, hi)] + [(px(a), py(b)) for a, b in zip(x[::-1], lo[::-1])],
                         outline=c)
        draw.line([(px(a), py(b)) for a, b in zip(x, y)], fill=c, width=2)
        for a, b in zip(x, y):
            draw.ellipse([px(a) - 2, py(b) - 2, px(a) + 2, py(b) + 2], fill=c)
        draw.line([(right + 12, top + 8 + 16 * i), (right + 24, top + 8 + 16 * i)], fill=c, width=3)
        draw.text((right + 28, top + 3 + 16 * i), label, fill=c)
    img.save(path)


def save_grid(path, rows, cell=None):
    """Save rows of (N, 3, H, W) [0, 1] tensors as one PNG grid (nearest upsampling to `cell` pixels)."""
    tiles = []
    for r in rows:
        if cell is not None:
            r = F.interpolate(r.float(), size=(cell, cell), mode="nearest")
        tiles.append(torch.cat(list(r), dim=2))                          # (3, H, N * W)
    grid = (torch.cat(tiles, dim=1).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(grid).save(path)


#################################################################################
#                                  Commands                                     #
#################################################################################

def report(results, notes=(), title=""):
    """The JSON object on stdout, a readable table (and notes) on stderr."""
    width = max([len(k) for k in results] + [8])
    lines = [title] if title else []
    for k, v in results.items():
        if isinstance(v, float):
            lines.append(f"  {k:<{width}}  {v:.6g}")
        elif not isinstance(v, (dict, list)):
            lines.append(f"  {k:<{width}}  {v}")
    lines += [f"  note: {n}" for n in notes]
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps(results))
    sys.stdout.flush()


def autoencoder_loader(args, dist):
    """The autoencoder (eval mode, on device) and this rank's shard of the dataset as a DataLoader."""
    # The LightningDiT / EQ-VAE evaluation protocol (their eval scripts): Resize(256) + CenterCrop(256).
    vae = checkpoints.load_autoencoder(args.vae).to(dist.device).eval()
    dataset = data.build_dataset(args.data, args.resolution, "resize_center", num_images=args.num_images)
    lo, hi = shard(len(dataset), dist)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=args.batch_size,
                                         shuffle=False, num_workers=args.num_workers, drop_last=False)
    return vae, dataset, loader


def weights_or_skip(args, notes, what, load):
    """load() the pretrained network a metric needs. With --preset tiny a missing weight file skips that metric
    with a note (the offline runs); otherwise its error says where to put the file and which flag names it."""
    try:
        return load()
    except FileNotFoundError as e:
        if not args.preset:
            raise
        notes.append(f"{what} skipped: {e}")
        return None


def cmd_fid(args, dist):
    notes = []
    model = weights_or_skip(args, notes, "FID, sFID, IS, precision, recall",
                            lambda: load_inception(args.inception, args.protocol).to(dist.device))
    if model is None:
        return report(dict.fromkeys(("fid", "sfid", "inception_score", "precision", "recall")), notes) \
            if dist.is_main else None
    samples, ref = data.open_images(args.samples), read_reference(args.reference)
    results, notes = evaluate_samples(samples, ref, model, dist, args.batch_size, args.cache_dir,
                                      pr_fp16=args.pr_distances == "fp16")
    if dist.is_main:
        report(results, notes, f"{args.samples} vs {args.reference} (protocol {args.protocol})")


def cmd_stats(args, dist):
    notes = []
    model = weights_or_skip(args, notes, "statistics (mu, sigma, mu_s, sigma_s)",
                            lambda: load_inception(args.inception, args.protocol).to(dist.device))
    images = data.open_images(args.images)
    pool, spatial = extract_features(images, model, dist, args.batch_size, args.cache_dir) if model else ([], [])
    if not dist.is_main:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = {} if model is None else dict(zip(("mu", "sigma", "mu_s", "sigma_s"),
                                                  compute_statistics(pool) + compute_statistics(spatial)))
    # An ADM reference batch: arr_0 (uint8 NHWC; ADM keeps 10K images for precision/recall) beside the statistics
    # of every image, which ADM's evaluator takes instead of recomputing them; `protocol` records how they were made.
    kept = images.read(0, min(args.keep_images, len(images))) if args.keep_images > 0 else None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    data.save_npz(args.out, kept, **stats, protocol=np.array(args.protocol))
    report({"out": args.out, "num_images": len(images), "images_kept": 0 if kept is None else len(kept),
            "protocol": args.protocol}, notes + sorted({str(w.message) for w in caught}), f"statistics of {args.images}")


def posterior_sample(vae, x, first_index, seed):
    """The official eval.py's latent, a posterior sample (a VQ-GAN's latent quantises in decoder_fn), with noise
    from a generator seeded by (seed, image index), so the numbers do not depend on batches or processes."""
    if is_vq(vae):
        return vae.encode(x)
    post = vae.encode(x)
    eps = torch.stack([torch.randn(post.mean.shape[1:], generator=torch.Generator().manual_seed(
        seed * 1_000_003 + first_index + i)) for i in range(len(x))])
    return post.mean + post.std * eps.to(post.mean)


@torch.no_grad()
def cmd_recon(args, dist):
    vae, dataset, loader = autoencoder_loader(args, dist)
    # rFID as the official eval.py: pytorch-fid's calculate_fid_given_paths on the PNGs, i.e. its preprocessing.
    skipped = []
    inception = None if args.no_fid else weights_or_skip(
        args, skipped, "rFID", lambda: load_inception(args.inception, "pytorch-fid").to(dist.device))
    lpips = None if args.no_lpips else weights_or_skip(
        args, skipped, "LPIPS", lambda: checkpoints.load_lpips(args.lpips_vgg, args.lpips_lin).to(dist.device))
    decode = decoder_fn(vae)
    if args.save_png and dist.is_main:
        for sub in ("ref", "recon"):
            os.makedirs(os.path.join(args.save_png, sub), exist_ok=True)
    train_utils.barrier()
    rows, index = [], shard(len(dataset), dist)[0]
    for x, _ in tqdm(loader, desc="recon", disable=not dist.is_main, file=sys.stderr, leave=False):
        x = x.to(dist.device)
        with train_utils.autocast(args.precision, dist.device):
            x_hat = decode(posterior_sample(vae, x, index, args.seed)).float()
        ref8, rec8 = data.to_uint8(x), data.to_uint8(x_hat)  # the uint8 images the official PNGs hold
        # PSNR on those uint8 images; SSIM (torchmetrics, lightningdit) and LPIPS on the float decoder output.
        s = ssim(rec8, ref8, 255.0, crop=True) if args.ssim == "skimage" else \
            ssim(x_hat, x, (-1.0, 1.0) if args.ssim == "lightningdit" else None)
        cols = [psnr(rec8, ref8), s]
        if lpips is not None:
            cols.append(lpips(x_hat, x).double().flatten())
        if inception is not None:
            cols += [t.double() for t in (inception(ref8)[0], inception(rec8)[0])]
        rows.append(torch.cat([c.view(len(x), -1).cpu() for c in cols], 1).numpy())
        if args.save_png:
            for i in range(len(x)):
                for sub, t in (("ref", ref8), ("recon", rec8)):
                    Image.fromarray(t[i].permute(1, 2, 0).cpu().numpy()).save(
                        os.path.join(args.save_png, sub, f"{index + i:06d}.png"))
        index += len(x)
    rows = gather_rows(np.concatenate(rows) if rows else np.zeros((0, 0)), dist)
    if not dist.is_main:
        return
    results = {"psnr": float(rows[:, 0].mean()), "ssim": float(rows[:, 1].mean())}
    if lpips is not None:
        results["lpips"] = float(rows[:, 2].mean())
    notes = skipped + [f"SSIM as {args.ssim}; latents: posterior samples seeded by (--seed {args.seed}, image index)"]
    if inception is not None:
        col = 3 if lpips is not None else 2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results["rfid"] = frechet_distance(*compute_statistics(rows[:, col + 2048:col + 4096]),
                                               *compute_statistics(rows[:, col:col + 2048]))
        notes += sorted({str(w.message) for w in caught})
    results["num_images"] = len(rows)
    report(results, notes, f"reconstruction of {args.data} by {args.vae}")


@torch.no_grad()
def cmd_equivariance(args, dist):
    vae, dataset, loader = autoencoder_loader(args, dist)
    encode, decode = encoder_fn(vae, "mean"), decoder_fn(vae)
    parts = {}
    for x, _ in tqdm(loader, desc="equivariance", disable=not dist.is_main, file=sys.stderr, leave=False):
        with train_utils.autocast(args.precision, dist.device):
            errs = equivariance_error(encode, x.to(dist.device), args.rotations, args.scales,
                                      decode if args.psnr else None, args.image_interp, args.latent_interp)
        for k, v in errs.items():
            parts.setdefault(k, []).append(v.double().cpu())
    names = sorted(parts)
    local = np.stack([torch.cat(parts[k]).numpy() for k in names], 1) if parts else np.zeros((0, 0))
    rows = gather_rows(local, dist)
    if not dist.is_main:
        return
    results = summarize_equivariance({k: torch.from_numpy(rows[:, i]) for i, k in enumerate(names)})
    order = ["rotation", "scale"] + [k for k in results if k not in ("rotation", "scale")]
    results = {k: results[k] for k in order}
    results["num_images"] = len(rows)
    report(results, ["E = posterior mean (KL) / continuous pre-quantisation latent (VQ); "
                     f"image scaling {args.image_interp}, latent scaling {args.latent_interp}"],
           f"equivariance error of {args.vae} on {args.data}")


@torch.no_grad()
def cmd_latent_stats(args, dist):
    """The latent normalisation an autoencoder needs for a generator (SD3's recipe: shift = mean, scale = 1 / std
    of the latents it trains on, posterior samples), over all elements or per channel; --write stores it in an
    export. Fine-tuning moves these statistics (EQ-VAE's does): re-measure after it."""
    vae, dataset, loader = autoencoder_loader(args, dist)
    if not isinstance(vae, models.KLVAE):
        raise ValueError(f"latent-stats: {args.vae} is a VQ-GAN, whose tokens are not normalised")
    g = torch.Generator(dist.device).manual_seed(args.seed * 1_000_003 + dist.rank)
    sums = torch.zeros(3, vae.config["embed_dim"], dtype=torch.float64, device=dist.device)  # count, sum, sum sq
    for x, _ in tqdm(loader, desc="latent-stats", disable=not dist.is_main, file=sys.stderr, leave=False):
        z = vae.encode(x.to(dist.device)).sample(g).double()  # (B, C, h, w)
        sums += torch.stack([torch.full_like(z[0, :, 0, 0], z[:, 0].numel()), z.sum((0, 2, 3)), z.pow(2).sum((0, 2, 3))])
    if dist.world_size > 1:
        tdist.all_reduce(sums)
    if not dist.is_main:
        return
    n, s1, s2 = sums.cpu()
    mean_c, mean = s1 / n, float(s1.sum() / n.sum())
    std_c, std = (s2 / n - mean_c ** 2).clamp_min(0).sqrt(), float(s2.sum() / n.sum() - mean ** 2) ** 0.5
    if args.per_channel:  # diffusers' latents_mean / latents_std: (z - mean_c) * scale / std_c with scale 1
        norm = dict(scaling_factor=1.0, shift_factor=0.0, latents_mean=mean_c.tolist(), latents_std=std_c.tolist())
    else:
        norm = dict(scaling_factor=1.0 / std, shift_factor=mean, latents_mean=None, latents_std=None)
    results = {**norm, "channel_mean": mean_c.tolist(), "channel_std": std_c.tolist(), "was": vae.latent_norm(),
               "num_images": len(dataset)}
    notes = []
    if args.write:
        notes.append(f"written into {checkpoints.set_latent_norm(args.write, norm)}")
    report(results, notes, f"latent statistics of {args.vae} on {args.data}")


@torch.no_grad()
def collect_latents(args, dist, latent="mean"):
    vae, dataset, loader = autoencoder_loader(args, dist)
    encode = encoder_fn(vae, latent)
    zs, xs = [], []
    for x, _ in tqdm(loader, desc="latents", disable=not dist.is_main, file=sys.stderr, leave=False):
        with train_utils.autocast(args.precision, dist.device):
            zs.append(encode(x.to(dist.device)).float().cpu())
        xs.append(x)
    z = torch.cat(zs)
    shape = z.shape[1:]
    z = gather_rows(z.flatten(1).numpy(), dist)
    return z.reshape(len(z), *shape), torch.cat(xs)


def cmd_id(args, dist):
    if args.latents is not None:
        z = data.load_numpy(args.latents)
        if isinstance(z, np.lib.npyio.NpzFile):
            z = z[z.files[0]]
        source = args.latents
    else:
        if args.vae is None or args.data is None:
            raise SystemExit("id: give LATENTS.npy, or --vae PATH and --data D")
        z, _ = collect_latents(args, dist, args.latent)
        source = f"{args.vae} on {args.data} ({args.latent} latents)"
    if not dist.is_main:
        return
    points = np.asarray(z, np.float64).reshape(len(z), -1)
    report({"twonn": twonn(points, device=dist.device), "mle": mle_id(points, k=args.k, device=dist.device),
            "mle_k": args.k, "num_points": len(points), "ambient_dim": points.shape[1]}, [], f"intrinsic dimension of {source}")


def cmd_latents(args, dist):
    z, x = collect_latents(args, dist, args.latent)
    if not dist.is_main:
        return
    z = torch.as_tensor(z)
    os.makedirs(args.out, exist_ok=True)
    n = min(args.num_show, len(x))                     # x: rank 0's shard, the first images
    images, pca = (x[:n].float() + 1) / 2, pca_rgb(z, args.pca_scale)[:n]
    save_grid(os.path.join(args.out, "pca_rgb.png"), [images, pca], cell=x.shape[-1])
    freqs, power = radial_power_spectrum(z)
    # Radius 0 (the mean, removed per map) is left out of the log plot.
    plot_curves(os.path.join(args.out, "power_spectrum.png"), {"latent": (freqs[1:], power[1:])})
    # The block DCT view of the diffusability paper: the latent's curve against the images' own.
    block = min(8, *z.shape[-2:])
    dct = {"latent": models.block_dct_spectrum(z, block), "RGB": models.block_dct_spectrum(x, block)}
    plot_curves(os.path.join(args.out, "dct_spectrum.png"), {k: (np.arange(1, block * block), v[1:])
                for k, v in dct.items()}, xlabel=f"zigzag index ({block} x {block} DCT)", ylabel="amplitude / DC")
    np.savez(os.path.join(args.out, "power_spectrum.npz"), freqs=freqs, power=power, dct_latent=dct["latent"],
             dct_rgb=dct["RGB"], images=images.numpy(), pca_rgb=pca.numpy())
    report({**{k: os.path.join(args.out, f"{k}.png") for k in ("pca_rgb", "power_spectrum", "dct_spectrum")},
            "num_latents": len(z), "latent_shape": list(z.shape[1:]), "spectrum": [float(p) for p in power],
            **{f"dct_high_freq_{k.lower()}": models.high_frequency_share(v) for k, v in dct.items()}}, [],
           f"latent pictures of {args.vae} on {args.data}")


@torch.no_grad()
def cmd_alignment(args, dist):
    """How much the latent says what DINOv2 says, position by position (what VA-VAE's VF loss trains): linear CKA
    of latent and DINOv2 tokens, and the mean cosine after a least-squares 1x1 projection fitted on the even images,
    measured on the odd ones. DINOv2 sees each image at 14 px per latent position, as --regularizer vf in training."""
    notes = []
    encoder = weights_or_skip(args, notes, "alignment", lambda: checkpoints.load_dinov2(args.dinov2_model, args.dinov2))
    if args.dinov2_model == "dinov2_tiny":
        notes.append("dinov2_tiny has RANDOM weights: the numbers exercise the code, they say nothing about DINOv2")
    if encoder is None:
        return report({"cka": None, "projected_cos": None}, notes) if dist.is_main else None
    vae, _, loader = autoencoder_loader(args, dist)
    encoder, encode, pairs = encoder.to(dist.device), encoder_fn(vae, "mean"), []
    for x, _ in tqdm(loader, desc="alignment", disable=not dist.is_main, file=sys.stderr, leave=False):
        z = encode(x.to(dist.device)).double()                               # (B, C, h, w) -> tokens (B, h w, C)
        f = encoder.forward_features(models.dinov2_preprocess(x.to(dist.device), tuple(
            n * encoder.patch_size for n in z.shape[-2:])))["x_norm_patchtokens"].double()
        pairs.append(torch.cat([z.flatten(2).transpose(1, 2), f], -1).cpu())  # (B, h w, C + D)
    rows = gather_rows(torch.cat(pairs).flatten(1).numpy(), dist)
    if not dist.is_main:
        return
    both, c = torch.from_numpy(rows).view(len(rows), pairs[0].shape[1], -1), z.shape[1]
    t, f = both[..., :c], both[..., c:]
    w = torch.linalg.lstsq(t[0::2].reshape(-1, c), f[0::2].reshape(-1, f.shape[-1])).solution
    cos = F.cosine_similarity(t[1::2].reshape(-1, c) @ w, f[1::2].reshape(-1, f.shape[-1]), dim=-1)
    report({"cka": models.linear_cka(t.reshape(-1, c), f.reshape(-1, f.shape[-1])), "projected_cos": float(cos.mean()),
            "num_images": len(rows), "tokens_per_image": t.shape[1], "dinov2": args.dinov2_model}, notes,
           f"alignment of {args.vae}'s latents with {args.dinov2_model}")


# --preset tiny for the autoencoder metrics: the CPU-sized setting of every stage, 64 px synthetic images.
PRESETS = {"tiny": dict(data="synthetic", resolution=64, num_images=256, num_workers=0, dinov2_model="dinov2_tiny")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="metric", required=True)

    def common(p, inception=False, vae=False):
        p.add_argument("--batch-size", type=int, default=64 if inception else 32, help="images per forward")
        if inception:
            p.add_argument("--inception", default=None, help=f"path to {FID_WEIGHTS_FILE} (default: torch hub cache)")
            p.add_argument("--cache-dir", default=None, help="keep features per chunk here; a rerun resumes")
        if inception and not vae:
            p.add_argument("--protocol", choices=PROTOCOLS, default="adm",
                           help="adm: ADM evaluator's TF1 resize and (x - 128) / 128 (the papers' tables); "
                                "pytorch-fid: torch bilinear resize and 2x - 1")
        p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="tiny: 256 synthetic 64 px images, no loader workers, and metrics whose weights are not "
                            "on disk skipped with a note (offline); options you type still win")
        if vae:
            p.add_argument("--vae", required=vae is True, default=None, help="autoencoder: a checkpoint or folder, "
                           "or a Hugging Face ID in the local cache")
            p.add_argument("--data", default=None, help="'synthetic' or an ImageFolder path")
            p.set_defaults(needs_data=vae is True)
            p.add_argument("--resolution", type=int, default=256, help="Resize + CenterCrop side (paper: 256)")
            p.add_argument("--num-images", type=train_utils.positive_int, default=None,
                           help="default: the whole dataset (paper: 50K)")
            p.add_argument("--num-workers", type=int, default=4, help="data loader processes")
            p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autoencoder autocast")

    p = sub.add_parser("fid", help="FID, sFID, IS, precision, recall of samples against a reference")
    p.add_argument("samples", help="ADM .npz (arr_0 uint8 NHWC) or folder of images")
    p.add_argument("reference", help="ADM reference .npz (mu, sigma, [mu_s, sigma_s], [arr_0]), .npz or folder")
    common(p, inception=True)
    p.add_argument("--pr-distances", choices=["fp16", "fp32"], default="fp16",
                   help="precision/recall distances: fp16 as ADM's evaluator (fp32 where it overflows), or fp32")

    p = sub.add_parser("stats", help="reference statistics (ADM layout: mu, sigma, mu_s, sigma_s)")
    p.add_argument("images")
    p.add_argument("--out", required=True, help="the reference .npz to write")
    p.add_argument("--keep-images", type=int, default=10000, help="store the first K images as arr_0 (P/R; 0: none)")
    common(p, inception=True)

    p = sub.add_parser("recon", help="rFID, PSNR, SSIM, LPIPS of an autoencoder's reconstructions")
    common(p, inception=True, vae=True)
    p.add_argument("--no-fid", action="store_true", help="skip rFID (no Inception weights needed)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS (no VGG weights needed)")
    p.add_argument("--lpips-vgg", default=None, help="vgg16-397923af.pth (default: torch hub cache)")
    p.add_argument("--lpips-lin", default=None, help="LPIPS v0.1 vgg.pth lin layers (default: torch hub cache)")
    p.add_argument("--save-png", default=None, help="folder for ref/ and recon/ PNG dumps")
    p.add_argument("--ssim", choices=["torchmetrics", "lightningdit", "skimage"], default="torchmetrics",
                   help="torchmetrics: official EQ-VAE eval; lightningdit: data_range (-1, 1); skimage: on uint8")
    p.add_argument("--seed", type=int, default=0, help="seeds each image's posterior sample with its index")

    p = sub.add_parser("equivariance", help="equivariance error Delta (App. C.3)")
    common(p, vae=True)
    p.add_argument("--rotations", type=int, nargs="+", default=[1, 2, 3], help="quarter turns (T_r)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="scale factors (T_s)")
    p.add_argument("--image-interp", choices=["bilinear", "bicubic", "area"], default="bilinear", help="resize of x")
    p.add_argument("--latent-interp", choices=["bilinear", "bicubic", "area"], default="bilinear", help="of E(x)")
    p.add_argument("--no-psnr", dest="psnr", action="store_false", help="skip PSNR(tau x, D(tau E(x)))")

    p = sub.add_parser("id", help="intrinsic dimension (TwoNN, MLE) of latents")
    p.add_argument("latents", nargs="?", default=None, help=".npy of latents (N, ...)")
    common(p, vae="optional")
    p.add_argument("--latent", choices=["mean", "sample"], default="mean", help="posterior mean or a sample")
    p.add_argument("--k", type=int, default=20, help="neighbours for the MLE")

    p = sub.add_parser("latents", help="PCA-as-RGB pictures and power spectrum of latents")
    common(p, vae=True)
    p.add_argument("--out", required=True, help="folder for the pictures and spectra")
    p.add_argument("--latent", choices=["mean", "sample"], default="mean", help="posterior mean or a sample")
    p.add_argument("--num-show", type=int, default=8, help="images in the PCA picture")
    p.add_argument("--pca-scale", choices=["image", "sigma"], default="image", help="PCA colours: min-max per "
                   "image (the official vis_latent.py) or +-2.5 std for all (pictures of models compare)")

    p = sub.add_parser("alignment", help="alignment of the latent with DINOv2 features (CKA, projected cosine)")
    common(p, vae=True)
    p.add_argument("--dinov2-model", default="dinov2_vitl14", choices=sorted(models.DINOv2_models),
                   help="VA-VAE's DINOv2 ViT-L/14 by default (--preset tiny: the random dinov2_tiny)")
    p.add_argument("--dinov2", default=None, help="its weights (default: torch hub cache)")

    p = sub.add_parser("latent-stats", help="the latent normalisation (shift, scale) a generator needs")
    common(p, vae=True)
    p.add_argument("--per-channel", action="store_true", help="latents_mean / latents_std per channel instead")
    p.add_argument("--write", default=None, help="store the values in this export (diffusers folder, save_ldm file)")
    p.add_argument("--seed", type=int, default=0, help="of the posterior samples")

    handlers = {"fid": cmd_fid, "stats": cmd_stats, "recon": cmd_recon, "equivariance": cmd_equivariance,
                "id": cmd_id, "latents": cmd_latents, "latent-stats": cmd_latent_stats, "alignment": cmd_alignment}

    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        # Fill only the options that were not typed (as train_utils.apply_preset does for the stage scripts).
        typed = sys.argv[1:] if argv is None else argv
        for key, value in PRESETS[args.preset].items():
            flag = "--" + key.replace("_", "-")
            if hasattr(args, key) and not any(t == flag or t.startswith(flag + "=") for t in typed):
                setattr(args, key, value)
    if getattr(args, "needs_data", False) and args.data is None:
        parser.error(f"{args.metric}: --data is required (an image folder, or 'synthetic'; or use --preset tiny)")
    dist = train_utils.setup_distributed()
    if getattr(args, "precision", None) is not None:
        args.precision = train_utils.resolve_precision(args.precision, dist.device)  # fp16 needs CUDA, as in training
    # Metrics in full fp32: setup_distributed enables TF32, which moves Inception features by ~1e-3.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        handlers[args.metric](args, dist)
    finally:
        train_utils.cleanup_distributed()


if __name__ == "__main__":
    train_utils.run_main(main, None)  # user errors (a missing file, a bad option) end with one line
