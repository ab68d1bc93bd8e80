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
from PIL import Image

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
#   settings.json, steps.tsv      the scale and study; one line per step: name, status (ran/reused/missing), seconds,
#                                 command
#   probe/probe.pt, probe.json    the probe classifier (probe-train); photos/: the photograph crops
#   ae/<group>-s<seed>/           finetune_eqvae.py runs: metrics.jsonl, previews/*.png (0000000.png: the base),
#                                 summary.json, the exported autoencoder (the bases are assets/)
#   eval/<dataset>/<ae>/*.json    evaluate.py results (recon, equivariance; id, latents/, alignment on synthetic)
#   gen/<gen>-<ae>/               train_dit.py / train_sit.py / train_maskgit.py runs
#   curves/<gen>.json, -samples/  curves.py: gFD-probe of every EMA checkpoint of every run, and their samples
# A group is one way of making an autoencoder (the base, a fine-tune objective); its runs are its seeds.
STUDIES = {
    "paper": dict(
        title="EQ-VAE in miniature",
        groups=[("kl-base", "KL-VAE base"), ("kl-plain", "+ plain fine-tune (Table 6 control)"),
                ("kl-eq", "+ EQ-VAE"), ("vq-base", "VQ-GAN base"), ("vq-eq", "+ EQ-VAE")],
        generators=[("dit", "DiT-T/2", "kl"), ("sit", "SiT-T/2", "kl"), ("maskgit", "MaskGIT", "vq")],
        claims=[("kl-eq", "kl-plain"), ("kl-eq", "kl-base"), ("vq-eq", "vq-base")]),
    "regularizers": dict(
        title="Latent regularisers side by side, in miniature",
        groups=[("kl-base", "KL-VAE base"), ("kl-none", "+ none (plain fine-tune)"), ("kl-eq", "+ eq (EQ-VAE)"),
                ("kl-scale-eq", "+ scale-eq (Skorokhodov et al.)"), ("kl-vf", "+ vf (VA-VAE)")],
        generators=[("dit", "DiT-T/2", "kl")],
        claims=[("kl-eq", "kl-none"), ("kl-scale-eq", "kl-none"), ("kl-vf", "kl-none")]),
}
# (key, column, file, better, decimals, datasets): every number of the autoencoder table.
AE_METRICS = [("gfd_probe", "rFD-probe", "rfd", "lower", 2, ("synthetic",)),
              ("psnr", "PSNR", "recon", "higher", 1, None), ("ssim", "SSIM", "recon", "higher", 3, None),
              ("rotation", "Eq. err. rot", "equivariance", "lower", 3, None),
              ("scale", "Eq. err. scale", "equivariance", "lower", 3, None),
              ("twonn", "ID (TwoNN)", "id", "lower", 1, ("synthetic",)),
              ("dct_high_freq_latent", "DCT high-freq.", "latents", "lower", 3, ("synthetic",)),
              ("cka", "CKA to DINOv2", "alignment", "higher", 3, ("synthetic",))]
TRANSFORMS = ["rot90", "rot180", "rot270", "scale0.25", "scale0.5", "scale0.75"]


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
    """A cell of the probe and Commands text: numbers to `digits` significant figures, missing values as n/a."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def _mean_std(values):
    """(mean, std over seeds (ddof 1; 0 for one value), n) of the values that exist, or (None, None, 0)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def _cell(values, decimals):
    """'15.0 +- 0.2' over seeds, '15.0' for one value, 'n/a' for none: fixed decimals, so columns align."""
    m, s, n = _mean_std(values)
    if m is None:
        return "n/a"
    return f"{m:.{decimals}f}" + (f" ± {s:.{decimals}f}" if n > 1 else "")


def _group_runs(demo_dir, group):
    """The runs (autoencoder names) of a group, by seed: the base is one run, a fine-tune one per ae/<group>-s<k>."""
    if group.endswith("-base"):
        return [group]
    found = glob.glob(os.path.join(glob.escape(demo_dir), "ae", f"{group}-s[0-9]*"))
    found += glob.glob(os.path.join(glob.escape(demo_dir), "eval", "*", f"{group}-s[0-9]*"))
    names = {os.path.basename(p) for p in found if os.path.basename(p)[len(group) + 2:].isdigit()}
    return sorted(names, key=lambda n: int(n[len(group) + 2:]))


