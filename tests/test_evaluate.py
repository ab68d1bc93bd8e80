"""Tests of evaluate.py: every metric against closed forms, hand-computed values or brute-force formulas."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import evaluate
import checkpoints
import models
from helpers import run_script


class ArrayImages:
    """An in-memory uint8 (N, H, W, 3) array as an image set."""
    def __init__(self, array, path="<array>"):
        self.array, self.path = array, path
        self.image_size = tuple(array.shape[1:3])

    def __len__(self):
        return len(self.array)

    def read(self, start, end):
        return self.array[start:end]


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
ONE_PROCESS = SimpleNamespace(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random-weight FID Inception saved as the released file is laid out (no num_batches_tracked)."""
    torch.manual_seed(0)
    model = evaluate.FIDInceptionV3()
    path = str(tmp_path_factory.mktemp("inception") / "pt_inception_random.pth")
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


def random_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def blob_images(n, size=32, seed=0, shift=0):
    """Low-resolution noise (2 to 16 cells a side) upsampled, random contrast: images whose features differ."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cells = 2 ** int(rng.integers(1, 5))
        low = np.clip(rng.normal(128 + shift, rng.uniform(10, 80), (cells, cells, 3)), 0, 255).astype(np.uint8)
        out.append(low.repeat(size // cells, 0).repeat(size // cells, 1))
    return np.stack(out)


class TensorImages(torch.utils.data.Dataset):
    """uint8 (N, H, W, 3) as the (3, H, W) uint8 tensors torch-fidelity takes."""
    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        return torch.from_numpy(self.array[i]).permute(2, 0, 1).contiguous()


def run_cli(capsys, argv, stderr=None):
    evaluate.main(argv)
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert len(out) == 1, out                      # one JSON object on stdout, nothing else
    if stderr is not None:
        stderr.append(captured.err)
    return json.loads(out[0])


#################################################################################
#                               FID Inception                                   #
#################################################################################

def test_inception_names_and_shapes_equal_pytorch_fid_fixture():
    with open(os.path.join(FIXTURES, "fid_inception_pytorch_fid.json")) as f:
        expected = json.load(f)["shapes"]
    got = {k: list(v.shape) for k, v in evaluate.FIDInceptionV3().state_dict().items()}
    assert got == expected


def test_inception_loads_file_and_names_bad_keys(inception_file, tmp_path):
    model = evaluate.load_inception(inception_file)         # the file has no num_batches_tracked, like the release
    state = torch.load(inception_file)
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert not any(k.endswith("num_batches_tracked") for k in state)
    bad = dict(state)
    del bad["Mixed_6d.branch1x1.conv.weight"]
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"Mixed_6d\.branch1x1\.conv\.weight.*extra\.weight"):
        evaluate.load_state_dict_strict(model, bad, "test")
    with pytest.raises(ValueError, match=r"fc\.bias.*\(1000,\).*\(1008,\)"):
        evaluate.load_state_dict_strict(model, dict(state, **{"fc.bias": torch.zeros(1000)}), "test")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        evaluate.load_inception(str(tmp_path / "missing.pth"))


def test_inception_outputs_spatial_layout_and_logits(inception_file):
    model = evaluate.load_inception(inception_file)
    seen = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.__setitem__("mixed_6_conv", o))
    images = torch.from_numpy(random_images(2, 40)).permute(0, 3, 1, 2)
    pool, spatial, logits = model(images)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 17 * 17 * 7) and logits.shape == (2, 1008)
    # sFID features: channels 0..6 of mixed_6/conv (Mixed_6d.branch1x1), flattened in TF's (H, W, C) order.
    ref = seen["mixed_6_conv"]
    assert ref.shape == (2, 192, 17, 17)
    grid = spatial.view(2, 17, 17, 7)
    for n, h, w, c in [(0, 0, 0, 0), (1, 3, 11, 6), (0, 16, 2, 4), (1, 16, 16, 1)]:
        assert grid[n, h, w, c] == ref[n, c, h, w]
    # IS logits: pool_3 @ W without the bias (ADM's softmax/logits/MatMul).
    assert torch.allclose(logits, pool @ model.fc.weight.t(), atol=1e-4)


def test_tf1_resize_equals_torch_fidelity():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as tf1
    g = torch.Generator().manual_seed(0)
    for h, w in [(32, 32), (64, 48), (256, 256), (299, 299), (512, 300)]:
        x = torch.randint(0, 256, (2, 3, h, w), generator=g).float()
        assert torch.equal(evaluate.tf1_resize_bilinear(x), tf1(x, size=(299, 299), align_corners=False)), (h, w)
    # By hand: 2 -> 299 samples source i * 2 / 299 with no half-pixel offset, so output 0 is input 0 exactly and
    # output 150 is input 1 (1.0033 clamped to the last pixel), unlike torch's align_corners=False.
    x = torch.tensor([[[[10.0, 20.0]]]]).expand(1, 1, 2, 2)
    out = evaluate.tf1_resize_bilinear(x)
    assert out[0, 0, 0, 0] == 10 and out[0, 0, 0, 150] == 20
    assert out[0, 0, 0, 1].item() == pytest.approx(10 + 10 * 2 / 299, rel=1e-6)


def test_adm_features_equal_torch_fidelity_and_pytorch_fid_protocol_equals_pytorch_fid(inception_file, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    import pytorch_fid.inception
    images = torch.from_numpy(random_images(3, 40)).permute(0, 3, 1, 2)
    # torch-fidelity's "inception-v3-compat" (ADM's TF graph in PyTorch) on the same weights: pool_3, the IS
    # logits without bias and mixed_6/conv (Mixed_6d.branch1x1) as ADM flattens it (NHWC, first 7 channels).
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=inception_file)
    seen = {}
    theirs.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.__setitem__("mixed_6_conv", o))
    with torch.no_grad():
        pool, logits = theirs(images)
    ours = evaluate.load_inception(inception_file)                          # default protocol: adm
    assert ours.protocol == "adm"
    got = ours(images)
    torch.testing.assert_close(got[0], pool, rtol=0, atol=1e-5)
    spatial = seen["mixed_6_conv"][:, :7].permute(0, 2, 3, 1).reshape(3, -1)
    torch.testing.assert_close(got[1], spatial, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[2], logits, rtol=0, atol=1e-4)
    # pytorch-fid's own InceptionV3 (its resize and 2x - 1) with the same file: --protocol pytorch-fid.
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: torch.load(inception_file))
    with torch.no_grad():
        expected = pytorch_fid.inception.InceptionV3([3]).eval()(images.float() / 255)[0].flatten(1)
    other = evaluate.load_inception(inception_file, "pytorch-fid")(images)[0]
    torch.testing.assert_close(other, expected, rtol=0, atol=1e-5)
    assert (other - pool).abs().max() > 1e-2                                 # the two protocols really differ


#################################################################################
#                          Image sets: ADM .npz, folders                        #
#################################################################################

def test_cli_fid_equals_torch_fidelity_and_pytorch_fid(tmp_path, capsys, monkeypatch):
    import pytorch_fid.fid_score
    import pytorch_fid.inception
    import torch_fidelity
    # Random weights with a larger IS layer, so that the Inception Score is not ~1 for every image set.
    torch.manual_seed(0)
    model = evaluate.FIDInceptionV3()
    model.fc.weight.data *= 100
    weights = str(tmp_path / "inception.pth")
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, weights)
    smp, ref = blob_images(12, seed=1, shift=20), blob_images(12, seed=2)
    for name, images in (("s", smp), ("r", ref)):
        data.save_npz(tmp_path / f"{name}.npz", images)
        os.makedirs(tmp_path / name)
        for i, im in enumerate(images):
            Image.fromarray(im).save(tmp_path / name / f"{i:03d}.png")
    cli = ["--inception", weights, "--cache-dir", str(tmp_path / "cache")]
    ours = run_cli(capsys, ["fid", str(tmp_path / "s.npz"), str(tmp_path / "r.npz"), *cli, "--pr-distances", "fp32"])
    # torch-fidelity's ADM-compatible Inception; one IS split (ADM: consecutive splits of 5000 images, torch-fidelity
    # shuffles into 10 splits, so only one split compares); its precision/recall use fp32 distances (cdist).
    theirs = torch_fidelity.calculate_metrics(
        input1=TensorImages(smp), input2=TensorImages(ref), fid=True, isc=True, prc=True, isc_splits=1, cuda=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=weights, verbose=False, cache=False,
        save_cpu_ram=True)
    # 12 images in 2048-D: singular covariances, where every route to tr sqrtm(S1 S2) (ADM's sqrtm, torch-fidelity's
    # eigvals, our eigvalsh) adds its own ~1e-5 of round-off from the null space; with more images than
    # dimensions they agree to ~1e-8.
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=2e-5)
    # IS: torch-fidelity (like ADM) forms the logits in float32, we in float64: ~3e-7 apart.
    assert ours["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=2e-6)
    assert ours["inception_score"] > 1.01
    # The same points inside the same balls (torch-fidelity averages the 0/1 flags in float32).
    assert (ours["precision"], ours["recall"]) == (pytest.approx(theirs["precision"], abs=1e-6),
                                                   pytest.approx(theirs["recall"], abs=1e-6))
    assert 0 < ours["recall"] < 1
    # --protocol pytorch-fid: the statistics `stats` writes from the PNG folder equal pytorch-fid's own
    # (compute_statistics_of_path, the first half of calculate_fid_given_paths), and its FID formula is ADM's sqrtm
    # (checked against method="sqrtm" above); the two protocols' FIDs differ, which is why mixing them is an error.
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: torch.load(weights))
    net = pytorch_fid.inception.InceptionV3([3]).eval()
    mu, sigma = pytorch_fid.fid_score.compute_statistics_of_path(str(tmp_path / "s"), net, 50, 2048, "cpu", 0)
    capsys.readouterr()                                                     # pytorch-fid prints warnings on stdout
    run_cli(capsys, ["stats", str(tmp_path / "s"), "--out", str(tmp_path / "pf.npz"), *cli, "--protocol", "pytorch-fid",
                     "--keep-images", "0"])
    with np.load(tmp_path / "pf.npz") as f:
        assert str(f["protocol"]) == "pytorch-fid"
        np.testing.assert_allclose(f["mu"], mu, rtol=0, atol=1e-6)
        np.testing.assert_allclose(f["sigma"], sigma, rtol=0, atol=1e-6)
    other = run_cli(capsys, ["fid", str(tmp_path / "r"), str(tmp_path / "pf.npz"), *cli, "--protocol", "pytorch-fid"])
    mu_r, sigma_r = pytorch_fid.fid_score.compute_statistics_of_path(str(tmp_path / "r"), net, 50, 2048, "cpu", 0)
    capsys.readouterr()
    assert other["fid"] == pytest.approx(pytorch_fid.fid_score.calculate_frechet_distance(mu_r, sigma_r, mu, sigma),
                                         rel=2e-5)  # pytorch-fid's own FID (calculate_fid_given_paths' second half)
    assert abs(other["fid"] - ours["fid"]) > 1e-3 * ours["fid"]
    assert len(os.listdir(tmp_path / "cache")) == 4                         # features cached per protocol and set


def test_npz_write_read_and_bad_input(tmp_path):
    images = random_images(7, 8)
    data.save_npz(tmp_path / "s.npz", images, arr_1=np.arange(7))
    with np.load(tmp_path / "s.npz") as f:                  # ADM layout: arr_0 uint8 NHWC
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (7, 8, 8, 3)
    reader = data.open_images(str(tmp_path / "s.npz"))
    assert len(reader) == 7 and reader.image_size == (8, 8)
    for a, b in [(2, 5), (5, 7), (0, 3), (3, 3)]:           # forward, then backward (reopens the member)
        np.testing.assert_array_equal(reader.read(a, b), images[a:b])
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    np.testing.assert_array_equal(data.open_images(str(tmp_path / "c.npz")).read(4, 6), images[4:6])

    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="dtype float32.*uint8"):
        data.open_images(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "nchw.npz", arr_0=images.transpose(0, 3, 1, 2).copy())
    with pytest.raises(ValueError, match="NHWC"):
        data.open_images(str(tmp_path / "nchw.npz"))
    np.savez(tmp_path / "labels.npz", labels=np.arange(3))
    with pytest.raises(KeyError, match="arr_0"):
        data.open_images(str(tmp_path / "labels.npz"))
    with pytest.raises(ValueError, match="uint8"):
        data.save_npz(tmp_path / "x.npz", images.astype(np.float32))
    with pytest.raises(KeyError, match="mu, sigma"):
        np.savez(tmp_path / "half.npz", mu=np.zeros(3))
        evaluate.read_reference(str(tmp_path / "half.npz"))


def test_folder_images(tmp_path):
    images = random_images(3, 8)
    os.makedirs(tmp_path / "a" / "sub")
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "a" / ("sub" if i == 2 else "") / f"{i}.png")
    reader = data.open_images(str(tmp_path / "a"))
    np.testing.assert_array_equal(reader.read(0, 3), images)    # 0.png, 1.png, sub/2.png
    Image.fromarray(random_images(1, 9)[0]).save(tmp_path / "a" / "3.png")
    with pytest.raises(ValueError, match="differ in size"):
        data.open_images(str(tmp_path / "a")).read(0, 4)


#################################################################################
#                      Frechet distance, IS, precision/recall                   #
#################################################################################

@pytest.mark.parametrize("method", ["eig", "sqrtm"])
def test_frechet_distance_closed_forms(method):
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    # Commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = evaluate.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T, method=method)
    assert got == pytest.approx(expected, rel=1e-8)
    got = evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(expected, rel=1e-8)
    # Non-commuting 2 x 2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 (eigenvalues >= 0).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 3.0]])
    m = s1 @ s2
    expected = 1.0 + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    assert evaluate.frechet_distance([1, 0], s1, [0, 0], s2, method=method) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_methods_agree_and_bad_input():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 64)), rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64))
    stats = [x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)]
    assert evaluate.frechet_distance(*stats) == pytest.approx(evaluate.frechet_distance(*stats, method="sqrtm"),
                                                              rel=1e-8)
    # Singular covariances (fewer samples than dimensions) take the other branch of "eig".
    x, y = x[:20], y[:30]
    stats = [x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)]
    assert evaluate.frechet_distance(*stats) == pytest.approx(evaluate.frechet_distance(*stats, method="sqrtm"),
                                                              rel=1e-6)
    with pytest.raises(ValueError, match="dimension"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="imaginary"):
        evaluate.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))
    with pytest.warns(UserWarning, match="singular"):
        evaluate.compute_statistics(rng.normal(size=(10, 20)))


def test_inception_score_hand_values():
    # Uniform predictions: p(y|x) = p(y), KL 0, IS 1.
    assert evaluate.inception_score(np.zeros((10, 1008))) == pytest.approx(1.0)
    # Every sample certain of its own class: IS of a split = its size; splits of 4, 4, 2 (ADM: consecutive
    # chunks, the last one smaller) -> (4 + 4 + 2) / 3.
    logits = np.full((10, 1008), -1e4)
    logits[np.arange(10), np.arange(10)] = 0
    assert evaluate.inception_score(logits, split_size=4) == pytest.approx(10 / 3, rel=1e-9)
    # Two classes, all samples split 50/50 between the same two: IS 1 (no information).
    logits = np.full((6, 1008), -1e4)
    logits[:, :2] = 0
    assert evaluate.inception_score(logits) == pytest.approx(1.0)


def test_precision_recall_hand_case():
    # 1-D, k = 3. Reference radii (squared 3rd-NN distances): 0->9, 1->4, 2->4, 3->4, 4->9, 10->64.
    ref = np.array([0, 1, 2, 3, 4, 10], np.float32)[:, None]
    # Samples: four near the reference, four duplicates at 50 (radius 0). Sample radii: 0.5->9, 1.5->4, 2.5->4,
    # 3.5->9, 50->0. Precision: the four near samples lie in reference balls, 50 is 1600 > 64 from 10: 4/8.
    # Recall: refs 0..4 lie in the near samples' balls; 10 is 42.25 > 9 from 3.5 and 1600 > 0 from 50: 5/6.
    smp = np.array([0.5, 1.5, 2.5, 3.5, 50, 50, 50, 50], np.float32)[:, None]
    np.testing.assert_allclose(evaluate.manifold_radii(ref, k=3), [9, 4, 4, 4, 9, 64])
    p, r = evaluate.precision_recall(ref, smp, k=3, block=3)
    assert p == pytest.approx(0.5) and r == pytest.approx(5 / 6)
    assert evaluate.precision_recall(ref, ref, k=3) == (1.0, 1.0)


def test_precision_recall_blocks_match_brute_force():
    rng = np.random.default_rng(0)
    ref, smp = rng.normal(size=(37, 5)), rng.normal(0.5, 1.2, size=(29, 5))

    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, 1)[:, 3]                         # index 0 is the point itself

    d = ((ref[:, None] - smp[None]) ** 2).sum(-1)           # (refs, samples)
    precision = np.mean([(d[:, j] <= radii(ref)).any() for j in range(len(smp))])
    recall = np.mean([(d[i] <= radii(smp)).any() for i in range(len(ref))])
    p, r = evaluate.precision_recall(ref.astype(np.float32), smp.astype(np.float32), k=3, block=8)
    assert (p, r) == (pytest.approx(precision), pytest.approx(recall))
    assert 0 < p < 1 and 0 < r < 1


def adm_fp16_sq_dists(u, v):
    """ADM's DistanceBlock in float16 with numpy: squares rounded to fp16, sums exact then rounded to fp16, then
    norm_u - 2 u.v + norm_v op by op in fp16 (integer features keep every sum exact, as fp32 accumulation does)."""
    h, g = u.astype(np.float16), v.astype(np.float16)
    nu = (h * h).astype(np.float64).sum(1).astype(np.float16)
    nv = (g * g).astype(np.float64).sum(1).astype(np.float16)
    uv = (h.astype(np.float64) @ g.astype(np.float64).T).astype(np.float16)
    return np.maximum(nu[:, None] - np.float16(2) * uv + nv[None], np.float16(0)).astype(np.float32)


def test_precision_recall_fp16_distances_as_adm():
    # By hand: 50 vs 51 in 1-D. fp16 holds 2500 and 5100 exactly but rounds 2601 to 2600 (even mantissa), so the
    # squared distance 2500 - 5100 + 2600 = 0 instead of 1.
    a, b = torch.tensor([[50.0]]), torch.tensor([[51.0]])
    assert evaluate.pairwise_sq_dists(a, b).item() == 0.0
    assert evaluate.pairwise_sq_dists(a, b, fp16=False).item() == 1.0
    # Integer features around 50 in 4-D: squared norms ~1e4, where fp16's spacing is 8, so points move in and out of
    # the balls. Precision/recall equal the brute force on the fp16 distances and differ from fp32 ones.
    rng = np.random.default_rng(0)
    ref = rng.integers(40, 60, (40, 4)).astype(np.float32)
    smp = (rng.integers(40, 60, (30, 4)) + rng.integers(0, 3, (30, 1))).astype(np.float32)

    def brute(dist):
        r_ref, r_smp = np.sort(dist(ref, ref), 1)[:, 3], np.sort(dist(smp, smp), 1)[:, 3]
        d = dist(ref, smp)
        return (d <= r_ref[:, None]).any(0).mean(), (d <= r_smp[None]).any(1).mean()
    exact = lambda u, v: ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(evaluate.pairwise_sq_dists(torch.from_numpy(ref), torch.from_numpy(smp)).numpy(),
                                  adm_fp16_sq_dists(ref, smp))
    fp16 = evaluate.precision_recall(ref, smp, block=16)                   # blocks of 16: each decides alone
    fp32 = evaluate.precision_recall(ref, smp, block=16, fp16=False)
    assert fp16 == pytest.approx(brute(adm_fp16_sq_dists), abs=1e-12)
    assert fp32 == pytest.approx(brute(exact), abs=1e-12)
    assert fp16 != fp32
    # A block that overflows fp16 (|x|^2 > 65504) is computed again in fp32, as ADM's tf.cond does.
    big = torch.tensor([[200.0, 200.0], [201.0, 199.0]])
    assert torch.equal(evaluate.pairwise_sq_dists(big, big), evaluate.pairwise_sq_dists(big, big, fp16=False))
    assert evaluate.pairwise_sq_dists(big, big)[0, 1].item() == 2.0


#################################################################################
#                                PSNR and SSIM                                  #
#################################################################################

def test_psnr_constant_offset():
    x = torch.randint(0, 240, (2, 3, 16, 16), dtype=torch.uint8)
    got = evaluate.psnr(x, x + 10)                          # MSE 100 -> 10 log10(255^2 / 100)
    assert torch.allclose(got, torch.full((2,), 10 * math.log10(255 ** 2 / 100), dtype=torch.float64))
    assert torch.isinf(evaluate.psnr(x, x)).all()


def brute_force_ssim(x, y, L=255.0, size=11, sigma=1.5):
    """SSIM straight from Wang et al.'s formula, one window at a time (valid positions), channel mean."""
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    out = []
    for xi, yi in zip(x, y):
        vals = []
        for xc, yc in zip(xi, yi):
            for i in range(xc.shape[0] - size + 1):
                for j in range(xc.shape[1] - size + 1):
                    a, b = xc[i:i + size, j:j + size], yc[i:i + size, j:j + size]
                    ma, mb = (w * a).sum(), (w * b).sum()
                    va, vb, cab = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
                    vals.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        out.append(np.mean(vals))
    return np.array(out)


