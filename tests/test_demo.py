"""demo.sh and demo.py's commands: the probe metric, the report writer, the quick demo end to end."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

demo_eval = demo  # the demo's probe metric and report writer live in demo.py


# Every test here runs tiny networks in-process: one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A probe trained briefly (60 steps, 512 images): enough to tell the classes apart well above chance."""
    path = str(tmp_path_factory.mktemp("probe") / "probe.pt")
    torch.set_num_threads(1)
    result = demo_eval.train_probe(path, num_images=512, num_ref=300, steps=60, batch_size=32, seed=0,
                                   log=lambda m: None)
    model, state = demo_eval.load_probe(path)
    return path, result, model, state


def uint8_images(x):
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), the ADM sample layout."""
    return data.to_uint8(x).permute(0, 2, 3, 1).numpy()


#################################################################################
#                        The probe: gFD-probe and accuracy                      #
#################################################################################

def test_probe_learns_the_classes(probe):
    """Held-out accuracy (other seed) far above chance (0.1): the synthetic classes are easy for a CNN."""
    _, result, _, _ = probe
    assert result["heldout_accuracy"] > 0.6, result


def test_probe_training_is_deterministic(probe, tmp_path):
    """The same seed gives the same probe, bit for bit (single process, fixed thread count)."""
    path, _, model, _ = probe
    again = str(tmp_path / "again.pt")
    demo_eval.train_probe(again, num_images=512, num_ref=300, steps=60, batch_size=32, seed=0, log=lambda m: None)
    other, _ = demo_eval.load_probe(again)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_gfd_real_images_near_floor_noise_far(probe):
    """Real images of an unseen seed score near the real-image floor; noise images far above it; accuracy follows
    the labels (right labels: high; labels shifted by one class: low)."""
    _, _, model, state = probe
    x, y = demo_eval.synthetic_tensor(200, 64, seed=7)
    real = demo_eval.probe_evaluate(model, state, uint8_images(x), y.numpy(), floor_seed=2)
    g = torch.Generator().manual_seed(0)
    noise = demo_eval.probe_evaluate(model, state, uint8_images(torch.rand(200, 3, 64, 64, generator=g) * 2 - 1))
    wrong = demo_eval.probe_evaluate(model, state, uint8_images(x), (y.numpy() + 1) % 10)
    assert real["gfd_probe"] < 3 * real["gfd_probe_real_floor"] + 1e-3, real
    assert noise["gfd_probe"] > 10 * real["gfd_probe"], (noise, real)
    assert real["probe_accuracy"] > 0.6 and wrong["probe_accuracy"] < 0.2, (real, wrong)


def test_gfd_is_frechet_distance_of_probe_features(probe):
    """gFD-probe equals the closed form ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), computed here with scipy."""
    import scipy.linalg
    _, _, model, state = probe
    x, _ = demo_eval.synthetic_tensor(120, 64, seed=3)
    u8 = uint8_images(x)
    got = demo_eval.probe_evaluate(model, state, u8)["gfd_probe"]
    xf = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        f = model.forward_features(xf).double().numpy()
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma @ state["ref_sigma"]).real
    want = float(((mu - state["ref_mu"]) ** 2).sum() + np.trace(sigma + state["ref_sigma"] - 2 * covmean))
    assert abs(got - want) < 1e-3 * max(1.0, abs(want)), (got, want)


def test_probe_eval_command_reads_npz_labels(probe, tmp_path, capsys):
    """probe-eval on an ADM .npz (arr_0 uint8 NHWC, arr_1 labels) prints one JSON object with the accuracy."""
    path, _, _, _ = probe
    x, y = demo_eval.synthetic_tensor(40, 64, seed=5)
    npz = str(tmp_path / "samples.npz")
    np.savez(npz, arr_0=uint8_images(x), arr_1=y.numpy())
    demo_eval.main(["probe-eval", npz, "--probe", path])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = out["results"][npz]
    assert r["num_samples"] == 40 and r["probe_accuracy"] > 0.6


def test_missing_probe_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="probe-train"):
        demo_eval.load_probe(str(tmp_path / "nope.pt"))


#################################################################################
#                  The report writer on a hand-made results folder               #
#################################################################################

def test_report_tables_hold_the_measured_numbers(tmp_path):
    """Numbers written into the demo layout by hand appear in the right rows as mean +- std over seeds (numpy's,
    ddof 1), the claims count the seeds that hold, absent cells are n/a and absent figures are listed."""
    d = tmp_path / "demo"

    def put(rel, obj):
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj) + "\n")

    put("settings.json", {"mode": "full", "study": "paper", "seeds": [0, 1]})
    put("eval/synthetic/kl-base/recon.json", {"psnr": 20.0, "ssim": 0.5})
    put("eval/synthetic/kl-base/equivariance.json", {"rotation": 0.9, "scale": 0.7, "scale0.25": 0.8, "scale0.5": 0.7,
                                                      "scale0.75": 0.6})
    psnr, rot = [23.456, 24.5], [0.111, 0.95]        # seed 1's rotation error is worse than the base's
    for s_, (p_, r_) in enumerate(zip(psnr, rot)):
        put(f"eval/synthetic/kl-eq-s{s_}/recon.json", {"psnr": p_, "ssim": 0.789})
        put(f"eval/synthetic/kl-eq-s{s_}/equivariance.json", {"rotation": r_, "scale": 0.222})
    put("eval/synthetic/kl-eq-s0/id.json", {"twonn": 12.5})
    rows = lambda gfd: [{"step": s_, "gfd_probe": g, "probe_accuracy": 0.5} for s_, g in zip((10, 20), gfd)]
    put("curves/dit.json", {"dit-kl-base": rows([9.0, 8.0]), "dit-kl-eq-s0": rows([7.0, 4.25])})
    (d / "steps.tsv").write_text("recon-kl-eq\tran\t12\tpython3 evaluate.py recon --vae X\n"
                                 "recon-kl-eq\treused\t0\tpython3 evaluate.py recon --vae X\n"
                                 "photos\tmissing\t0\tdemo.py photos: scikit-image is not installed\n")
    out = demo_eval.write_demo_report(str(d))
    text = (d / "report.md").read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| + EQ-VAE (`kl-eq`)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Autoencoder | seeds | PSNR | SSIM | rot | scale | ID | gFD DiT | gFD SiT | gFD MaskGIT
    m, sd = np.mean(psnr), np.std(psnr, ddof=1)
    assert cells[1:4] == ["2", f"{m:.1f} ± {sd:.1f}", "0.789 ± 0.000"], cells
    assert cells[4] == f"{np.mean(rot):.3f} ± {np.std(rot, ddof=1):.3f}" and cells[6] == "12.5", cells
    assert cells[7:] == ["4.2", "n/a", "-"], cells
    base = next(ln for ln in text.splitlines() if ln.startswith("| KL-VAE base (`kl-base`)"))
    assert [c.strip() for c in base.strip("|").split("|")][1:4] == ["1", "20.0", "0.500"]
    # Claims: each fine-tune seed against the one base.
    claim = lambda metric: next(ln for ln in text.splitlines() if ln.startswith("| `kl-eq`") and f"| {metric} |" in ln
                                and "kl-base" in ln)
    assert "holds (2/2 seeds)" in claim("PSNR") and "mixed (1/2 seeds)" in claim("Eq. err. rot")
    put("curves/dit.json", {"dit-kl-base": rows([9.0, 8.0]), "dit-kl-eq-s0": rows([7.0, 4.25]),
                            "dit-kl-eq-s1": rows([9.5, 7.0])})  # seed 1 behind at step 10, ahead at step 20
    demo_eval.write_demo_report(str(d))
    text = (d / "report.md").read_text()
    assert "holds (2/2 seeds)" in claim("gFD-probe DiT-T/2") and "ahead at 3/4 checkpoints" in claim("gFD-probe DiT-T/2")
    put("curves/dit.json", {"dit-kl-base": rows([9.0, 8.0]), "dit-kl-eq-s0": rows([7.0, 4.25])})
    demo_eval.write_demo_report(str(d))
    text = (d / "report.md").read_text()
    # Table 2: every checkpoint of the curve.
    t2 = next(ln for ln in text.splitlines() if ln.startswith("| + EQ-VAE | 7.0"))
    assert [c.strip() for c in t2.strip("|").split("|")][1:] == ["7.0", "4.2", "0.500"], t2
    # The step ran once (12 s) and was reused later: the Commands table keeps the seconds of the run that made it.
    assert re.search(r"\| `recon-kl-eq` \| reused \| 12 \|", text), text
    assert any("photos" in m for m in out["missing"]) and any("latent-pca" in m for m in out["missing"])
    assert (d / "figures" / "convergence-dit.png").is_file() and (d / "figures" / "scale-error-synthetic.png").is_file()


#################################################################################
#                        demo.sh: failures, quick run, reuse                     #
#################################################################################

def run_demo(demo_dir, *args, env=None, timeout=600):
    # PYTHON: this test's own interpreter (from a virtual environment that is not activated, python3 is another)
    e = dict(os.environ, DEMO_DIR=str(demo_dir), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
             **{"PYTHON": sys.executable, **(env or {})})
    return subprocess.run(["bash", os.path.join(ROOT, "demo.sh"), *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)


def test_failing_step_stops_the_demo_naming_it(tmp_path):
    """A command that fails stops demo.sh with 'demo: step NAME failed'; a finished step is skipped first."""
    r = run_demo(tmp_path / "d", "--quick", env={"PYTHON": "false"})
    assert r.returncode != 0 and "demo: step probe-train failed" in r.stderr, r.stderr
    (tmp_path / "d" / "probe").mkdir(parents=True, exist_ok=True)
    (tmp_path / "d" / "probe" / "probe.pt").write_bytes(b"")          # the probe step's marker: now reused
    r = run_demo(tmp_path / "d", "--quick", env={"PYTHON": "false"})
    assert "[probe-train] reused" in r.stdout and "demo: step ae-kl-eq-s0 failed" in r.stderr, (r.stdout, r.stderr)
    assert not (tmp_path / "d" / "report.md").exists()


def test_unknown_argument_is_refused(tmp_path):
    r = run_demo(tmp_path / "d", "--full-speed")
    assert r.returncode == 2 and "unknown argument" in r.stderr


def test_quick_demo_writes_every_table_and_figure(tmp_path):
    """The CI variant end to end (a few steps per stage, ~3 minutes on 2 busy cores), then a rerun that reuses it."""
    d = tmp_path / "demo"
    r = run_demo(d, "--quick")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = (d / "report.md").read_text()
    for heading in ("## Table 1 style: autoencoders on synthetic", "## Table 1 style: autoencoders on photos",
                    "## The paper's claims", "## Equivariance error per transformation", "## Table 2 style",
                    "### Figure 2 style", "### Latent PCA", "### Samples", "## The probe", "## Commands", "## Missing"):
        assert heading in text, heading
    assert "Nothing: every table cell and figure was produced." in text, text[text.index("## Missing"):]

    # Every linked figure exists; the expected ones are all there.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for link in links:
        assert (d / link).is_file(), link
    names = set(links)
    # Previews: the bases at step 0 of a fine-tune of them, the fine-tunes at their last step; the same images.
    for ae, step in (("kl-eq-s0", 0), ("kl-eq-s0", 2), ("kl-plain-s0", 2), ("vq-eq-s0", 0), ("vq-eq-s0", 2)):
        assert f"ae/{ae}/previews/{step:07d}.png" in names, ae
    for fig in ("latent-pca", "spectra", "dct-spectra", "scale-error-synthetic", "scale-error-photos",
                "convergence-dit", "convergence-sit", "convergence-maskgit"):
        assert f"figures/{fig}.png" in names, fig
    for gen, aes in (("dit", ("kl-base", "kl-plain-s0", "kl-eq-s0")), ("maskgit", ("vq-base", "vq-eq-s0"))):
        for ae in aes:
            assert any(n.startswith(f"curves/{gen}-samples/{gen}-{ae}/") for n in names), (gen, ae)

    # Table 1: numbers for PSNR, SSIM and both equivariance errors of every autoencoder, on both datasets.
    for ae in ("kl-base", "kl-plain", "kl-eq", "vq-base", "vq-eq"):
        for row in [ln for ln in text.splitlines() if f"(`{ae}`) |" in ln]:
            cells = [c.strip() for c in row.strip("|").split("|")]
            for i in (2, 3, 4, 5):
                float(cells[i])
    # Commands: every step that ran is listed with its command line.
    assert re.search(r"\| `ae-kl-eq-s0` \| ran \| [0-9.]+ \| `\S*python\S* finetune_eqvae\.py --preset tiny", text)

    # A second run reuses every finished step and still writes the report.
    r2 = run_demo(d, "--quick")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "[ae-kl-eq-s0] reused" in r2.stdout and "[train-dit-kl-eq-s0] reused" in r2.stdout
    assert not re.search(r"demo: \[(ae|train|recon|equivariance|curves)-[^\]]*\] python", r2.stdout), r2.stdout
    assert (d / "report.md").is_file()


def test_regularizer_study_at_toy_size(tmp_path):
    """demo.sh --study regularizers: base + eq, scale-eq, vf, none on the same data and seed, DiT on each; one report
    with every regulariser's row, the DINOv2 alignment column and the convergence curves."""
    d = tmp_path / "study"
    r = run_demo(d, "--quick", "--study", "regularizers", env={"DEMO_PHOTO_CROPS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = (d / "report.md").read_text()
    assert text.startswith("# Latent regularisers side by side")
    for g in ("kl-base", "kl-none", "kl-eq", "kl-scale-eq", "kl-vf"):
        row = next(ln for ln in text.splitlines() if f"(`{g}`) |" in ln)
        float(row.strip("|").split("|")[2])
    assert "CKA to DINOv2" in text and "`kl-vf` < `kl-none`" in text and "figures/convergence-dit.png" in text
    assert os.path.isfile(d / "eval" / "synthetic" / "kl-vf-s0" / "alignment.json")
    assert "Nothing: every table cell and figure was produced." in text, text[text.index("## Missing"):]
    bad = run_demo(d, "--study", "nothing")
    assert bad.returncode == 2 and "--study takes" in bad.stderr


def test_convergence_curves_of_a_run_with_three_checkpoints(probe, tmp_path):
    """curves.py samples every EMA export of a run with its family's sampler and scores it; one curve per run."""
    import curves
    import train_dit
    run = train_dit.main(train_dit.get_args(["--preset", "tiny", "--num-images", "16", "--global-batch-size", "4",
                                             "--max-steps", "6", "--ckpt-every", "2", "--results-dir", str(tmp_path),
                                             "--exp-name", "dit"]))
    path, _, _, _ = probe
    table = curves.main(curves.get_args([run, "--metric", "probe", "--probe", path, "--num-samples", "8",
                                         "--out", str(tmp_path / "curve"), "--", "--preset", "tiny",
                                         "--num-sampling-steps", "2"]))
    rows = table["dit"]
    assert [r["step"] for r in rows] == [2, 4, 6] and all(np.isfinite(r["gfd_probe"]) for r in rows)
    # each point is the probe metric of that checkpoint's own samples
    import demo
    model, state = demo.load_probe(path)
    npz = [f for f in sorted(os.listdir(tmp_path / "curve-samples" / "dit")) if f.endswith(".npz")]
    assert len(npz) == 3
    with np.load(tmp_path / "curve-samples" / "dit" / npz[0]) as f:
        direct = demo.probe_evaluate(model, state, f["arr_0"], f["arr_1"])
    assert direct["gfd_probe"] in [r["gfd_probe"] for r in rows]
    saved = json.load(open(tmp_path / "curve.json"))
    assert [r["step"] for r in saved["dit"]] == [2, 4, 6] and os.path.getsize(tmp_path / "curve.png") > 1000


def test_photo_set_is_crops_of_the_shipped_photographs(tmp_path):
    """demo.py photos: per photograph a folder of INTER_AREA-resized square crops; the same seed, the same set; an
    ImageFolder the metrics read."""
    pytest.importorskip("skimage")  # a test requirement; the demo notes the set's absence without it
    import cv2
    import skimage.data
    n = demo.make_photo_set(str(tmp_path / "a"), resolution=32, crops=2, seed=0)
    assert n == 2 * len(demo.PHOTOS) and sorted(os.listdir(tmp_path / "a")) == sorted(demo.PHOTOS)
    demo.make_photo_set(str(tmp_path / "b"), resolution=32, crops=2, seed=0)
    for name in demo.PHOTOS:
        for k in range(2):
            a = np.asarray(Image.open(tmp_path / "a" / name / f"{k:03d}.png"))
            assert a.shape == (32, 32, 3) and np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / name / f"{k:03d}.png")))
    # The first crop of the first photograph, redone with OpenCV from the seed's draws.
    rng = np.random.default_rng(0)
    img = skimage.data.astronaut()
    side = int(rng.integers(512 // 3, 513))
    y, x = int(rng.integers(0, 512 - side + 1)), int(rng.integers(0, 512 - side + 1))
    want = cv2.resize(np.ascontiguousarray(img[y:y + side, x:x + side]), (32, 32), interpolation=cv2.INTER_AREA)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "astronaut" / "000.png")), want)
    assert len(data.build_dataset(str(tmp_path / "a"), 32, "resize_center")) == n