def _verdict(a_vals, b_vals, better, paired):
    """How often group A beats group B: per seed against the base (paired False) or seed against seed."""
    pairs = list(zip(a_vals, b_vals)) if paired else [(a, b_vals[0]) for a in a_vals]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None, "n/a"
    wins = sum((a < b) if better == "lower" else (a > b) for a, b in pairs)
    n = len(pairs)
    word = "holds" if wins == n else "reversed" if wins == 0 else "mixed"
    return wins, f"{word} ({wins}/{n} seed{'s' if n > 1 else ''})" + (" - one seed is not a claim" if n == 1 else "")


def write_demo_report(demo_dir, out=None, elapsed=None):
    """Write demo_dir/report.md (or out) from the files demo.sh produced; returns a summary dict."""
    demo_dir = os.path.abspath(demo_dir)
    out = out or os.path.join(demo_dir, "report.md")
    fig_dir = os.path.join(demo_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(out)))
    steps = _read_steps(os.path.join(demo_dir, "steps.tsv"))
    settings = _read_json(os.path.join(demo_dir, "settings.json")) or {}
    study = STUDIES[settings.get("study", "paper")]
    probe = _read_json(os.path.join(demo_dir, "probe", "probe.json"))
    datasets = [d for d in ("synthetic", "photos") if os.path.isdir(os.path.join(demo_dir, "eval", d))]
    groups = [(g, label, _group_runs(demo_dir, g)) for g, label in study["groups"]]
    groups = [(g, label, runs) for g, label, runs in groups if runs]
    figures, missing = [], []
    L = [f"# {study['title']}", ""]

    def metric(ds, ae, source, key):
        found = _read_json(os.path.join(demo_dir, "eval", ds, ae, f"{source}.json")) or {}
        if source == "rfd":                                   # probe-eval's output: {"results": {path: {...}}}
            found = next(iter(found.get("results", {}).values()), {})
        return found.get(key)

    curves = {gen: json.load(open(p)) for gen, _, _ in study["generators"]
              for p in [os.path.join(demo_dir, "curves", f"{gen}.json")] if os.path.isfile(p)}

    def gfd_rows(gen, ae):
        return curves.get(gen, {}).get(f"{gen}-{ae}", [])

    def figure(path, caption):
        if os.path.isfile(path):
            figures.append(path)
            return [f"![{caption}]({rel(path)})", "", f"*{caption}*", ""]
        missing.append(f"figure: {caption} ({os.path.relpath(path, demo_dir)} absent)")
        return [f"(missing: {caption})", ""]

    # ---- Header: what ran, where, how long.
    ran = [s["seconds"] for s in steps.values() if s.get("seconds") is not None]
    L += ["Every stage at tiny scale on the built-in synthetic data (10 classes, 64 px), offline on CPU, with the stage "
          "scripts and flags listed under [Commands](#commands). The autoencoders are fine-tuned from the tiny bases "
          "in assets/ (the project trained them: assets/README.md), for each seed; every number is the mean ± the "
          "standard deviation over those seeds. At this scale the numbers show whether the paper's directions "
          "hold, not its values.", ""]
    L += [f"- mode: {settings.get('mode', 'n/a')}, study {settings.get('study', 'paper')}, seeds "
          f"{settings.get('seeds', 'n/a')}; generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on "
          f"{platform.node() or 'n/a'} ({os.cpu_count()} CPU(s), torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"]
    if elapsed is not None:
        L += [f"- wall time of this invocation of demo.sh (before the report): {float(elapsed):.0f} s"]
    L += [f"- compute time of all steps (each as of the run that computed it): {sum(ran):.0f} s over {len(ran)} steps",
          "- held-out images: " + ", ".join({"synthetic": "synthetic seed 3 (training draws seed 0)",
                                            "photos": "crops of scikit-image's photographs (photos/)"}[d]
                                           for d in datasets), ""]

    # ---- Table 1 style, per dataset.
    gens = study["generators"]
    for ds in datasets:
        cols = [m for m in AE_METRICS if m[5] is None or ds in m[5]]
        cols = [m for m in cols if any(metric(ds, ae, m[2], m[0]) is not None for _, _, runs in groups for ae in runs)]
        with_gen = ds == "synthetic"
        head = [c[1] for c in cols] + ([f"gFD-probe {gname}" for _, gname, _ in gens] if with_gen else [])
        L += [f"## Table 1 style: autoencoders on {ds}", ""]
        if ds == datasets[0]:
            L += ["rFD-probe: the probe's Frechet distance of the reconstructions (rFID's stand-in, a floor under "
                  "the generators' gFD-probe). PSNR / SSIM of reconstructions (`evaluate.py recon`, posterior "
                  "sample), equivariance error Delta "
                  "(`evaluate.py equivariance`, App. C.3), TwoNN intrinsic dimension of the latents (Table 5), the "
                  "share of block-DCT amplitude at high frequencies (u + v >= 8; Skorokhodov et al.), and the "
                  "gFD-probe of each generator at its last step (lower is better; [the probe](#the-probe)), one "
                  "generator per autoencoder seed.", ""]
        L += ["| Autoencoder | seeds | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
        for g, label, runs in groups:
            cells = [_cell([metric(ds, ae, c[2], c[0]) for ae in runs], c[4]) for c in cols]
            if with_gen:
                cells += [_cell([(gfd_rows(gen, ae) or [{}])[-1].get("gfd_probe") for ae in runs], 1)
                          if g.startswith(kind) else "-" for gen, _, kind in gens]
            L.append(f"| {label} (`{g}`) | {len(runs)} | " + " | ".join(cells) + " |")
        L += [""]

    # ---- The claims, seed by seed.
    L += ["## The paper's claims, seed by seed", "",
          "A claim holds when the regularised autoencoder A is better than B on every seed (against the base: each "
          "fine-tune seed against the one base; against another fine-tune: seed s against seed s); for the "
          "generators, at the last step, and how many checkpoints of the convergence curves A was ahead at.", "",
          "| claim | metric | " + " | ".join(datasets) + " |", "|---|---|" + "---|" * len(datasets)]
    runs_of = {g: runs for g, _, runs in groups}
    holds = []
    for a, b in study["claims"]:
        if a not in runs_of or b not in runs_of:
            continue
        for key, name, source, better, dec, only in AE_METRICS:
            cells = []
            for ds in datasets:
                av = [metric(ds, ae, source, key) for ae in runs_of[a]]
                bv = [metric(ds, ae, source, key) for ae in runs_of[b]]
                wins, verdict = _verdict(av, bv, better, paired=not b.endswith("-base"))
                cells.append("-" if wins is None else f"{_cell(av, dec)} vs {_cell(bv, dec)}: {verdict}")
                if wins is not None:
                    holds.append((f"{a} vs {b}", ds, name, verdict))
            if any(c != "-" for c in cells):
                L.append(f"| `{a}` {'<' if better == 'lower' else '>'} `{b}` | {name} | " + " | ".join(cells) + " |")
        for gen, gname, kind in gens:
            if not a.startswith(kind):
                continue
            last = lambda g: [(gfd_rows(gen, ae) or [{}])[-1].get("gfd_probe") for ae in runs_of[g]]
            wins, verdict = _verdict(last(a), last(b), "lower", paired=not b.endswith("-base"))
            partner = lambda i: runs_of[b][0 if b.endswith("-base") else min(i, len(runs_of[b]) - 1)]
            pts = [(x["gfd_probe"], y["gfd_probe"]) for i, ae in enumerate(runs_of[a])
                   for x, y in zip(gfd_rows(gen, ae), gfd_rows(gen, partner(i))) if x["step"] == y["step"]]
            if wins is not None:
                holds.append((f"{a} vs {b}", "synthetic", f"gFD-probe {gname}", verdict))
                ahead = sum(x < y for x, y in pts)
                L.append(f"| `{a}` < `{b}` | gFD-probe {gname} | {_cell(last(a), 1)} vs {_cell(last(b), 1)} at the "
                         f"last step: {verdict}; ahead at {ahead}/{len(pts)} checkpoints |" + " - |" * (len(datasets) - 1))
    L += ["", "Paper (ImageNet 256, for the direction): SD-VAE rFID 0.90, gFID 43.8, Eq. err. 0.89 / 0.69 -> "
          "EQ-VAE 0.82, 34.1, 0.56 / 0.43; VQ-GAN 7.94, 6.8, 1.35 / 1.22 -> EQ-VAE 7.54, 5.9, 0.64 / 0.55; ID "
          "SD-VAE 62.2 -> EQ-VAE (R+S) 39.4. Generators (gFID, no guidance): DiT-B/2 43.5 -> 34.1, SiT-B/2 33.0 -> "
          "31.2 (400K steps); MaskGIT 6.80 -> 5.91.", ""]

    # ---- Equivariance per transformation: where the scale error comes from.
    L += ["## Equivariance error per transformation", "",
          "Delta for each rotation and scale of App. C.3, mean ± std over seeds.", ""]
    for ds in datasets:
        L += [f"**{ds}**", "", "| Autoencoder | " + " | ".join(TRANSFORMS) + " |", "|---|" + "---|" * len(TRANSFORMS)]
        for g, label, runs in groups:
            L.append(f"| {label} | " + " | ".join(_cell([metric(ds, ae, "equivariance", t) for ae in runs], 3)
                                                  for t in TRANSFORMS) + " |")
        L += [""]
        per_scale = {}
        for g, label, runs in groups:
            stats = [_mean_std([metric(ds, ae, "equivariance", f"scale{s}") for ae in runs]) for s in (0.25, 0.5, 0.75)]
            if all(m is not None for m, _, _ in stats):
                per_scale[g] = ([0.25, 0.5, 0.75], [m for m, _, _ in stats], [s for _, s, _ in stats])
        path = os.path.join(fig_dir, f"scale-error-{ds}.png")
        if per_scale:
            plot_curves(path, per_scale, xlabel="scale factor s", ylabel="equivariance error", log_y=False,
                        title=f"{ds}: mean over seeds, band +-1 std")
        L += figure(path, f"Equivariance error against the scale factor on {ds}")

    # ---- Table 2 style and the convergence curves.
    L += ["## Table 2 style: generators, and their convergence", "",
          "gFD-probe of every EMA checkpoint (`curves.py`), each latent space with the same steps, seed and data; "
          "the last column is the probe's accuracy on the class each sample was asked for (chance 0.1).", ""]
    for gen, gname, kind in gens:
        by_group, table = {}, []
        for g, label, runs in groups:
            if not g.startswith(kind):
                continue
            rows_by_seed = [gfd_rows(gen, ae) for ae in runs if gfd_rows(gen, ae)]
            if not rows_by_seed:
                missing.append(f"{gname} on {g}: no curves/{gen}.json entry ({gen}-{runs[0]})")
                continue
            steps_ = [r["step"] for r in rows_by_seed[0]]
            vals = [[r.get("gfd_probe") for r in rows] for rows in rows_by_seed if len(rows) == len(steps_)]
            table.append(f"| {label} | " + " | ".join(_cell([v[i] for v in vals], 1) for i in range(len(steps_)))
                         + f" | {_cell([rows[-1].get('probe_accuracy') for rows in rows_by_seed], 3)} |")
            stats = [_mean_std([v[i] for v in vals]) for i in range(len(steps_))]
            by_group[g] = (steps_, [m for m, _, _ in stats], [s for _, s, _ in stats])
        if table:
            L += [f"**{gname}**", "", f"| Autoencoder | " + " | ".join(f"step {x}" for x in steps_) + " | accuracy |",
                  "|---|" + "---|" * (len(steps_) + 1)] + table + [""]
        path = os.path.join(fig_dir, f"convergence-{gen}.png")
        if by_group:
            plot_curves(path, by_group, xlabel="training step", ylabel="gFD-probe", log_y=False,
                        title=f"{gname}: gFD-probe of the EMA weights" + (", band +-1 std over seeds"
                                                                           if settings.get("study") == "regularizers" else ""))
        L += figure(path, f"{gname}: gFD-probe against training steps on each latent space (Figure 1 right)")
    L += ["Paper: DiT-XL/2 reaches the baseline's gFID about 7x sooner on EQ-VAE latents (Figure 1 right).", ""]

    # ---- Pictures: previews, latent PCA, spectra, samples.
    L += ["## Figures", "", "### Figure 2 style: equivariance previews", "",
          "The same held-out images for every model; rows x, D(E(x)), tau x, D(E(tau x)), D(tau E(x)) with tau = "
          "scale 1/2 and a quarter turn. EQ-VAE makes the last row look like tau x. Seed-0 fine-tunes at their last "
          "step; the base's is step 0 of a fine-tune of it.", ""]
    for g, label, runs in groups:
        kind = g.split("-")[0]
        if g.endswith("-base"):
            first = sorted(glob.glob(os.path.join(glob.escape(demo_dir), "ae", f"{kind}-*-s*", "previews", "0000000.png")))
            png = first[0] if first else os.path.join(demo_dir, "ae", f"{kind}-(none)", "previews", "0000000.png")
        else:
            pngs = sorted(glob.glob(os.path.join(glob.escape(demo_dir), "ae", runs[0], "previews", "*.png")))
            png = pngs[-1] if pngs else os.path.join(demo_dir, "ae", runs[0], "previews", "(none).png")
        L += figure(png, f"{label}: Figure 2 rows")
    L += ["### Latent PCA (Figure 1 style), side by side", ""]
    pca, spectra, dct = [], {}, {}
    for g, label, runs in groups:
        npz = os.path.join(demo_dir, "eval", "synthetic", runs[0], "latents", "power_spectrum.npz")
        if not os.path.isfile(npz):
            continue
        with np.load(npz) as f:
            if "pca_rgb" in f.files:
                if not pca:
                    pca.append(("images", torch.from_numpy(f["images"])))
                pca.append((label, torch.from_numpy(f["pca_rgb"])))
            keep = f["freqs"] > 0                                  # frequency 0 is ~0 (the mean is removed per map)
            spectra[g] = (f["freqs"][keep], f["power"][keep] / max(float(f["power"][keep].sum()), 1e-30))
            if "dct_latent" in f.files:
                dct.setdefault("RGB", (np.arange(1, len(f["dct_rgb"])), f["dct_rgb"][1:]))
                dct[g] = (np.arange(1, len(f["dct_latent"])), f["dct_latent"][1:])
    path = os.path.join(fig_dir, "latent-pca.png")
    if pca:
        size = pca[0][1].shape[-1]
        rows = [F.interpolate(t.float(), size=(size, size), mode="nearest") for _, t in pca]
        data.save_image_grid(torch.cat(rows) * 2 - 1, path, nrow=len(rows[0]), row_labels=[n for n, _ in pca])
    L += figure(path, "Held-out images (top) and the top-3 principal components of each model's latents as RGB "
                "(one colour scale for all: +-2.5 std), 128 px inputs, 16 x 16 latents")
    path = os.path.join(fig_dir, "spectra.png")
    if spectra:
        plot_curves(path, spectra, ylabel="log10 power (normalised)")
    L += figure(path, "Radially averaged power spectrum of the latents (normalised to sum 1)")
    path = os.path.join(fig_dir, "dct-spectra.png")
    if dct:
        plot_curves(path, dct, xlabel="zigzag index (8 x 8 block DCT)", ylabel="log10 amplitude / DC")
    L += figure(path, "Block-DCT amplitude of the latents and of the images (Skorokhodov et al.): a latent "
                "closer to the RGB curve has fewer spurious high frequencies")
    L += ["### Samples at the last checkpoint", ""]
    for gen, gname, kind in gens:
        for g, label, runs in groups:
            if g.startswith(kind) and gfd_rows(gen, runs[0]):
                L += figure(os.path.splitext(gfd_rows(gen, runs[0])[-1].get("samples", ""))[0] + ".png",
                            f"{gname} on {label}: class-conditional samples")

    # ---- The probe, commands, what is missing.
    L += ["## The probe", ""]
    if probe:
        L += [f"A {probe.get('feature_dim')}-feature CNN trained {probe.get('steps')} steps on "
              f"{probe.get('num_images')} synthetic images: accuracy {_fmt(probe.get('train_accuracy'))} on training "
              f"images, {_fmt(probe.get('heldout_accuracy'))} on {probe.get('num_ref')} held-out images, whose feature "
              "mean and covariance are the gFD reference. gFD-probe is FID's Frechet distance "
              "(`evaluate.frechet_distance`) in these features; it ranks latent spaces here and is not comparable "
              "with FID values.", ""]
    else:
        missing.append("probe: probe/probe.json absent")
        L += ["n/a: the probe was not trained.", ""]
    L += ["## Commands", "",
          "Every number above comes from these commands (seeds are in the flags; the synthetic data is a fixed "
          "function of its seed). `reused`: a previous run of demo.sh had finished the step.", "",
          "| step | status | seconds | command |", "|---|---|---|---|"]
    for name, s in steps.items():
        if s["status"] == "missing":
            missing.append(f"step {name}: {s['cmd']}")
        L.append(f"| `{name}` | {s['status']} | {_fmt(s['seconds'], 4)} | `{s['cmd'].replace('|', chr(92) + '|')}` |")
    L += ["", "## Missing", ""]
    missing = list(dict.fromkeys(missing))
    L += [f"- {m}" for m in missing] if missing else ["Nothing: every table cell and figure was produced."]
    L += [""]
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(L))
    os.replace(tmp, out)
    return {"report": out, "figures": len(figures), "missing": missing, "steps": len(steps), "claims": holds}