def test_ssim_against_direct_formula_and_hand_values():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 3, 15, 14)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 25, x.shape), 0, 255).round()
    got = evaluate.ssim(torch.from_numpy(x), torch.from_numpy(y), 255.0, crop=True).numpy()   # --ssim skimage
    np.testing.assert_allclose(got, brute_force_ssim(x, y), rtol=1e-10)
    assert torch.allclose(evaluate.ssim(torch.from_numpy(x), torch.from_numpy(x)), torch.ones(2, dtype=torch.float64))
    # Two constant images a, b: variances 0, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 100.0, 120.0, (0.01 * 255) ** 2
    got = evaluate.ssim(torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b), 255.0)
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)


def test_ssim_equals_torchmetrics_as_the_official_evals_call_it():
    from torchmetrics.image import StructuralSimilarityIndexMeasure
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 40, 36, generator=g) * 2 - 1                       # inputs in [-1, 1]
    x_hat = x + 0.3 * torch.randn(x.shape, generator=g)                     # unclamped "decoder output"
    x_hat[2], x[2] = x_hat[2] * 0.3, x[2] * 0.3                             # low contrast: inferred data_range < 2
    # EQ-VAE eval.py: StructuralSimilarityIndexMeasure() with its defaults, batch size 1, so data_range is inferred
    # per image; LightningDiT: data_range=(-1, 1), which clamps both to [-1, 1].
    for data_range, metric in ((None, StructuralSimilarityIndexMeasure()),
                               ((-1.0, 1.0), StructuralSimilarityIndexMeasure(data_range=(-1.0, 1.0)))):
        expected = torch.stack([metric(x_hat[i:i + 1], x[i:i + 1]) for i in range(3)]).double()
        torch.testing.assert_close(evaluate.ssim(x_hat, x, data_range), expected, rtol=1e-6, atol=1e-6)
    # The difference from skimage's cropped mean on uint8 (this project's SSIM before) is real, not round-off.
    ours = evaluate.ssim(x_hat, x).mean()
    old = evaluate.ssim(data.to_uint8(x_hat), data.to_uint8(x), 255.0, crop=True).mean()
    assert abs(ours - old) > 1e-2


