import gzip
import json
import math
import re
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from arcdiff.model.format import load_model
from arcdiff.training.data import DataError, load_cifar10, load_images, load_mnist, read_idx
from arcdiff.training.train import Trainer, TrainingError, TrainSettings, train


def blobs(n=64, size=8, seed=0) -> torch.Tensor:
    """Made-up data: a bright square at a random place on a dark background (uint8, 1 channel)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    pos = torch.randint(0, size - 3, (n, 2), generator=g)
    for k, (i, j) in enumerate(pos.tolist()):
        img[k, 0, i : i + 3, j : j + 3] = 255
    return img


def settings(tmp_path, **kw) -> TrainSettings:
    base = dict(
        config="tiny",
        data="made-up",
        out=str(tmp_path / "run"),
        steps=6,
        batch=8,
        lr=2e-3,
        warmup=2,
        checkpoint_every=3,
        seed=0,
    )
    base.update(kw)
    return TrainSettings(**base)


@pytest.mark.parametrize("objective", ["dual", "eps", "x0"])
def test_loss_falls(tmp_path, objective):
    torch.manual_seed(0)
    trainer = Trainer(settings(tmp_path, objective=objective, batch=16, lr=3e-3, warmup=5), images=blobs(256))
    losses = [trainer.train_step() for _ in range(50)]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.7 * first, (objective, first, last)


def test_resume_is_bit_exact(tmp_path):
    data = blobs()
    straight = train(settings(tmp_path / "a", steps=6), progress=False, images=data)
    train(settings(tmp_path / "b", steps=3), progress=False, images=data)
    resumed = train(settings(tmp_path / "b", steps=6), resume=True, progress=False, images=data)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the exported folder is a servable model with the training facts
    m = load_model(resumed)
    assert m.config["training"]["steps"] == 6 and m.config["prediction"] == "x0_eps"


def test_resume_refuses_changed_settings(tmp_path):
    train(settings(tmp_path, steps=3), progress=False, images=blobs())
    with pytest.raises(TrainingError, match=re.escape("lr: checkpoint 0.002, now 0.001")):
        train(settings(tmp_path, steps=6, lr=1e-3), resume=True, progress=False, images=blobs())
    with pytest.raises(TrainingError, match="already holds a checkpoint"):
        train(settings(tmp_path, steps=6), progress=False, images=blobs())


def test_resume_of_a_checkpoint_older_than_a_setting(tmp_path):
    """A checkpoint written before a setting existed resumes with that setting at its default, and
    is refused with another value."""
    train(settings(tmp_path, steps=3), progress=False, images=blobs())
    state_file = tmp_path / "run" / "checkpoint.json"
    state = json.loads(state_file.read_text())
    for key in ("arch", "eta_density", "lr_schedule", "lr_min_ratio"):
        del state["settings"][key]
    state_file.write_text(json.dumps(state))
    with pytest.raises(TrainingError, match="eta_density: checkpoint 'uniform', now 'logit_normal'"):
        train(settings(tmp_path, steps=6, eta_density="logit_normal"), resume=True, progress=False, images=blobs())
    folder = train(settings(tmp_path, steps=6), resume=True, progress=False, images=blobs())
    assert load_model(folder).config["training"]["steps"] == 6


def write_idx(path, arr: np.ndarray, gz: bool):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_loader(tmp_path, gz):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", imgs, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(5), gz)
    x, y = load_mnist(tmp_path)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.uint8
    assert np.array_equal(x[:, 0].numpy(), imgs) and y.tolist() == [0, 1, 2, 3, 4]
    assert load_images(tmp_path, 32, 1).shape == (5, 1, 32, 32)  # resized to a config's size


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_images(tmp_path / "missing", 28, 1)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(bad, np.zeros((4, 28, 28)), gz=False)
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DataError, match="promises 3136 bytes"):
        read_idx(bad)
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_images(tmp_path / "empty", 28, 1)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=re.escape("a.png: cannot read image")):
        load_images(tmp_path / "pics", 28, 1)
    with pytest.raises(TrainingError, match="unknown objective"):
        Trainer(settings(tmp_path, objective="v"), images=blobs())


def test_image_folder_and_cifar_binary(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "imgs" / "r.png")
    Image.new("RGB", (30, 30), (0, 0, 255)).save(tmp_path / "imgs" / "b.jpg")
    x = load_images(tmp_path / "imgs", 16, 3)
    assert x.shape == (2, 3, 16, 16)
    assert x[1, 0].float().mean() > 200 and x[0, 2].float().mean() > 200  # b.jpg sorts first
    rec = np.zeros((3, 3073), dtype=np.uint8)
    rec[:, 0] = [1, 2, 3]
    rec[:, 1:] = 7
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "data_batch_1.bin").write_bytes(rec.tobytes())
    imgs, labels = load_cifar10(tmp_path / "cifar")
    assert imgs.shape == (3, 3, 32, 32) and labels.tolist() == [1, 2, 3] and int(imgs.max()) == 7


def test_recipe_options_reach_the_exported_model(tmp_path):
    """--arch overrides, the eta density and the lr schedule are part of the run and of the model folder."""
    from arcdiff.model.registry import ModelRegistry

    s = settings(
        tmp_path, arch={"ch": 12, "time_cond": "logsnr"}, eta_density="logit_normal", lr_schedule="cosine", steps=4
    )
    folder = train(s, images=blobs(), progress=False)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"]["ch"] == 12 and cfg["architecture"]["time_cond"] == "logsnr"
    assert cfg["training"]["eta_density"] == "logit_normal" and cfg["training"]["lr_schedule"] == "cosine"
    model = ModelRegistry(folder.parent).load(folder.name)
    x0_hat, eps_hat = model.denoiser(torch.randn(2, 1, 8, 8), torch.tensor([0.0, math.pi / 2]))
    assert torch.isfinite(x0_hat).all() and torch.isfinite(eps_hat).all()
    with pytest.raises(TrainingError, match="ch_mult"):
        Trainer(settings(tmp_path / "b", arch={"ch_mult": "wide"}), images=blobs())


def test_lr_schedules_and_eta_densities():
    from arcdiff.model.loss import DiffusionLoss
    from arcdiff.training.train import lr_at

    s = TrainSettings(config="tiny", data="", out="", lr=1e-3, warmup=10, steps=110, lr_schedule="cosine")
    assert lr_at(4, s) == pytest.approx(0.5e-3)
    assert lr_at(10, s) == pytest.approx(1e-3)
    assert lr_at(110, s) == pytest.approx(1e-4)
    assert lr_at(60, s) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(100, TrainSettings(config="tiny", data="", out="", lr=1e-3, warmup=10)) == 1e-3
    g = torch.Generator().manual_seed(0)
    mid = lambda e: ((e > math.pi / 8) & (e < 3 * math.pi / 8)).double().mean().item()  # noqa: E731
    uniform = DiffusionLoss("dual", eta_density="uniform").draw_eta(20000, g)
    logit = DiffusionLoss("dual", eta_density="logit_normal").draw_eta(20000, g)
    assert abs(mid(uniform) - 0.5) < 0.02
    assert abs(mid(logit) - 0.7266) < 0.02  # P(|N(0,1)| < logit(3/4))
    assert logit.min() >= 0 and logit.max() <= math.pi / 2
    with pytest.raises(ValueError, match="eta density"):
        DiffusionLoss("dual", eta_density="middle")


def test_channels_last_trains_the_same_run(tmp_path):
    """The GPU settings change the memory layout, not the run: same losses and weights within float error."""
    data = blobs()
    plain, nhwc = (
        Trainer(settings(tmp_path / "a"), images=data),
        Trainer(settings(tmp_path / "b", channels_last=True), images=data),
    )
    losses = [(plain.train_step(), nhwc.train_step()) for _ in range(4)]
    assert all(abs(a - b) < 1e-4 * max(1.0, abs(a)) for a, b in losses), losses
    # weights may differ by a few Adam steps' worth (lr per step) where a gradient is near zero and
    # rounding flips its sign; the networks must still compute the same function
    x, eta = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.linspace(0.1, 1.5, 4)
    with torch.no_grad():
        a, b = plain.ema(x, eta), nhwc.ema(x.contiguous(memory_format=torch.channels_last), eta)
    assert (a - b).abs().max() < 1e-2 * a.abs().max(), (a - b).abs().max()


@pytest.mark.slow
def test_compiled_training_step_matches_eager(tmp_path):
    data = blobs()
    eager, compiled = (
        Trainer(settings(tmp_path / "a"), images=data),
        Trainer(settings(tmp_path / "b", compile=True), images=data),
    )
    losses = [(eager.train_step(), compiled.train_step()) for _ in range(3)]
    assert all(abs(a - b) < 1e-3 * max(1.0, abs(a)) for a, b in losses), losses