#################################################################################
#              Real photographs: crops of the images scikit-image ships         #
#################################################################################
# The synthetic images are the project's own; the claims also need photographs it did not make, held out from
# every training run. scikit-image bundles a few (astronaut, coffee, the Hubble deep field, ...); random square
# crops of them, area-resized, make an ImageFolder (one subfolder per photograph). Optional: the demo notes its
# absence when scikit-image is not installed (it is a test requirement, not a run-time one).
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
          "stereo_motorcycle", "camera", "moon", "coins", "grass", "gravel", "brick", "clock")


def make_photo_set(out, resolution=64, crops=16, seed=0):
    """out/<photo>/<k>.png: `crops` random square crops (side >= a third of the short side) of each photograph
    (both views of stereo_motorcycle; grayscale ones as gray RGB), INTER_AREA-resized to resolution. Returns the
    number of images."""
    try:
        import skimage.data
    except ImportError:
        raise OSError("the photograph set needs scikit-image (pip install scikit-image)") from None
    rng = np.random.default_rng(seed)
    count = 0
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        views = list(img[:2]) if name == "stereo_motorcycle" else [img]           # (left, right, disparity)
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for k in range(crops):
            arr = np.asarray(data.to_rgb8(Image.fromarray(views[k % len(views)])))
            h, w = arr.shape[:2]
            side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            small = data.area_resize(arr[y:y + side, x:x + side], resolution, resolution)
            Image.fromarray(small).save(os.path.join(out, name, f"{k:03d}.png"))
            count += 1
    return count