#################################################################################
#                          Equivariance error (App. C.3)                        #
#################################################################################

def test_equivariance_error_zero_for_equivariant_encoders():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    w = torch.randn(4, 3)
    # A per-pixel linear map commutes with rotations and with (linear) bilinear resizing: Delta = 0 for every tau.
    pointwise = lambda t: torch.einsum("oc,nchw->nohw", w, t)
    inverse = lambda z: torch.einsum("co,nohw->nchw", torch.linalg.pinv(w), z)
    errs = evaluate.equivariance_error(pointwise, x, decode_fn=inverse)
    assert set(errs) == {"rot90", "rot180", "rot270", "scale0.25", "scale0.5", "scale0.75",
                         "psnr/rot90", "psnr/rot180", "psnr/rot270", "psnr/scale0.25", "psnr/scale0.5",
                         "psnr/scale0.75"}
    for k, v in errs.items():
        assert v.shape == (3,)
        if k.startswith("psnr/"):
            assert (v > 60).all(), k                       # D(tau E(x)) = tau x up to uint8 rounding
        else:
            assert v.max() < 1e-10, k
    # Average pooling by 8 (an f8 "encoder") commutes with quarter turns and with 2x bilinear downsampling
    # (= 2 x 2 averaging), not with 4x or 4/3x bilinear (which skips pixels).
    pool8 = lambda t: F.avg_pool2d(t, 8)
    errs = evaluate.equivariance_error(pool8, x, scales=(0.5, 0.25))
    assert max(errs[k].max() for k in ("rot90", "rot180", "rot270", "scale0.5")) < 1e-10
    assert errs["scale0.25"].min() > 1e-4
    summary = evaluate.summarize_equivariance(errs)
    assert summary["rotation"] < 1e-10 and summary["scale"] == pytest.approx(errs["scale0.25"].mean().item() / 2)


