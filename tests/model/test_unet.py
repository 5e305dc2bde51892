import math

import pytest
import torch

from arcdiff.model.configs import CONFIGS, get_config
from arcdiff.model.unet import UNet, UNetConfig, count_parameters


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


def test_logsnr_conditioning_is_smooth_in_eta_and_finite_at_both_ends():
    """The legacy embedding's top frequency is 637 rad per unit eta (a ripple with period 0.0099);
    the log-SNR one is bounded by 1 / (4 sin(eta) cos(eta)) per unit eta, smooth at any step size."""
    from arcdiff.model.unet import logsnr_embedding, timestep_embedding

    eta = torch.linspace(0.05, math.pi / 2 - 0.05, 2001, dtype=torch.float64)
    h = float(eta[1] - eta[0])
    slope_logsnr = (logsnr_embedding(eta[1:], 16) - logsnr_embedding(eta[:-1], 16)).abs().amax() / h
    slope_eta = (timestep_embedding(eta[1:], 16, 1000.0) - timestep_embedding(eta[:-1], 16, 1000.0)).abs().amax() / h
    assert slope_logsnr < 1 / (4 * math.sin(0.05) * math.cos(0.05)) + 0.1, slope_logsnr
    assert slope_eta > 100 * slope_logsnr / 5
    ends = torch.tensor([0.0, math.pi / 2, float(torch.tensor(math.pi / 2))])
    assert torch.isfinite(logsnr_embedding(ends, 16)).all()
    net = UNet(UNetConfig.from_dict({**get_config("tiny").to_dict(), "time_cond": "logsnr"}))
    out = net(torch.randn(3, 1, 8, 8), ends)
    assert torch.isfinite(out).all()


def test_time_cond_is_checked_and_old_configs_keep_the_eta_embedding():
    old = {k: v for k, v in get_config("tiny").to_dict().items() if k != "time_cond"}
    assert UNetConfig.from_dict(old).time_cond == "eta"
    with pytest.raises(ValueError, match="time_cond"):
        UNetConfig.from_dict({**old, "time_cond": "sigma"})
