"""
The demo's own code (demo.sh): an offline stand-in for FID and the report writer. The paper's metrics live in
evaluate.py; this file only serves the miniature.

    python demo.py probe-train --out probe.pt        # a small classifier of the synthetic classes
    python demo.py probe-eval samples.npz --probe probe.pt   # gFD-probe and probe accuracy of samples
    python demo.py report --demo-dir results/demo     # results/demo/report.md from the files demo.sh wrote

Each command prints one JSON object on stdout and a readable table on stderr, as evaluate.py's.
"""
import argparse
import datetime
import glob
import json
import os
import platform
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from data import open_images
from evaluate import compute_statistics, frechet_distance, plot_curves, report


#################################################################################
#        Offline generation metric for the demo: a probe classifier              #
#################################################################################
# FID needs the Inception weights (a download) and tens of thousands of images; the demo runs offline on the
# built-in synthetic data with a few hundred samples. Its stand-in is a small CNN trained on the synthetic classes
# (whose looks do not depend on the dataset seed, so a probe trained on seed s judges images of any seed): the
# Frechet distance between its penultimate features of samples and of held-out real images ("gFD-probe"), and its
# accuracy on the class each sample was asked to show. Same formula as FID (frechet_distance), smaller network.
# It ranks latent spaces at demo scale; it is not comparable with FID numbers.

class ProbeNet(nn.Module):
    """Small CNN classifier of 64 px synthetic images; forward_features gives the (N, feature_dim) FD features."""

    def __init__(self, num_classes=10, width=32, feature_dim=64):
        super().__init__()
        self.config = dict(num_classes=num_classes, width=width, feature_dim=feature_dim)
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):                           # four stride-2 stages: 64 -> 4 px
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(chans[-1], feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x):
        """x: (N, 3, H, W) in [-1, 1] -> (N, feature_dim) penultimate activations (non-negative, after ReLU)."""
        h = self.features(x).mean(dim=(2, 3))                                  # (N, 4 * width), global average
        return F.relu(self.proj(h))

    def forward(self, x):
        """x: (N, 3, H, W) in [-1, 1] -> (N, num_classes) logits."""
        return self.head(self.forward_features(x))


def synthetic_tensor(num_images, resolution, num_classes=10, seed=0):
    """Render SyntheticImages(num_images, resolution, num_classes, seed) once: ((N, 3, R, R) in [-1, 1], (N,) labels)."""
    ds = data.SyntheticImages(num_images, resolution, num_classes=num_classes, seed=seed)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