def test_equivariance_error_positive_for_non_equivariant_encoder():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ramp = torch.linspace(0.5, 1.5, 32)                    # position-dependent gain: breaks rotation symmetry
    errs = evaluate.equivariance_error(lambda t: t * ramp[:t.shape[-1]], x, scales=())
    for k in ("rot90", "rot180", "rot270"):
        assert errs[k].min() > 1e-3


def test_equivariance_error_value_by_hand():
    # E(x) = x with a constant 1 added in the top-left pixel of every channel: E(tau x) has it top-left, tau E(x)
    # has it where tau moved it. For x = 0 (C = 3, 4 x 4): ||tau E(x) - E(tau x)||^2 = 6, ||E(tau x)||^2 = 3.
    def encode(t):
        t = t.clone()
        t[..., 0, 0] += 1
        return t
    errs = evaluate.equivariance_error(encode, torch.zeros(1, 3, 4, 4), scales=())
    for k in ("rot90", "rot180", "rot270"):
        assert errs[k].item() == pytest.approx(2.0)


#################################################################################
#                            Intrinsic dimension                                #
#################################################################################

def test_twonn_and_mle_recover_known_dimensions():
    rng = np.random.default_rng(0)
    # 6-dim Gaussian embedded linearly in 50-D.
    d = 6
    pts = rng.normal(size=(1500, d)) @ rng.normal(size=(d, 50))
    assert evaluate.twonn(pts) == pytest.approx(d, rel=0.1)
    assert evaluate.mle_id(pts, k=20) == pytest.approx(d, rel=0.1)
    # Flat 3-torus in R^6 (cos, sin per angle): uniform, no boundary.
    angles = rng.uniform(0, 2 * np.pi, size=(1500, 3))
    torus = np.concatenate([np.cos(angles), np.sin(angles)], 1)
    assert evaluate.twonn(torus) == pytest.approx(3, rel=0.1)
    assert evaluate.mle_id(torus, k=20) == pytest.approx(3, rel=0.1)


