"""LPIPS (VGG, v0.1) against a hand computation on torchvision's VGG16, its metric properties, weight loading
through the fixture key names, and find_weights' cache/offline behaviour."""
import json
import os

import pytest
import torch
from torchvision.models import vgg as tv_vgg

import checkpoints
import models

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(0)
    return models.LPIPS()


def test_frozen_eval_and_gradients_reach_the_input(lpips):
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_()
    d = lpips(x, torch.zeros(2, 3, 16, 16))
    assert d.shape == (2,)
    d.sum().backward()  # used as a training loss: gradients must flow to the reconstruction
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_matches_hand_computation_on_torchvision_vgg16(lpips):
    # Independent path: torchvision's own VGG16 "D" feature stack with our weights, activations taken after
    # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (features indices 3, 8, 15, 22, 29), LPIPS formula written out.
    features = tv_vgg.make_layers(tv_vgg.cfgs["D"], batch_norm=False)
    features.load_state_dict(lpips.features.state_dict(), strict=False)  # ours stops before the last max-pool
    lin = [lpips.lins[f"lin{k}"].model[1].weight.view(-1) for k in range(5)]
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        out, h = [], (img - shift) / scale
        for i, layer in enumerate(features):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                out.append(h)
            if i == 29:
                return out
    with torch.no_grad():
        expected = torch.zeros(2)
        for k, (fx, fy) in enumerate(zip(taps(x), taps(y))):
            nx = fx / (torch.sqrt((fx ** 2).sum(1, keepdim=True)) + 1e-10)
            ny = fy / (torch.sqrt((fy ** 2).sum(1, keepdim=True)) + 1e-10)
            expected += torch.einsum("nchw,c->nhw", (nx - ny) ** 2, lin[k]).mean(dim=(1, 2))
        torch.testing.assert_close(lpips(x, y), expected, rtol=1e-5, atol=1e-7)
    assert [f.shape[1] for f in taps(x)] == list(models.LPIPS.chns)


def test_metric_properties(lpips):
    torch.manual_seed(2)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    noise = torch.randn_like(x)
    with torch.no_grad():
        assert torch.all(lpips(x, x) == 0)
        y = (x + 0.2 * noise).clamp(-1, 1)
        torch.testing.assert_close(lpips(x, y), lpips(y, x))
        d = [lpips(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.8)]
    assert 0 < d[0] < d[1] < d[2]


def _fixture_state_dict(name, keep=lambda k: True):
    with open(os.path.join(FIXTURES, name)) as f:
        shapes = json.load(f)["shapes"]
    g = torch.Generator().manual_seed(0)
    return {k: torch.rand(s, generator=g) * 0.01 for k, s in shapes.items() if keep(k)}


def test_loads_weight_files_with_upstream_key_names(tmp_path):
    # The torchvision VGG16 and LPIPS v0.1 lin key names (fixtures), stored the way the released files are.
    vgg = _fixture_state_dict("torchvision_vgg16.json", keep=lambda k: k.startswith("features."))
    lin = _fixture_state_dict("lpips_vgg_lin_v0.1.json")
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    m = checkpoints.load_lpips(vgg_weights=str(tmp_path / "vgg16-397923af.pth"), lin_weights=str(tmp_path / "vgg.pth"))
    assert torch.equal(m.features[28].weight, vgg["features.28.weight"])
    assert torch.equal(m.lins["lin4"].model[1].weight, lin["lin4.model.1.weight"])
    lin["lin5.model.1.weight"] = torch.zeros(1, 8, 1, 1)
    torch.save(lin, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="lin5"):
        checkpoints.load_lpips(vgg_weights=str(tmp_path / "vgg16-397923af.pth"), lin_weights=str(tmp_path / "bad.pth"))


def test_find_weights(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        checkpoints.find_weights("vgg.pth", "https://example.invalid/vgg.pth", path=str(tmp_path / "missing.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    # Offline (here: a URL that cannot be fetched) with nothing cached: the message says what and where.
    missing_url = (tmp_path / "no_such_file.pth").as_uri()
    with pytest.raises(FileNotFoundError) as e:
        checkpoints.find_weights("vgg.pth", missing_url)
    assert missing_url in str(e.value) and os.path.join(str(tmp_path / "hub"), "checkpoints", "vgg.pth") in str(e.value)
    # A reachable URL is downloaded into the cache once, then found there.
    src = tmp_path / "src.pth"
    torch.save({"w": torch.ones(1)}, src)
    path = checkpoints.find_weights("vgg.pth", src.as_uri())
    assert path == os.path.join(str(tmp_path / "hub"), "checkpoints", "vgg.pth") and os.path.isfile(path)
    os.remove(src)
    assert checkpoints.find_weights("vgg.pth", src.as_uri()) == path


def test_equals_the_lpips_package_with_its_shipped_lin_layers():
    import lpips as lpips_package  # the reference (requirements-test.txt); pnet_rand: random VGG, nothing downloaded
    ref = lpips_package.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    ours = models.LPIPS()
    # The package splits VGG16's features into slice1..5 keeping torchvision's indices; its lin layers are the
    # released v0.1 weights the wheel ships.
    ours.features.load_state_dict({k.split(".", 1)[1]: v for k, v in ref.net.state_dict().items()})
    with torch.no_grad():
        for k in range(5):
            ours.lins[f"lin{k}"].model[1].weight.copy_(getattr(ref, f"lin{k}").model[1].weight)
    torch.manual_seed(2)
    x, y = torch.rand(3, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), ref(x, y).flatten(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours(x, x), torch.zeros(3), rtol=0, atol=1e-7)