@torch.no_grad()
def probe_features(model, images, batch_size=256):
    """(N, 3, H, W) float images in [-1, 1] (resized to the probe's resolution if needed) -> ((N, D) features,
    (N, num_classes) logits) as float64 numpy arrays."""
    model.eval()
    feats, logits = [], []
    res = model.resolution
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float()
        if x.shape[-1] != res or x.shape[-2] != res:
            x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
        f = model.forward_features(x)
        feats.append(f.double().numpy())
        logits.append(model.head(f).double().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def train_probe(out, resolution=64, num_classes=10, num_images=2048, num_ref=1000, steps=300, batch_size=64,
                lr=2e-3, seed=0, width=32, feature_dim=64, log=print):
    """
    Train the probe on SyntheticImages(seed) with random horizontal flips (the generators see flipped images too),
    measure its accuracy on held-out images (seed + 1), store the held-out feature statistics (the gFD reference)
    and save everything to `out` (a .pt file). Seeded and single-process: the same arguments give the same probe.
    """
    torch.manual_seed(seed)
    x, y = synthetic_tensor(num_images, resolution, num_classes, seed)
    model = ProbeNet(num_classes, width, feature_dim)
    model.resolution = resolution
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb, yb = x[idx], y[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps:
            log(f"probe step {step}/{steps}: loss {np.mean(losses[-max(1, steps // 10):]):.4f}")
    # Held-out images of another seed: accuracy, and the reference statistics every gFD-probe is measured against.
    x_ref, y_ref = synthetic_tensor(num_ref, resolution, num_classes, seed + 1)
    feats, logits = probe_features(model, x_ref)
    _, train_logits = probe_features(model, x[:num_ref])
    mu, sigma = compute_statistics(feats)
    result = {"probe": out, "train_accuracy": float((train_logits.argmax(1) == y[:num_ref].numpy()).mean()),
              "heldout_accuracy": float((logits.argmax(1) == y_ref.numpy()).mean()), "final_loss": losses[-1],
              "steps": steps, "seed": seed, "num_images": num_images, "num_ref": num_ref, "resolution": resolution,
              "feature_dim": feature_dim}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    state = {"model": model.state_dict(), "config": model.config, "resolution": resolution, "ref_mu": mu,
             "ref_sigma": sigma, "ref_seed": seed + 1, "result": result}
    torch.save(state, out + ".tmp")
    os.replace(out + ".tmp", out)                                              # atomic: a marker for demo.sh
    return result


def load_probe(path):
    """A probe saved by train_probe: (model in eval mode, its checkpoint dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--probe {path}: no such file (train one with `demo.py probe-train --out {path}`)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    missing = [k for k in ("model", "config", "resolution", "ref_mu", "ref_sigma") if k not in state]
    if missing:
        raise KeyError(f"{path} is not a probe checkpoint: missing {missing}")
    model = ProbeNet(**state["config"])
    model.load_state_dict(state["model"])
    model.resolution = state["resolution"]
    return model.eval(), state


def probe_evaluate(probe, state, images, labels=None, floor_seed=None):
    """
    gFD-probe of uint8 (N, H, W, 3) images against the probe's held-out reference statistics, and, given the
    labels each image was sampled for, the probe's accuracy on them. With floor_seed, also the same distance for N
    real images of that seed: the value a perfect generator would get with this many samples (FD is biased upward
    at small N, so a gFD means something only next to this floor).
    """
    x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0       # (N, 3, H, W) in [-1, 1]
    feats, logits = probe_features(probe, x)
    out = {"num_samples": len(feats), "gfd_probe": frechet_distance(*compute_statistics(feats),
                                                                      state["ref_mu"], state["ref_sigma"])}
    if labels is not None:
        out["probe_accuracy"] = float((logits.argmax(1) == np.asarray(labels)).mean())
    if floor_seed is not None:
        real, _ = synthetic_tensor(len(feats), state["resolution"], probe.config["num_classes"], floor_seed)
        real_feats, _ = probe_features(probe, real)
        out["gfd_probe_real_floor"] = frechet_distance(*compute_statistics(real_feats),
                                                       state["ref_mu"], state["ref_sigma"])
    return out


#################################################################################
#                  The demo's report: tables and figures in markdown             #
#################################################################################
# demo.sh writes a fixed layout under its folder; the report reads only files, so it can be rebuilt any time:
#   steps.tsv                     one line per step run: name, status (ran/reused/missing), seconds, command
#   probe/probe.pt, probe.json    the probe classifier (probe-train)
#   ae/<ae>/                      finetune_eqvae.py runs: metrics.jsonl, previews/*.png, the exported autoencoder
#   eval/<ae>/{recon,equivariance,id}.json, eval/<ae>/latents/  evaluate.py results for each autoencoder
#   gen/<gen>-<ae>/               train_dit.py / train_sit.py / train_maskgit.py runs (metrics.jsonl)
#   samples/<gen>-<ae>/*.npz|png  sample.py outputs; eval/gen.json: probe-eval of all of them
# The autoencoders and generators the report knows, in the paper's order (Table 1: baseline, then EQ-VAE):
DEMO_AUTOENCODERS = [("kl-base", "KL-VAE (base, from scratch)"), ("kl-plain", "+ plain fine-tune (Table 6 control)"),
                     ("kl-eq", "+ EQ-VAE"), ("vq-base", "VQ-GAN (base, from scratch)"), ("vq-eq", "+ EQ-VAE")]
DEMO_GENERATORS = [("dit", "DiT", "kl"), ("sit", "SiT", "kl"), ("maskgit", "MaskGIT", "vq")]


def _read_json(path):
    """The JSON object in path (evaluate.py's stdout: the last line that parses), or None if absent."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip().startswith("{")]
    for ln in reversed(lines):
        try:
            return json.loads(ln)
        except json.JSONDecodeError:
            continue
    return None


def _read_jsonl(path):
    """Rows of a metrics.jsonl (rows that do not parse, e.g. a line cut by a kill, are skipped)."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for ln in f:
                try:
                    rows.append(json.loads(ln))
                except json.JSONDecodeError:
                    pass
    return rows


def _read_steps(path):
    """steps.tsv -> {name: {"status", "seconds", "cmd"}}: the last line per step, seconds of the run that made it."""
    steps = {}
    if os.path.isfile(path):
        with open(path) as f:
            for ln in f:
                parts = ln.rstrip("\n").split("\t")
                if len(parts) < 4:
                    continue
                name, status, seconds, cmd = parts[0], parts[1], parts[2], "\t".join(parts[3:])
                prev = steps.get(name, {})
                entry = {"status": status, "cmd": cmd, "seconds": prev.get("seconds")}
                if status == "ran":
                    entry["seconds"] = float(seconds)
                steps[name] = entry
    return steps


def _fmt(v, digits=3):
    """A table cell: numbers to `digits` significant figures, missing values as n/a."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def _last(rows, key):
    """(step, value) of the last row in rows holding key, or (None, None)."""
    for r in reversed(rows):
        if key in r:
            return r.get("step"), r[key]
    return None, None


def _curve(rows, key, smooth=1):
    """(steps, values) of key over rows, a running mean over `smooth` rows."""
    pts = [(r["step"], float(r[key])) for r in rows if key in r and "step" in r]
    if not pts:
        return None
    xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    if smooth > 1 and len(ys) > smooth:
        ys = np.convolve(ys, np.ones(smooth) / smooth, mode="valid")
        xs = xs[smooth - 1:]
    return xs, ys


def write_demo_report(demo_dir, out=None, elapsed=None, title="EQ-VAE in miniature"):
    """Write demo_dir/report.md (or out) from the files demo.sh produced; returns a summary dict."""
    demo_dir = os.path.abspath(demo_dir)
    out = out or os.path.join(demo_dir, "report.md")
    fig_dir = os.path.join(demo_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(out)))
    steps = _read_steps(os.path.join(demo_dir, "steps.tsv"))
    settings = _read_json(os.path.join(demo_dir, "settings.json")) or {}
    probe = _read_json(os.path.join(demo_dir, "probe", "probe.json"))
    gen_eval = (_read_json(os.path.join(demo_dir, "eval", "gen.json")) or {}).get("results", {})
    figures, missing = [], []
    L = [f"# {title}", ""]

    def step_ref(name):
        return f"`{name}`" if name in steps else f"`{name}` (not run)"

    # ---- Header: what ran, where, how long.
    ran = [s["seconds"] for s in steps.values() if s.get("seconds") is not None]
    L += ["Every stage of the paper at tiny scale on the built-in synthetic data (10 classes, 64 px), offline on "
          "CPU, with the stage scripts and the flags listed under [Commands](#commands): copy a line and raise "
          "the steps to scale it up. Numbers are as measured by this run; at this scale they show the direction "
          "of the paper's effects, not its values.", ""]
    L += [f"- mode: {settings.get('mode', 'n/a')}; generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}"
          f" on {platform.node() or 'n/a'} ({os.cpu_count()} CPU(s), torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"]
    if elapsed is not None:
        L += [f"- wall time of this invocation of demo.sh (before the report): {float(elapsed):.0f} s"]
    L += [f"- compute time of all steps (each as of the run that computed it): {sum(ran):.0f} s over {len(ran)} steps"]
    if settings:
        L += ["- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "mode")]
    L += [""]

    # ---- Gather autoencoder numbers.
    ae_rows = {}
    for ae, label in DEMO_AUTOENCODERS:
        recon = _read_json(os.path.join(demo_dir, "eval", ae, "recon.json")) or {}
        eq = _read_json(os.path.join(demo_dir, "eval", ae, "equivariance.json")) or {}
        idj = _read_json(os.path.join(demo_dir, "eval", ae, "id.json")) or {}
        run = os.path.isdir(os.path.join(demo_dir, "ae", ae))
        ae_rows[ae] = dict(label=label, run=run, psnr=recon.get("psnr"), ssim=recon.get("ssim"),
                           rot=eq.get("rotation"), scale=eq.get("scale"), twonn=idj.get("twonn"), mle=idj.get("mle"))

    def gfd(gen, ae):
        for key, r in gen_eval.items():
            if os.path.basename(os.path.dirname(key)) == f"{gen}-{ae}" or f"/{gen}-{ae}/" in key:
                return r
        return {}

    # ---- Table 1 style.
    L += ["## Table 1 style: autoencoders", "",
          "Paper Table 1: rFID, gFID, equivariance error (rotation, scale). Here: PSNR / SSIM of reconstructions "
          "(`evaluate.py recon`, posterior sample, uint8), gFD-probe of each generator trained on the latents "
          "(lower is better; see [the probe](#the-probe-offline-generation-metric)), equivariance error Delta "
          "(`evaluate.py equivariance`, App. C.3, posterior mean) and TwoNN intrinsic dimension of the latents "
          "(`evaluate.py id`, Table 5).", "",
          "| Autoencoder | PSNR | SSIM | gFD-probe DiT | gFD-probe SiT | gFD-probe MaskGIT | Eq. err. rot | "
          "Eq. err. scale | ID (TwoNN) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for ae, label in DEMO_AUTOENCODERS:
        r = ae_rows[ae]
        if not r["run"] and r["psnr"] is None:
            missing.append(f"autoencoder {ae}: no run folder ae/{ae}")
        kind = ae.split("-")[0]
        cells = [gfd(g, ae).get("gfd_probe") if k == kind else "-" for g, _, k in DEMO_GENERATORS]
        L.append(f"| {label} (`{ae}`) | {_fmt(r['psnr'])} | {_fmt(r['ssim'])} | " + " | ".join(
            _fmt(c) for c in cells) + f" | {_fmt(r['rot'])} | {_fmt(r['scale'])} | "
            f"{_fmt(r['twonn']) if kind == 'kl' else '-'} |")
    # The paper's claims, checked on these numbers (lower is better for all four).
    checks = []
    for kind, base, others in (("kl", "kl-base", ("kl-plain", "kl-eq")), ("vq", "vq-base", ("vq-eq",))):
        eq = f"{kind}-eq"
        cols = [("rot", "Eq. err. rot"), ("scale", "Eq. err. scale")] + ([("twonn", "ID (TwoNN)")] if kind == "kl" else [])
        for key, name in cols:
            vals = {ae: ae_rows[ae][key] for ae in (base,) + others}
            if all(v is not None for v in vals.values()):
                lowest = min(vals, key=vals.get) == eq
                checks.append(f"{name}, {kind.upper()}: " + ", ".join(f"`{a}` {_fmt(v)}" for a, v in vals.items())
                              + f": EQ-VAE lowest: {'yes' if lowest else 'no'}")
        for gen, gname, k in DEMO_GENERATORS:
            if k != kind:
                continue
            vals = {ae: gfd(gen, ae).get("gfd_probe") for ae in (base,) + others}
            if all(v is not None for v in vals.values()):
                lowest = min(vals, key=vals.get) == eq
                checks.append(f"gFD-probe {gname}: " + ", ".join(f"`{a}` {_fmt(v)}" for a, v in vals.items())
                              + f": EQ-VAE lowest: {'yes' if lowest else 'no'}")
    if checks:
        L += ["", "The paper's direction (EQ-VAE lowers equivariance error, intrinsic dimension and gFID), on these "
              "numbers:", ""] + [f"- {c}" for c in checks]
    L += ["", "Paper (ImageNet 256, for the direction of the effect): SD-VAE rFID 0.90, gFID 43.8, Eq. err. "
          "0.89 / 0.69 -> EQ-VAE 0.82, 34.1, 0.56 / 0.43; VQ-GAN 7.94, 6.8, 1.35 / 1.22 -> EQ-VAE 7.54, 5.9, "
          "0.64 / 0.55; ID SD-VAE 62.2 -> EQ-VAE (R+S) 39.4.", ""]

    # ---- Table 2 style.
    L += ["## Table 2 style: generators at equal steps", "",
          "Paper Table 2: gFID of each generator trained for the same iterations on the baseline and the EQ-VAE "
          "latents. Here: same steps, seeds and data for every latent space; gFD-probe and the probe's accuracy "
          "on the class each sample was asked for (class-conditional samples; chance 0.1), with the floor: "
          "gFD-probe of as many real held-out images.", "",
          "| Generator | Autoencoder | steps | final train loss | gFD-probe | probe acc. | real-image floor |",
          "|---|---|---|---|---|---|---|"]
    for gen, gname, kind in DEMO_GENERATORS:
        for ae, label in DEMO_AUTOENCODERS:
            if not ae.startswith(kind):
                continue
            rows = _read_jsonl(os.path.join(demo_dir, "gen", f"{gen}-{ae}", "metrics.jsonl"))
            step, loss = _last(rows, "loss")
            r = gfd(gen, ae)
            if not r and steps.get(f"sample-{gen}-{ae}", {}).get("status") != "missing":   # (else listed below)
                missing.append(f"{gname} on {ae}: no probe-eval result ({step_ref(f'sample-{gen}-{ae}')})")
            L.append(f"| {gname} | {label} (`{ae}`) | {_fmt(step)} | {_fmt(loss)} | {_fmt(r.get('gfd_probe'))} | "
                     f"{_fmt(r.get('probe_accuracy'))} | {_fmt(r.get('gfd_probe_real_floor'))} |")
    L += ["", "Paper (gFID without guidance, baseline -> EQ-VAE): DiT-B/2 43.5 -> 34.1, SiT-B/2 33.0 -> 31.2 "
          "(400K steps); MaskGIT 6.80 -> 5.91 (300 epochs).", ""]

    # ---- The probe.
    L += ["## The probe (offline generation metric)", ""]
    if probe:
        L += [f"A {probe.get('feature_dim')}-feature CNN trained {probe.get('steps')} steps (seed {probe.get('seed')}) "
              f"on {probe.get('num_images')} synthetic images: accuracy {_fmt(probe.get('train_accuracy'))} on "
              f"training images, {_fmt(probe.get('heldout_accuracy'))} on {probe.get('num_ref')} held-out images "
              f"(seed {probe.get('seed', 0) + 1}), whose feature mean and covariance are the gFD reference "
              f"({step_ref('probe-train')}). gFD-probe is the Frechet distance of FID "
              "(`evaluate.frechet_distance`) in these features; it is not comparable with FID values.", ""]
    else:
        missing.append("probe: probe/probe.json absent")
        L += ["n/a: the probe was not trained.", ""]

    # ---- Figures.
    L += ["## Figures", ""]

    def figure(path, caption):
        if os.path.isfile(path):
            figures.append(path)
            return [f"![{caption}]({rel(path)})", "", f"*{caption}*", ""]
        missing.append(f"figure: {caption} ({os.path.relpath(path, demo_dir)} absent)")
        return [f"(missing: {caption})", ""]

    L += ["### Figure 2 style: equivariance previews", "",
          "Rows (finetune_eqvae.py's preview at the last step): x, D(E(x)), tau x, D(tau E(x)) with tau = scale 1/2 "
          "and a quarter turn. EQ-VAE makes the last row match the third.", ""]
    for ae, label in DEMO_AUTOENCODERS:
        pngs = sorted(glob.glob(os.path.join(demo_dir, "ae", ae, "previews", "*.png")))
        L += figure(pngs[-1] if pngs else os.path.join(demo_dir, "ae", ae, "previews", "(none).png"),
                    f"{label}: D(tau E(x)) preview")
    L += ["### Latent PCA (Figure 1 style) and power spectra", ""]
    spectra = {}
    for ae, label in DEMO_AUTOENCODERS:
        if not ae.startswith("kl"):
            continue
        lat = os.path.join(demo_dir, "eval", ae, "latents")
        L += figure(os.path.join(lat, "pca_rgb.png"), f"{label}: images (top) and latent PCA as RGB (bottom)")
        npz = os.path.join(lat, "power_spectrum.npz")
        if os.path.isfile(npz):
            s = np.load(npz)
            keep = s["freqs"] > 0                              # frequency 0 is ~0 (the mean is removed per map)
            spectra[ae] = (s["freqs"][keep], s["power"][keep] / max(float(s["power"][keep].sum()), 1e-30))
    if spectra:
        path = os.path.join(fig_dir, "spectra.png")
        plot_curves(path, spectra, ylabel="log10 power (normalised)")
        L += figure(path, "Radially averaged power spectrum of the latents (normalised to sum 1): "
                    "more high-frequency power = a less smooth latent space")
    else:
        missing.append("figure: spectra (no eval/*/latents/power_spectrum.npz)")
    L += ["### Samples", ""]
    for gen, gname, kind in DEMO_GENERATORS:
        for ae, label in DEMO_AUTOENCODERS:
            if ae.startswith(kind):
                pngs = sorted(glob.glob(os.path.join(demo_dir, "samples", f"{gen}-{ae}", "*.png")))
                L += figure(pngs[0] if pngs else os.path.join(demo_dir, "samples", f"{gen}-{ae}", "(none).png"),
                            f"{gname} on {label}: class-conditional samples")
    L += ["### Loss curves", ""]
    # Autoencoders: the L1 reconstruction term (the total adds an adaptive-weight GAN term that jumps), the
    # fine-tunes drawn after their base's last step; under EQ-VAE half the targets are transformed images.
    for kind, name in (("kl", "KL-VAE"), ("vq", "VQ-GAN")):
        for key, caption in (("rec", f"{name}: L1 reconstruction loss (`rec`), base then fine-tunes"),
                             ("eq_err_rot", f"{name}: equivariance error (rotation) on a fixed batch during training"),
                             ("eq_err_scale", f"{name}: equivariance error (scale) on a fixed batch during training")):
            curves, offset = {}, 0
            for ae, label in DEMO_AUTOENCODERS:
                if not ae.startswith(kind):
                    continue
                rows = _read_jsonl(os.path.join(demo_dir, "ae", ae, "metrics.jsonl"))
                c = _curve(rows, key)
                if ae.endswith("-base"):
                    offset = max([r.get("step", 0) for r in rows] + [0])
                elif c is not None:
                    c = (c[0] + offset, c[1])
                if c is not None and len(c[0]):
                    curves[ae] = c
            path = os.path.join(fig_dir, f"{key}-{kind}.png")
            if curves:
                plot_curves(path, curves, xlabel="step (fine-tunes start at the base's last step)",
                            ylabel=f"log10 {key}")
            L += figure(path, caption)
    for gen, gname, kind in DEMO_GENERATORS:
        curves = {}
        for ae, label in DEMO_AUTOENCODERS:
            if ae.startswith(kind):
                c = _curve(_read_jsonl(os.path.join(demo_dir, "gen", f"{gen}-{ae}", "metrics.jsonl")), "loss")
                if c is not None and len(c[0]):
                    curves[ae] = c
        path = os.path.join(fig_dir, f"loss-{gen}.png")
        if curves:
            plot_curves(path, curves, xlabel="step", ylabel="log10 training loss")
        L += figure(path, f"{gname} training loss on each latent space (same steps, seed, data)")

    # ---- Commands and seeds.
    L += ["## Commands", "",
          "Every number above comes from these commands (seeds are in the flags: `--global-seed` of the training "
          "and sampling scripts, `--seed` of the probe; the synthetic data is a fixed function of its seed). "
          "`reused`: a previous run of demo.sh had finished the step, its outputs were kept.", "",
          "| step | status | seconds | command |", "|---|---|---|---|"]
    for name, s in steps.items():
        if s["status"] == "missing":
            missing.append(f"step {name}: {s['cmd']}")
        cmd = s["cmd"].replace("|", "\\|")
        L.append(f"| `{name}` | {s['status']} | {_fmt(s['seconds'], 4)} | `{cmd}` |")
    L += [""]

    L += ["## Missing", ""]
    missing = list(dict.fromkeys(missing))                                       # each once, in order
    L += [f"- {m}" for m in missing] if missing else ["Nothing: every table cell and figure was produced."]
    L += [""]
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(L))
    os.replace(tmp, out)
    return {"report": out, "figures": len(figures), "missing": missing, "steps": len(steps)}


#################################################################################
#                      Commands: probe-train, probe-eval, report                #
#################################################################################

def cmd_probe_train(args):
    result = train_probe(args.out, args.resolution, args.num_classes, args.num_images, args.num_ref, args.steps,
                         args.batch_size, args.lr, args.seed, log=lambda m: print(m, file=sys.stderr))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(result, f)
    report(result, [], f"probe classifier {args.out}")
    return result


def cmd_probe_eval(args):
    probe, state = load_probe(args.probe)
    results = {}
    for path in args.samples:
        images = open_images(path)
        arr = images.read(0, len(images))
        labels = None
        if path.endswith(".npz"):
            with np.load(path) as f:
                labels = f["arr_1"] if "arr_1" in f.files else None
        results[path] = probe_evaluate(probe, state, arr, labels, floor_seed=args.floor_seed)
    out = {"probe": args.probe, "results": results}
    report(out, [f"{p}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()) for p, r in results.items()],
           "gFD-probe (Frechet distance in probe features) and probe accuracy")
    return out


def cmd_report(args):
    out = write_demo_report(args.demo_dir, args.out, args.elapsed)
    report(out, out["missing"], f"demo report {out['report']}")
    return out


def add_demo_commands(sub):
    """Register probe-train, probe-eval and report on the subparsers; returns {name: handler}."""
    p = sub.add_parser("probe-train", help="train the demo's probe classifier on the synthetic classes")
    p.add_argument("--out", required=True, help="probe checkpoint (.pt); results also go to the .json beside it")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--num-images", type=int, default=2048, help="training images (SyntheticImages seed --seed)")
    p.add_argument("--num-ref", type=int, default=1000, help="held-out images (seed --seed + 1): the gFD reference")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("probe-eval", help="gFD-probe and probe accuracy of samples (offline FID stand-in)")
    p.add_argument("samples", nargs="+", help="ADM .npz (arr_0 uint8 NHWC, arr_1 labels) or image folders")
    p.add_argument("--probe", required=True, help="a probe from probe-train")
    p.add_argument("--floor-seed", type=int, default=2,
                   help="also measure as many real images of this seed (the small-sample floor)")

    p = sub.add_parser("report", help="write the demo's report.md from its results folder")
    p.add_argument("--demo-dir", required=True)
    p.add_argument("--out", default=None, help="default: DEMO_DIR/report.md")
    p.add_argument("--elapsed", type=float, default=None, help="wall seconds of the demo run so far")
    return {"probe-train": cmd_probe_train, "probe-eval": cmd_probe_eval, "report": cmd_report}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = add_demo_commands(sub)
    args = parser.parse_args(argv)
    try:
        handlers[args.command](args)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"demo.py {args.command}: {e}")


if __name__ == "__main__":
    main()