def test_twonn_fit_by_hand():
    # Points 0, 1, 3, 7, 15 on a line: (r1, r2) = (1, 3), (1, 2), (2, 3), (4, 6), (8, 12) -> mu sorted
    # [1.5, 1.5, 1.5, 2, 3]; int(5 * 0.9) = 4 kept, F_i = i / 5: d = sum(log mu * -log(1 - F)) / sum(log mu ^ 2).
    pts = np.array([0, 1, 3, 7, 15], float)[:, None]
    mu = np.array([1.5, 1.5, 1.5, 2])
    y = -np.log(1 - np.arange(1, 5) / 5)
    assert evaluate.twonn(pts) == pytest.approx(np.log(mu) @ y / (np.log(mu) @ np.log(mu)), rel=1e-12)
    with pytest.warns(UserWarning, match="TwoNN: dropping 2 duplicate"):
        evaluate.twonn(np.array([0, 0, 1, 3, 7, 15], float)[:, None])
    # MLE likewise: the two copies of 0 have a zero nearest distance and are left out; the others keep them as
    # neighbours. k = 2 on 0, 0, 1, 3, 7, 15: point 1 -> (1, 1), 3 -> (2, 3), 7 -> (4, 6), 15 -> (8, 12).
    with pytest.warns(UserWarning, match="MLE: dropping 2 duplicate"):
        got = evaluate.mle_id(np.array([0, 0, 1, 3, 7, 15], float)[:, None], k=2)
    assert got == pytest.approx(1 / np.mean(np.log([1, 1.5, 1.5, 1.5])), rel=1e-12)


