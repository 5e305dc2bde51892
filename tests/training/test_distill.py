"""Progressive distillation on a tiny dual-head model made on the spot (8x8x1, random weights)."""

import json
import math
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from servicekit import make_models

from arcdiff.cli.main import main
from arcdiff.model.format import Distilled, load_model
from arcdiff.model.registry import ModelRegistry
from arcdiff.model.schedule import grid_etas
from arcdiff.model.solvers import sample
from arcdiff.training.data import to_model_range
from arcdiff.training.distill import (
    Distiller,
    DistillSettings,
    TrainingError,
    ddim_step,
    distill,
    distill_loss,
    make_targets,
    student_targets,
)


def blobs(n=64, size=8, seed=0) -> torch.Tensor:
    """Made-up data: a bright square at a random place on a dark background (uint8, 1 channel)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    pos = torch.randint(0, size - 3, (n, 2), generator=g)
    for k, (i, j) in enumerate(pos.tolist()):
        img[k, 0, i : i + 3, j : j + 3] = 255
    return img


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"))


def settings(models, tmp_path, **kw) -> DistillSettings:
    base = dict(
        teacher=str(models / "tiny"),
        data="made-up",
        out=str(tmp_path / "run"),
        teacher_steps=4,
        final_steps=1,
        round_steps=3,
        batch=8,
        lr=2e-3,
        warmup=1,
        checkpoint_every=2,
        seed=0,
    )
    base.update(kw)
    return DistillSettings(**base)


def constant(x0, eps):
    """A denoiser that answers (x0, eps) wherever it is asked."""
    return lambda x, eta: (x0, eps)


def test_one_student_ddim_step_lands_on_two_teacher_steps(models):
    """The closed-form targets, fed to the project's own ddim solver as the student's heads, take
    x_t in one step to where two ddim steps of the teacher on the grid of 2N take it."""
    teacher = load_model(models / "tiny").denoiser
    n = 4
    x0 = to_model_range(blobs(2 * n)).double()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    i = torch.arange(n).repeat(2)  # every step of the student's grid: from pure noise, and to eta = 0
    # the network in float32, everything around it in float64
    tw = lambda x, e: tuple(h.double() for h in teacher(x.float(), e.float()))  # noqa: E731
    with torch.no_grad():
        b = make_targets(tw, x0, eps, i, n)
        grid_n, grid_2n = grid_etas(n), grid_etas(2 * n)
        t, mid, s = grid_n[i], grid_2n[2 * i + 1], grid_n[i + 1]
        x_t = b.x_t
        # the teacher: two steps of the project's ddim solver over (t, mid, s)
        two = sample(tw, x_t, 2, "ddim", etas=torch.stack([t, mid, s], 1))
        # the student at its targets: one step over (t, s)
        one = sample(constant(b.x0_tgt, b.eps_tgt), x_t, 1, "ddim", etas=torch.stack([t, s], 1))
        # a student that merely copied the teacher would not get there (so the check can fail)
        copy = sample(tw, x_t, 1, "ddim", etas=torch.stack([t, s], 1))
    assert torch.allclose(one, two, atol=1e-6, rtol=0), (one - two).abs().max()
    assert (copy - two).abs().max() > 1e-3
    # the targets are the formula, and consistent with x_t
    st, ss, ct, cs = (
        f(e)[:, None, None, None] for f, e in ((torch.sin, t), (torch.sin, s), (torch.cos, t), (torch.cos, s))
    )
    assert torch.allclose(b.x0_tgt, (two - ss / st * x_t) / (cs - ss * ct / st), atol=1e-6)
    assert torch.allclose(ct * b.x0_tgt + st * b.eps_tgt, x_t, atol=1e-6)
    assert torch.allclose(b.weight, torch.clamp((ct / st)[:, 0, 0, 0] ** 2, min=1))


def test_ddim_step_is_the_solvers_ddim(models):
    teacher = load_model(models / "tiny").denoiser
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    eta, eta_next = torch.tensor([1.5, 0.9, 0.3]), torch.tensor([1.1, 0.5, 0.0])
    with torch.no_grad():
        mine = ddim_step(x, *teacher(x, eta), eta, eta_next)
        theirs = sample(teacher, x, 1, "ddim", etas=torch.stack([eta, eta_next], 1).double())
    assert torch.allclose(mine, theirs, atol=1e-6)


def test_student_targets_by_hand():
    t, s = torch.tensor([math.pi / 2, 0.6]), torch.tensor([math.pi / 4, 0.0])
    x_t, x_target = torch.full((2, 1, 1, 1), 0.5), torch.full((2, 1, 1, 1), 0.2)
    x0, eps = student_targets(x_t, x_target, t, s)
    # from pure noise (t = pi/2): x'' = cos s x0 + sin s x_t; to the data (s = 0): x0 = x''
    assert x0[0].item() == pytest.approx((0.2 - math.sin(math.pi / 4) * 0.5) / math.cos(math.pi / 4))
    assert eps[0].item() == pytest.approx(0.5)
    assert x0[1].item() == pytest.approx(0.2)


def test_a_round_lowers_the_distillation_loss(models, tmp_path):
    d = Distiller(settings(models, tmp_path, teacher_steps=8, round_steps=40, batch=16, lr=3e-3), images=blobs(256))
    g = torch.Generator().manual_seed(5)
    x0 = to_model_range(blobs(64, seed=3))
    eps = torch.randn(x0.shape, generator=g)
    i = torch.randint(0, d.student_steps(), (64,), generator=g)
    b = make_targets(d.teacher_fn, x0, eps, i, d.student_steps())
    with torch.no_grad():
        before = distill_loss(d.student_fn, b).mean().item()
    for _ in range(40):
        d.train_step()
    with torch.no_grad():
        after = distill_loss(d.student_fn, b).mean().item()
    assert before > 0  # the student starts as the teacher: one step of it is not two
    assert after < 0.7 * before, (before, after)


def test_resume_is_bit_exact_and_the_students_are_models(models, tmp_path):
    data = blobs()
    straight = distill(settings(models, tmp_path / "a"), progress=False, images=data)
    part = distill(settings(models, tmp_path / "b"), progress=False, images=data, stop_after=4)  # into round 2
    assert [p.name for p in part] == ["tiny-2step"]
    state = json.loads((tmp_path / "b" / "run" / "checkpoint.json").read_text())
    assert state["step"] == 4 and state["done"] is False
    resumed = distill(settings(models, tmp_path / "b"), resume=True, progress=False, images=data)
    assert [p.name for p in straight] == [p.name for p in resumed] == ["tiny-2step", "tiny-1step"]
    for a_dir, b_dir in zip(straight, resumed, strict=True):
        a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), a_dir.name
    final = json.loads((tmp_path / "b" / "run" / "checkpoint.json").read_text())
    assert final["done"] is True
    assert [c[:2] for c in final["curve"]] == [[2, 2], [3, 2], [4, 1], [6, 1]]  # step, student steps
    assert all(math.isfinite(c[2]) for c in final["curve"])  # a round's last loss is logged before its reset
    # the students differ from the teacher (they were trained) and from each other
    teacher = load_file(str(models / "tiny" / "model.safetensors"))
    two = load_file(str(straight[0] / "model.safetensors"))
    assert any(not torch.equal(teacher[k], two[k]) for k in teacher)

    # each student: a model folder that says what it is, found by the registry, sampled with ddim
    registry = ModelRegistry(tmp_path / "a" / "run")
    assert registry.names() == ["tiny-1step", "tiny-2step"]
    for name, steps, rounds in (("tiny-2step", 2, 1), ("tiny-1step", 1, 2)):
        info = registry.info(name)
        assert info.distilled == Distilled("tiny", steps, "ddim", "uniform", rounds, 4)
        assert info.config["distilled"]["steps"] == steps and info.config["training"]["round_steps"] == 3
        assert info.prediction == "x0_eps"
        model = registry.load(name)
        x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = sample(model.denoiser, x_T, info.distilled.steps, info.distilled.solver, schedule="uniform")
        assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_a_first_round_from_more_teacher_steps_lands_on_all_of_them(models):
    """With substeps K the targets take x_t in one student step to where K teacher ddim steps on the
    grid of K * N take it: a first round can start from a many-step teacher."""
    teacher = load_model(models / "tiny").denoiser
    n, k = 2, 8
    x0 = to_model_range(blobs(2 * n)).double()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    i = torch.arange(n).repeat(2)
    tw = lambda x, e: tuple(h.double() for h in teacher(x.float(), e.float()))  # noqa: E731
    with torch.no_grad():
        b = make_targets(tw, x0, eps, i, n, substeps=k)
        grid_k = grid_etas(k * n)
        path = torch.stack([grid_k[k * i + j] for j in range(k + 1)], 1)
        many = sample(tw, b.x_t, k, "ddim", etas=path)
        one = sample(constant(b.x0_tgt, b.eps_tgt), b.x_t, 1, "ddim", etas=path[:, [0, -1]])
        two = sample(tw, b.x_t, 2, "ddim", etas=path[:, [0, k // 2, -1]])
    assert torch.allclose(one, many, atol=1e-6, rtol=0), (one - many).abs().max()
    assert (two - many).abs().max() > 1e-4  # two teacher steps are not eight (the check can fail)


def test_rounds_and_student_steps_with_a_first_round_of_many_substeps(models, tmp_path):
    s = settings(models, tmp_path, teacher_steps=64, first_substeps=8, final_steps=1)
    assert s.rounds() == 4 and [s.student_steps(r) for r in range(4)] == [8, 4, 2, 1]
    assert [s.substeps(r) for r in range(4)] == [8, 2, 2, 2]
    paper = settings(models, tmp_path, teacher_steps=64, final_steps=1)
    assert paper.rounds() == 6 and [paper.student_steps(r) for r in range(6)] == [32, 16, 8, 4, 2, 1]
    with pytest.raises(TrainingError, match="first-substeps"):
        Distiller(settings(models, tmp_path, first_substeps=3), images=blobs())
    with pytest.raises(TrainingError, match="at least"):
        Distiller(settings(models, tmp_path, teacher_steps=4, first_substeps=8), images=blobs())


def test_refusals(models, tmp_path):
    with pytest.raises(TrainingError, match="power of 2"):
        Distiller(settings(models, tmp_path, teacher_steps=6), images=blobs())
    with pytest.raises(TrainingError, match="nested grid"):
        Distiller(settings(models, tmp_path, schedule="karras"), images=blobs())
    with pytest.raises(TrainingError, match="dual-head"):
        Distiller(settings(models, tmp_path, teacher=str(models / "tiny-eps")), images=blobs())
    with pytest.raises(TrainingError, match="unknown model"):
        Distiller(settings(models, tmp_path, teacher="no-such-model"), images=blobs())
    distill(settings(models, tmp_path), progress=False, images=blobs(), stop_after=2)
    with pytest.raises(TrainingError, match=re.escape("lr: checkpoint 0.002, now 0.001")):
        distill(settings(models, tmp_path, lr=1e-3), resume=True, progress=False, images=blobs())
    with pytest.raises(TrainingError, match="already holds a checkpoint"):
        distill(settings(models, tmp_path), progress=False, images=blobs())


def test_command_line(models, tmp_path, capsys):
    pics = tmp_path / "pics"
    pics.mkdir()
    for k, img in enumerate(blobs(8)):
        Image.fromarray(img[0].numpy()).save(pics / f"{k}.png")
    args = ["distill", "--teacher", str(models / "tiny"), "--data", str(pics), "--out", str(tmp_path / "run")]
    args += ["--teacher-steps", "2", "--round-steps", "2", "--batch", "4", "--threads", "1", "--quiet"]
    assert main(args) == 0
    assert "tiny-1step" in capsys.readouterr().out
    assert main(args) == 2  # a second run without --resume is refused
    assert main([*args, "--resume"]) == 0  # nothing left to do: the folders are named again
    assert load_model(tmp_path / "run" / "tiny-1step").config["distilled"]["teacher"] == "tiny"