#################################################################################
#                  Commands: probe-train, probe-eval, photos, report            #
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


def cmd_photos(args):
    out = {"photos": args.out, "num_images": make_photo_set(args.out, args.resolution, args.crops, args.seed),
           "sources": [f"skimage.data.{n}" for n in PHOTOS]}
    report(out, [], f"photograph crops in {args.out}")
    return out


def cmd_report(args):
    out = write_demo_report(args.demo_dir, args.out, args.elapsed)
    report(out, out["missing"], f"demo report {out['report']}")
    return out


def add_demo_commands(sub):
    """Register probe-train, probe-eval, photos and report on the subparsers; returns {name: handler}."""
    p = sub.add_parser("probe-train", help="train the demo's probe classifier on the synthetic classes")
    p.add_argument("--out", required=True, help="probe checkpoint (.pt); results also go to the .json beside it")
    p.add_argument("--resolution", type=int, default=64, help="image side")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic classes")
    p.add_argument("--num-images", type=int, default=2048, help="training images (SyntheticImages seed --seed)")
    p.add_argument("--num-ref", type=int, default=1000, help="held-out images (seed --seed + 1): the gFD reference")
    p.add_argument("--steps", type=int, default=300, help="Adam steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="of the training images and the initialisation")

    p = sub.add_parser("probe-eval", help="gFD-probe and probe accuracy of samples (offline FID stand-in)")
    p.add_argument("samples", nargs="+", help="ADM .npz (arr_0 uint8 NHWC, arr_1 labels) or image folders")
    p.add_argument("--probe", required=True, help="a probe from probe-train")
    p.add_argument("--floor-seed", type=int, default=2,
                   help="also measure as many real images of this seed (the small-sample floor)")

    p = sub.add_parser("photos", help="crops of scikit-image's photographs, a held-out set of real images")
    p.add_argument("--out", required=True, help="folder to write (an ImageFolder)")
    p.add_argument("--resolution", type=int, default=64, help="side of the crops, after resizing")
    p.add_argument("--crops", type=int, default=16, help="crops per photograph")
    p.add_argument("--seed", type=int, default=0, help="of the crop positions and sizes")

    p = sub.add_parser("report", help="write the demo's report.md from its results folder")
    p.add_argument("--demo-dir", required=True, help="the folder demo.sh wrote (DEMO_DIR)")
    p.add_argument("--out", default=None, help="default: DEMO_DIR/report.md")
    p.add_argument("--elapsed", type=float, default=None, help="wall seconds of the demo run so far")
    return {"probe-train": cmd_probe_train, "probe-eval": cmd_probe_eval, "photos": cmd_photos, "report": cmd_report}


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