#################################################################################
#                                Latent pictures                                #
#################################################################################

def test_pca_rgb_and_power_spectrum():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    rgb = evaluate.pca_rgb(z)
    assert rgb.shape == (2, 3, 8, 8) and rgb.min() >= 0 and rgb.max() <= 1
    assert torch.allclose(rgb.flatten(1).max(1).values, torch.ones(2), atol=1e-6)
    # A pure cosine of 3 cycles along x has all its power at radius 3.
    xs = torch.arange(16, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * 3 * xs / 16).expand(1, 1, 16, 16)
    freqs, power = evaluate.radial_power_spectrum(wave)
    assert list(freqs) == list(range(9)) and int(np.argmax(power)) == 3
    assert power[3] > 1e6 * np.delete(power, 3).max()


def test_pca_rgb_shared_scale_compares_models():
    """--pca-scale sigma: one rule for every latent space (0.5 + component / 5 std), so a latent space with twice
    the structure in its first component is not stretched to the same colours; signs are fixed, not the solver's."""
    torch.manual_seed(0)
    z = torch.randn(4, 4, 8, 8) * torch.tensor([3.0, 1.0, 0.5, 0.1]).view(1, 4, 1, 1)
    rgb = evaluate.pca_rgb(z, "sigma")
    x = z.permute(0, 2, 3, 1).reshape(-1, 4).double()
    x = x - x.mean(0)
    vals, vecs = torch.linalg.eigh(x.t() @ x / (len(x) - 1))
    v = vecs[:, -1] * torch.sign(vecs[vecs[:, -1].abs().argmax(), -1])          # first component, sign fixed
    red = (0.5 + (x @ v) / (5 * vals[-1].sqrt())).clamp(0, 1).reshape(4, 8, 8)
    torch.testing.assert_close(rgb[:, 0], red.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(evaluate.pca_rgb(2 * z, "sigma"), rgb, atol=1e-5, rtol=0)  # invariant to scale


def test_synthetic_seed_spec_gives_held_out_images():
    a = data.build_dataset("synthetic", 32, "resize_center", num_images=4)
    b = data.build_dataset("synthetic:3", 32, "resize_center", num_images=4)
    c = data.build_dataset("synthetic", 32, "resize_center", num_images=4, seed=3)
    assert torch.equal(b[0][0], c[0][0]) and not torch.equal(a[0][0], b[0][0])
    with pytest.raises(ValueError, match="synthetic:SEED"):
        data.build_dataset("synthetic:x", 32)


#################################################################################
#                         Command line (one process)                            #
#################################################################################

def adm_read_reference_batch(path, batch_size=2):
    """A reference batch read as guided-diffusion's evaluations/evaluator.py reads one: arr_0 streamed from the zip
    member in batches (a .npy header, C order, no objects; uint8 NHWC images, cast to float 0..255), then
    np.load(path) and, when "mu" is among its keys, mu, sigma, mu_s, sigma_s."""
    import zipfile
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert not fortran and not dtype.hasobject
        n_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        batches = [np.frombuffer(f.read(n_bytes * min(batch_size, shape[0] - i)), dtype=dtype).reshape(-1, *shape[1:])
                   for i in range(0, shape[0], batch_size)]
    obj = np.load(path)
    assert "mu" in list(obj.keys())
    return np.concatenate(batches), (obj["mu"], obj["sigma"]), (obj["mu_s"], obj["sigma_s"])


def test_cli_stats_is_an_adm_reference_batch_and_protocols_do_not_mix(tmp_path, inception_file, capsys):
    images = random_images(4, 32)
    data.save_npz(tmp_path / "ref.npz", images)
    cache = str(tmp_path / "cache")
    out = run_cli(capsys, ["stats", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "stats.npz"),
                           "--inception", inception_file, "--cache-dir", cache, "--batch-size", "3"])
    assert out["num_images"] == 4 and out["images_kept"] == 4 and out["protocol"] == "adm"   # min(N, 10000) kept
    arr_0, (mu, sigma), (mu_s, sigma_s) = adm_read_reference_batch(str(tmp_path / "stats.npz"))
    assert arr_0.dtype == np.uint8 and arr_0.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(arr_0, images)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert mu_s.shape == (2023,) and sigma_s.shape == (2023, 2023)
    with np.load(tmp_path / "stats.npz") as f:
        assert str(f["protocol"]) == "adm"
    assert len(os.listdir(cache)) == 1                          # one cached feature set (a rerun skips the network)
    # The same images (features from the cache) against their own statistics: FID and sFID ~ 0 (relative to the
    # features' total variance of ~1e3), every sample inside the reference manifold and vice versa.
    err = []
    out = run_cli(capsys, ["fid", str(tmp_path / "ref.npz"), str(tmp_path / "stats.npz"),
                           "--inception", inception_file, "--cache-dir", cache], err)
    assert set(out) >= {"fid", "sfid", "inception_score", "precision", "recall"}
    assert abs(out["fid"]) < 1e-4 and abs(out["sfid"]) < 1e-4
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["inception_score"] >= 1.0
    assert "singular" in err[0]                                # 4 samples for 2048-dim features
    # Statistics made one way never meet features made the other way; a file without a record (ADM's own
    # reference batches) counts as "adm".
    with pytest.raises(ValueError, match="protocol 'adm'.*uses 'pytorch-fid'"):
        evaluate.main(["fid", str(tmp_path / "ref.npz"), str(tmp_path / "stats.npz"), "--inception", inception_file,
                       "--protocol", "pytorch-fid"])
    np.savez(tmp_path / "adm_style.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    with pytest.raises(ValueError, match="protocol 'adm'"):
        evaluate.main(["fid", str(tmp_path / "ref.npz"), str(tmp_path / "adm_style.npz"), "--inception",
                       inception_file, "--protocol", "pytorch-fid"])
    err = []
    out = run_cli(capsys, ["fid", str(tmp_path / "ref.npz"), str(tmp_path / "adm_style.npz"), "--inception",
                           inception_file, "--cache-dir", cache], err)
    assert abs(out["fid"]) < 1e-4 and "records no protocol" in err[0] and out["precision"] is None
    out = run_cli(capsys, ["stats", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "s2.npz"), "--keep-images", "2",
                           "--inception", inception_file, "--cache-dir", cache])
    with np.load(tmp_path / "s2.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], images[:2])


def test_evaluate_samples_skips_what_the_reference_lacks(monkeypatch):
    # Orchestration only: low-dimensional stand-in features instead of the Inception network.
    rng = np.random.default_rng(0)
    feats = {"s": (rng.normal(size=(30, 6)), rng.normal(size=(30, 5))),
             "r": (rng.normal(size=(20, 6)) + 1, rng.normal(size=(20, 5)))}
    monkeypatch.setattr(evaluate, "extract_features", lambda images, *a, **k: feats[images.path])
    model = SimpleNamespace(fc=torch.nn.Linear(6, 10), protocol="adm")
    samples, images = ArrayImages(random_images(30, 4), "s"), ArrayImages(random_images(20, 4), "r")
    mu, sigma = feats["r"][0].mean(0), np.cov(feats["r"][0], rowvar=False)
    # Statistics only: FID from the stored statistics; sFID, precision and recall skipped with a note each.
    res, notes = evaluate.evaluate_samples(samples, {"mu": mu, "sigma": sigma}, model, ONE_PROCESS)
    expected = evaluate.frechet_distance(feats["s"][0].mean(0), np.cov(feats["s"][0], rowvar=False), mu, sigma)
    assert res["fid"] == pytest.approx(expected) and res["sfid"] is None
    assert res["precision"] is None and res["recall"] is None
    assert any("sFID skipped" in n for n in notes) and any("precision and recall skipped" in n for n in notes)
    # Stored statistics win over the images' (ADM's read_statistics); images give precision/recall.
    res, _ = evaluate.evaluate_samples(samples, {"mu": mu + 1, "sigma": sigma, "images": images}, model, ONE_PROCESS)
    assert res["fid"] == pytest.approx(expected + 6 - 2 * (feats["s"][0].mean(0) - mu).sum(), rel=1e-9)
    assert res["precision"] is not None and res["sfid"] is not None
    # Three reference images are too few for k = 3 neighbours: precision/recall skipped with a note, the rest kept.
    feats["few"] = (feats["r"][0][:3], feats["r"][1][:3])
    res, notes = evaluate.evaluate_samples(samples, {"images": ArrayImages(random_images(3, 4), "few")}, model,
                                           ONE_PROCESS)
    assert res["precision"] is None and res["recall"] is None and any("need more than k = 3" in n for n in notes)
    assert all(res[k] is not None for k in ("fid", "sfid", "inception_score"))


@pytest.fixture(scope="module")
def tiny_vae_file(tmp_path_factory):
    import models
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("vae") / "tiny.pt")
    checkpoints.save_ldm(models.KLVAE_models["tiny"](), path)
    return path


