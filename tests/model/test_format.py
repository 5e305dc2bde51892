import json
import re

import pytest
import torch

from arcdiff.model.configs import get_config
from arcdiff.model.format import ModelFormatError, load_model, make_config, save_model
from arcdiff.model.registry import ModelRegistry
from arcdiff.model.solvers import sample
from arcdiff.model.unet import UNet


def make_model(folder, name="tiny", prediction="x0_eps", seed=0):
    torch.manual_seed(seed)
    cfg = get_config("tiny", heads=2 if prediction == "x0_eps" else 1)
    net = UNet(cfg)
    save_model(folder / name, net, make_config(name, cfg, prediction, {"steps": 0}))
    return net


def test_round_trip(tmp_path):
    net = make_model(tmp_path)
    loaded = load_model(tmp_path / "tiny")
    assert loaded.name == "tiny" and loaded.image_shape == (1, 8, 8)
    x, eta = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 1.0])
    with torch.no_grad():
        x0_hat, eps_hat = loaded.denoiser(x, eta)
        raw = net.eval()(x, eta)
    assert torch.equal(torch.cat([x0_hat, eps_hat], 1), raw)


def test_missing_files_are_named(tmp_path):
    make_model(tmp_path)
    (tmp_path / "tiny" / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: file is missing"):
        load_model(tmp_path / "tiny")
    with pytest.raises(ModelFormatError, match=r"config\.json: file is missing"):
        load_model(tmp_path / "nothing")


def test_truncated_weights(tmp_path):
    make_model(tmp_path)
    w = tmp_path / "tiny" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: cannot read safetensors"):
        load_model(tmp_path / "tiny")


def test_mismatched_architecture(tmp_path):
    make_model(tmp_path)
    cfg_path = tmp_path / "tiny" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architecture"]["ch"] = 16
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="shape mismatch"):
        load_model(tmp_path / "tiny")
    cfg["prediction"] = "eps"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="needs 1 head"):
        load_model(tmp_path / "tiny")
    cfg_path.write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(tmp_path / "tiny")


