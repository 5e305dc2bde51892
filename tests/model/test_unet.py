import pytest
import torch

from arcdiff.model.configs import CONFIGS, get_config
from arcdiff.model.unet import UNet, count_parameters


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shapes_on_meta_device(name):
    cfg = get_config(name)
    with torch.device("meta"):
        net = UNet(cfg)
        x = torch.empty(2, cfg.channels, cfg.image_size, cfg.image_size)
        out = net(x, torch.empty(2))
    assert out.shape == (2, 2 * cfg.channels, cfg.image_size, cfg.image_size)
    assert out.dtype == torch.float32


def test_published_sizes():
    with torch.device("meta"):
        n = count_parameters(UNet(get_config("cifar10", heads=1)))
    assert abs(n - 35.7e6) < 0.1e6, n
    with torch.device("meta"):
        assert count_parameters(UNet(get_config("church256", heads=1))) == pytest.approx(113.7e6, rel=0.01)
        assert count_parameters(UNet(get_config("mnist"))) < 2.5e6  # ships under 10 MB in float32


@pytest.mark.parametrize("heads", [1, 2])
def test_tiny_forward_dtypes_and_channels_last(heads):
    cfg = get_config("tiny", heads=heads)
    net = UNet(cfg).eval()
    x = torch.randn(3, 1, 8, 8)
    eta = torch.tensor([0.0, 0.7, 1.5707])
    out = net(x, eta)
    assert out.shape == (3, heads, 8, 8)
    out_cl = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), eta)
    assert torch.allclose(out, out_cl, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x, eta).dtype == torch.bfloat16


def test_odd_sizes_and_continuous_eta():
    net = UNet(get_config("mnist")).eval()
    x = torch.randn(2, 1, 28, 28)
    a = net(x, torch.tensor([0.5, 0.5]))
    b = net(x, torch.tensor([0.5001, 0.5001]))
    assert a.shape == (2, 2, 28, 28)
    assert 0 < (a - b).abs().max() < 0.1  # continuous in eta: a tiny change of angle changes little


def test_compiles_in_one_graph():
    torch._dynamo.reset()
    net = UNet(get_config("tiny")).eval()
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    x, eta = torch.randn(2, 1, 8, 8), torch.rand(2)
    with torch.no_grad():
        assert torch.allclose(compiled(x, eta), net(x, eta), atol=1e-6)