VAE_ARGS = ["--data", "synthetic", "--resolution", "32", "--num-images", "3", "--batch-size", "2",
            "--num-workers", "0"]


def test_cli_recon_as_the_official_eval(tmp_path, tiny_vae_file, inception_file, capsys, monkeypatch):
    import pytorch_fid.fid_score
    import pytorch_fid.inception
    from torchmetrics.image import StructuralSimilarityIndexMeasure
    png = tmp_path / "png"
    out = run_cli(capsys, ["recon", "--vae", tiny_vae_file, *VAE_ARGS, "--no-lpips", "--inception", inception_file,
                           "--save-png", str(png)])
    assert out["num_images"] == 3
    ref = np.stack([np.asarray(Image.open(png / "ref" / f"{i:06d}.png")) for i in range(3)])
    rec = np.stack([np.asarray(Image.open(png / "recon" / f"{i:06d}.png")) for i in range(3)])
    # PSNR of the dumped PNGs, computed directly: mean over images of 10 log10(255^2 / MSE).
    mse = ((ref.astype(np.float64) - rec) ** 2).reshape(3, -1).mean(1)
    assert out["psnr"] == pytest.approx(np.mean(10 * np.log10(255 ** 2 / mse)), rel=1e-5)
    # rFID as eval.py computes it: pytorch-fid on the two PNG folders (its statistics; the Frechet distance of
    # those, whose formula is checked against ADM's / pytorch-fid's sqrtm above).
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: torch.load(inception_file))
    net = pytorch_fid.inception.InceptionV3([3]).eval()
    stats = [pytorch_fid.fid_score.compute_statistics_of_path(str(png / s), net, 50, 2048, "cpu", 0)
             for s in ("ref", "recon")]
    capsys.readouterr()
    assert out["rfid"] == pytest.approx(evaluate.frechet_distance(*stats[1], *stats[0]), rel=1e-5)
    # SSIM as eval.py: torchmetrics' StructuralSimilarityIndexMeasure() per image on the float decoder output of a
    # posterior sample, whose noise comes from a generator seeded by (--seed, image index).
    vae = checkpoints.load_autoencoder(tiny_vae_file)
    dataset = data.build_dataset("synthetic", 32, "resize_center", num_images=3)
    x = torch.stack([dataset[i][0] for i in range(3)])
    with torch.no_grad():
        post = vae.encode(x)
        eps = torch.stack([torch.randn(post.mean.shape[1:], generator=torch.Generator().manual_seed(i))
                           for i in range(3)])
        x_hat = vae.decode(post.mean + post.std * eps)
    np.testing.assert_array_equal(rec, data.to_uint8(x_hat).permute(0, 2, 3, 1).numpy())
    for flag, metric in (("torchmetrics", StructuralSimilarityIndexMeasure()),
                         ("lightningdit", StructuralSimilarityIndexMeasure(data_range=(-1.0, 1.0)))):
        got = out if flag == "torchmetrics" else run_cli(capsys, ["recon", "--vae", tiny_vae_file, *VAE_ARGS,
                                                                  "--no-lpips", "--no-fid", "--ssim", flag])
        expected = np.mean([metric(x_hat[i:i + 1], x[i:i + 1]).item() for i in range(3)])
        assert got["ssim"] == pytest.approx(expected, abs=1e-6), flag            # torchmetrics: float32
    got = run_cli(capsys, ["recon", "--vae", tiny_vae_file, *VAE_ARGS, "--no-lpips", "--no-fid", "--ssim", "skimage"])
    assert got["ssim"] == pytest.approx(brute_force_ssim(ref.transpose(0, 3, 1, 2).astype(np.float64),
                                                         rec.transpose(0, 3, 1, 2).astype(np.float64)).mean(), rel=1e-9)


