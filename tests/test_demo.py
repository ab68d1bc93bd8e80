"""demo.sh and demo.py's commands: the probe metric, the report writer, the quick demo end to end."""
import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch

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
    """Numbers written into the demo layout by hand appear in the right rows; absent ones are n/a and listed."""
    d = tmp_path / "demo"

    def put(rel, obj):
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj) + "\n")

    put("eval/kl-eq/recon.json", {"psnr": 23.456, "ssim": 0.789})
    put("eval/kl-eq/equivariance.json", {"rotation": 0.111, "scale": 0.222})
    put("eval/kl-base/equivariance.json", {"rotation": 0.9, "scale": 0.7})
    put("eval/kl-eq/id.json", {"twonn": 12.5})
    put("eval/gen.json", {"results": {str(d / "samples/dit-kl-eq/x.npz"): {"gfd_probe": 4.25, "probe_accuracy": 0.5,
                                                                            "gfd_probe_real_floor": 0.125}}})
    (d / "gen" / "dit-kl-eq").mkdir(parents=True)
    (d / "gen" / "dit-kl-eq" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (10, 20, 30)))
    (d / "steps.tsv").write_text("recon-kl-eq\tran\t12\tpython3 evaluate.py recon --vae X\n"
                                 "recon-kl-eq\treused\t0\tpython3 evaluate.py recon --vae X\n"
                                 "sample-sit-kl-eq\tmissing\t0\tsample.py has no sampler for SiT-T/2\n")
    out = demo_eval.write_demo_report(str(d))
    text = (d / "report.md").read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| + EQ-VAE (`kl-eq`)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Autoencoder | PSNR | SSIM | gFD DiT | gFD SiT | gFD MaskGIT | rot | scale | ID
    assert cells[1:] == ["23.5", "0.789", "4.25", "n/a", "-", "0.111", "0.222", "12.5"], cells
    t2 = next(ln for ln in text.splitlines() if ln.startswith("| DiT | + EQ-VAE"))
    assert [c.strip() for c in t2.strip("|").split("|")][2:] == ["30", "0.0333", "4.25", "0.5", "0.125"], t2
    # The step ran once (12 s) and was reused later: the Commands table keeps the seconds of the run that made it.
    assert re.search(r"\| `recon-kl-eq` \| reused \| 12 \|", text), text
    assert any("sample-sit-kl-eq" in m for m in out["missing"])
    assert (d / "figures" / "loss-dit.png").is_file()


#################################################################################
#                        demo.sh: failures, quick run, reuse                     #
#################################################################################

def run_demo(demo_dir, *args, env=None, timeout=600):
    e = dict(os.environ, DEMO_DIR=str(demo_dir), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {}))
    return subprocess.run(["bash", os.path.join(ROOT, "demo.sh"), *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)


def test_failing_step_stops_the_demo_naming_it(tmp_path):
    """A command that fails stops demo.sh with 'demo: step NAME failed'; a finished step is skipped first."""
    r = run_demo(tmp_path / "d", "--quick", env={"PYTHON": "false"})
    assert r.returncode != 0 and "demo: step probe-train failed" in r.stderr, r.stderr
    (tmp_path / "d" / "probe").mkdir(parents=True, exist_ok=True)
    (tmp_path / "d" / "probe" / "probe.pt").write_bytes(b"")          # the probe step's marker: now reused
    r = run_demo(tmp_path / "d", "--quick", env={"PYTHON": "false"})
    assert "[probe-train] reused" in r.stdout and "demo: step ae-kl-base failed" in r.stderr, (r.stdout, r.stderr)
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
    for heading in ("## Table 1 style", "## Table 2 style", "## The probe", "### Figure 2 style",
                    "### Latent PCA", "### Samples", "### Loss curves", "## Commands", "## Missing"):
        assert heading in text, heading

    # Every linked figure exists; the expected ones are all there.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for link in links:
        assert (d / link).is_file(), link
    names = set(links)
    for ae in ("kl-base", "kl-plain", "kl-eq", "vq-base", "vq-eq"):
        assert any(n.startswith(f"ae/{ae}/previews/") for n in names), ae
    for ae in ("kl-base", "kl-plain", "kl-eq"):
        assert f"eval/{ae}/latents/pca_rgb.png" in names, ae
    for fig in ("spectra", "rec-kl", "rec-vq", "eq_err_rot-kl", "eq_err_scale-vq", "loss-dit", "loss-sit",
                "loss-maskgit"):
        assert f"figures/{fig}.png" in names, fig
    import sample
    families = [("dit", "DiT-T/2", ("kl-base", "kl-plain", "kl-eq")), ("sit", "SiT-T/2", ("kl-base", "kl-plain", "kl-eq")),
                ("maskgit", "maskgit-tiny", ("vq-base", "vq-eq"))]
    for gen, model, aes in families:
        try:
            sample.family_of(model)
        except ValueError:                                                     # not wired into sample.py yet:
            assert f"sample-{gen}-{aes[0]}" in text and "missing" in text      # reported as missing
            continue
        for ae in aes:
            assert any(n.startswith(f"samples/{gen}-{ae}/") for n in names), (gen, ae)

    # Table 1: a numeric PSNR, SSIM and both equivariance errors for every autoencoder.
    for ae in ("kl-base", "kl-plain", "kl-eq", "vq-base", "vq-eq"):
        row = next(ln for ln in text.splitlines() if f"(`{ae}`) |" in ln and ln.count("|") == 10)
        cells = [c.strip() for c in row.strip("|").split("|")]
        for i in (1, 2, 6, 7):
            float(cells[i])
    # Commands: every step that ran is listed with its command line.
    assert re.search(r"\| `ae-kl-eq` \| ran \| [0-9.]+ \| `python3 finetune_eqvae\.py .*--eq-prob 0\.5", text)

    # A second run reuses every finished step and still writes the report.
    r2 = run_demo(d, "--quick")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "[ae-kl-base] reused" in r2.stdout and "[train-dit-kl-eq] reused" in r2.stdout
    assert not re.search(r"demo: \[(ae|train|recon|equivariance)-[^\]]*\] python", r2.stdout), r2.stdout
    assert (d / "report.md").is_file()