def test_registry_lists_and_loads(tmp_path):
    make_model(tmp_path, "a")
    make_model(tmp_path, "b-eps", prediction="eps")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("[]")
    (tmp_path / "notes").mkdir()  # not a model folder: ignored
    reg = ModelRegistry(tmp_path)
    assert reg.names() == ["a", "b-eps"]
    assert "broken" in reg.errors and "expected a JSON object" in reg.errors["broken"]
    info = reg.info("b-eps")
    assert (info.prediction, info.image_size, info.channels, info.kind) == ("eps", 8, 1, "arcdiff")
    assert info.parameters == sum(p.numel() for p in UNet(get_config("tiny", heads=1)).parameters())
    with pytest.raises(KeyError, match=re.escape("unknown model '../etc'")):
        reg.info("../etc")
    out = sample(reg.load("a").denoiser, torch.randn(2, 1, 8, 8), 2, "ddim")
    assert out.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusers_unet_loads_into_registry(tmp_path, prediction_type):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sched)
    pipe.save_pretrained(tmp_path / "ddpm-small", safe_serialization=True)
    reg = ModelRegistry(tmp_path)
    info = reg.info("ddpm-small")
    assert info.kind == "diffusers" and info.image_size == 16 and info.channels == 3
    assert info.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction_type]
    loaded = reg.load("ddpm-small")
    # at the angle of timestep t the adapter asks the UNet about exactly t
    t = 500
    eta = torch.arccos(sched.alphas_cumprod[t].double().sqrt()).float().expand(2)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        x0_hat, eps_hat = loaded.denoiser(x, eta)
        raw = unet(x, torch.tensor([float(t)] * 2)).sample
    ab = sched.alphas_cumprod[t]
    if prediction_type == "epsilon":
        assert torch.allclose(eps_hat, raw, atol=1e-5)
    else:
        assert torch.allclose(x0_hat, ab.sqrt() * x - (1 - ab).sqrt() * raw, atol=1e-4)
    out = sample(loaded.denoiser, torch.randn(1, 3, 16, 16), 3, "rk4")
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_distilled_object_is_read_and_exposed(tmp_path):
    from arcdiff.model.format import Distilled

    torch.manual_seed(0)
    cfg = get_config("tiny", heads=2)
    d = Distilled(teacher="tiny", steps=4, solver="ddim", schedule="uniform", rounds=3, teacher_steps=32)
    save_model(tmp_path / "tiny-4step", UNet(cfg), make_config("tiny-4step", cfg, "x0_eps", {"steps": 0}, d))
    make_model(tmp_path)
    written = json.loads((tmp_path / "tiny-4step" / "config.json").read_text())
    assert written["distilled"] == {
        "teacher": "tiny",
        "steps": 4,
        "solver": "ddim",
        "schedule": "uniform",
        "rounds": 3,
        "teacher_steps": 32,
    }
    reg = ModelRegistry(tmp_path)
    assert reg.info("tiny-4step").distilled == d
    assert reg.info("tiny").distilled is None  # a model that was not distilled has no such field
    assert "distilled" not in json.loads((tmp_path / "tiny" / "config.json").read_text())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "distilled.steps"),
        ("steps", "4", "distilled.steps"),
        ("solver", "magic", "distilled.solver"),
        ("schedule", "cosine", "distilled.schedule"),
        ("teacher", "", "distilled.teacher"),
        ("rounds", -1, "distilled.rounds"),
    ],
)
def test_malformed_distilled_object_is_named(tmp_path, field, value, message):
    make_model(tmp_path)
    cfg_path = tmp_path / "tiny" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["distilled"] = {"teacher": "mnist", "steps": 2, "solver": "ddim", "schedule": "uniform", field: value}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=message):
        load_model(tmp_path / "tiny")
    assert "tiny" in ModelRegistry(tmp_path).errors  # the registry keeps the folder out, with the reason


def test_a_distilled_model_defaults_a_request_to_what_it_was_distilled_for(tmp_path):
    from arcdiff.model.format import Distilled
    from arcdiff.model.solver_names import resolve

    torch.manual_seed(0)
    cfg = get_config("tiny", heads=2)
    d = Distilled(teacher="tiny", steps=2, solver="ddim", schedule="uniform", rounds=4, teacher_steps=32)
    save_model(tmp_path / "tiny-2step", UNet(cfg), make_config("tiny-2step", cfg, "x0_eps", {}, d))
    make_model(tmp_path)
    reg = ModelRegistry(tmp_path)
    student, teacher = reg.info("tiny-2step"), reg.info("tiny")
    assert student.resolve(None, None, None) == ("ddim", 2, "uniform")
    assert student.resolve("ddim", None, None) == ("ddim", 2, "uniform")
    assert student.resolve(None, 4, None) == ("ddim", 4, "uniform")  # a step count it names is kept
    assert student.resolve("rk4", None, None) == resolve("rk4", None, None)  # another solver: its defaults
    assert teacher.resolve(None, None, None) == resolve(None, None, None)


def test_a_distilled_quality_must_be_an_object():
    from arcdiff.model.catalog import read_distilled
    from arcdiff.model.format import ModelFormatError

    base = {"teacher": "tiny", "steps": 2, "solver": "ddim", "schedule": "uniform"}
    measured = read_distilled({"distilled": {**base, "quality": {"fd": {"mnist": {"student": 18.0}}}}})
    assert measured is not None and measured.to_dict()["quality"] == {"fd": {"mnist": {"student": 18.0}}}
    assert "quality" not in read_distilled({"distilled": base}).to_dict()  # absent stays absent
    with pytest.raises(ModelFormatError, match=r"distilled\.quality"):
        read_distilled({"distilled": {**base, "quality": 18.0}})