def test_cli_vqgan_and_lpips(tmp_path, capsys, monkeypatch):
    import data
    import models
    torch.manual_seed(0)
    checkpoints.save_taming(models.VQGAN_models["tiny"](), str(tmp_path / "vq.ckpt"))
    # VQ-GAN: E = continuous pre-quantisation latent; reconstruction through the codebook.
    out = run_cli(capsys, ["equivariance", "--vae", str(tmp_path / "vq.ckpt"), *VAE_ARGS])
    assert out["rotation"] > 0 and math.isfinite(out["psnr/scale"])
    # recon's LPIPS with random VGG weights (tests never download) equals LPIPS(decoder output, input) computed
    # here directly, image by image.
    lpips = models.LPIPS().eval()
    monkeypatch.setattr(checkpoints, "load_lpips", lambda *args, **kwargs: lpips)
    out = run_cli(capsys, ["recon", "--vae", str(tmp_path / "vq.ckpt"), *VAE_ARGS, "--no-fid"])
    assert out["num_images"] == 3 and "rfid" not in out
    vq = checkpoints.load_autoencoder(str(tmp_path / "vq.ckpt"))
    x = torch.stack([data.build_dataset("synthetic", 32, "center", num_images=3)[i][0] for i in range(3)])
    with torch.no_grad():
        expected = lpips(vq(x)[0], x).mean().item()
    assert out["lpips"] == pytest.approx(expected, rel=1e-4)


def test_cli_equivariance_id_latents(tmp_path, tiny_vae_file, capsys):
    out = run_cli(capsys, ["equivariance", "--vae", tiny_vae_file, *VAE_ARGS])
    assert {"rotation", "scale", "rot90", "scale0.25", "psnr/rotation"} <= set(out)
    assert out["rotation"] > 0 and out["scale"] > 0
    out = run_cli(capsys, ["id", "--vae", tiny_vae_file, "--data", "synthetic", "--resolution", "32",
                           "--num-images", "8", "--batch-size", "4", "--num-workers", "0", "--k", "3"])
    assert out["num_points"] == 8 and out["ambient_dim"] == 4 * 4 * 4
    rng = np.random.default_rng(0)
    np.save(tmp_path / "z.npy", rng.normal(size=(300, 2)) @ rng.normal(size=(2, 10)))   # a plane in 10-D
    out = run_cli(capsys, ["id", str(tmp_path / "z.npy")])
    assert out["twonn"] == pytest.approx(2, rel=0.2)
    out = run_cli(capsys, ["latents", "--vae", tiny_vae_file, *VAE_ARGS, "--out", str(tmp_path / "lat")])
    assert os.path.isfile(tmp_path / "lat" / "pca_rgb.png") and os.path.isfile(tmp_path / "lat" / "power_spectrum.png")
    assert Image.open(tmp_path / "lat" / "pca_rgb.png").size == (3 * 32, 2 * 32)   # images over PCA maps


@pytest.mark.parametrize("metric", ["equivariance", "recon"])
def test_torchrun_two_processes_match_one(tmp_path, tiny_vae_file, inception_file, metric):
    # 5 images over 2 ranks (shards of 2 and 3): the gathered per-image values give the one-process numbers; for
    # recon also the posterior samples, seeded per image (before they were not: PSNR 11.394 on 1 process, 11.425 on 2).
    args = ["evaluate.py", metric, "--vae", tiny_vae_file, "--data", "synthetic",
            "--resolution", "32", "--num-images", "5", "--batch-size", "2", "--num-workers", "0"]
    if metric == "recon":
        args += ["--no-lpips", "--inception", inception_file]
    outs = []
    for nproc in (1, 2):
        p = run_script(args, nproc=nproc, cwd=tmp_path)
        lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1, p.stdout                      # rank 0 alone prints
        outs.append(json.loads(lines[0]))
    assert outs[1]["num_images"] == outs[0]["num_images"] == 5
    for k, v in outs[0].items():
        assert outs[1][k] == pytest.approx(v, rel=1e-5), k


def test_intrinsic_dimension_needs_more_points_than_neighbours():
    with pytest.raises(ValueError, match="too few for 20 nearest neighbours"):
        evaluate.mle_id(np.random.default_rng(0).normal(size=(12, 5)), k=20)


def test_preset_tiny_fills_only_untyped_options(tmp_path, capsys):
    torch.manual_seed(0)
    path = str(tmp_path / "tiny.ckpt")
    checkpoints.save_ldm(models.KLVAE_models["tiny"](), path)
    evaluate.main(["equivariance", "--vae", path, "--preset", "tiny", "--num-images", "4", "--no-psnr"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["num_images"] == 4 and out["rotation"] > 0
    with pytest.raises(SystemExit):
        evaluate.main(["equivariance", "--vae", path])  # no --data and no preset: a usage error
