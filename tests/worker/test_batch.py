"""The running rows of one model (arcdiff/worker/batch.py, RunningBatch): what the engine gathers
for a plan and where the network's output goes back, with a stand-in network (no model)."""

from dataclasses import dataclass

import pytest
import torch

from arcdiff.contract import GenerationSpec
from arcdiff.model.rng import image_generator, image_seed, initial_noise
from arcdiff.worker.batch import RunningBatch
from arcdiff.worker.loading import PAD_ETA

SHAPE = (1, 4, 4)


@dataclass(eq=False)
class Gen:
    spec: GenerationSpec
    closed: bool = False


def gen(id, n=1, steps=3, solver="ddim", priority="interactive", seed=0):
    return Gen(GenerationSpec(id, "m", steps, solver, seed, n, 0.0, priority=priority))


def images(*gens):
    return [(g, k) for g in gens for k in range(g.spec.n)]


def zero_net(x, eta):
    """A network that predicts x0 = 0 and eps = x / sin(eta) (so each row's output is its own)."""
    return torch.zeros_like(x), x / torch.sin(eta).view(-1, 1, 1, 1)


@pytest.fixture
def rows():
    with torch.inference_mode():
        yield RunningBatch(SHAPE, torch.device("cpu"))


def test_admitted_images_join_their_group_with_their_seeds_noise(rows):
    a, b, c = gen("a", 2, seed=7), gen("b", solver="euler"), gen("c", priority="batch")
    rows.join(images(a, b, c))
    assert list(rows.groups) == [("ddim", "interactive"), ("euler", "interactive"), ("ddim", "batch")]
    assert rows.groups[("ddim", "interactive")].slots == [(a, 0), (a, 1)]
    x, eta = rows.gather([(("ddim", "interactive"), 2)], 2)
    want = torch.stack([initial_noise(SHAPE, image_generator(image_seed(7, k))) for k in range(2)])
    assert torch.equal(x, want) and torch.allclose(eta, torch.full((2,), torch.pi / 2, dtype=eta.dtype))
    rows.join(images(gen("d", seed=1)))  # later images go to the end of their group
    assert [o.spec.id for o, _k in rows.groups[("ddim", "interactive")].slots] == ["a", "a", "d"]


def test_gather_takes_the_first_rows_of_each_group_in_plan_order_and_pads(rows):
    a, b = gen("a", 3), gen("b", 2, priority="batch")
    rows.join(images(a, b))
    run = [(("ddim", "batch"), 1), (("ddim", "interactive"), 2)]
    x, eta = rows.gather(run, 8)
    assert x.shape == (8, *SHAPE) and eta.shape == (8,)
    first_b = rows.groups[("ddim", "batch")].point(1)[0][0]
    assert torch.equal(x[0], first_b) and torch.equal(x[1:3], rows.groups[("ddim", "interactive")].point(2)[0])
    assert torch.equal(x[3:], torch.zeros(5, *SHAPE)) and torch.all(eta[3:] == PAD_ETA)
    assert [(o.spec.id, k, left) for o, k, left in rows.ran(run)] == [("b", 0, 3), ("a", 0, 3), ("a", 1, 3)]


def test_scatter_advances_only_the_rows_that_ran_and_hands_back_the_finished(rows):
    a, b = gen("a", 2, steps=2), gen("b", steps=1, priority="batch")
    rows.join(images(a, b))
    run = [(("ddim", "interactive"), 1), (("ddim", "batch"), 1)]
    out = zero_net(*rows.gather(run, 2))
    left = rows.scatter(run, *out)
    assert [(key, [o.spec.id for o, _k in owners], xs.shape) for key, owners, xs in left] == [
        (("ddim", "batch"), ["b"], (1, *SHAPE))
    ]
    assert rows.groups[("ddim", "interactive")].remaining == [1, 2]  # row 1 sat out: still at its start
    assert len(rows.groups[("ddim", "batch")]) == 0


def test_drop_removes_the_rows_of_closed_generations(rows):
    a, b = gen("a", 2), gen("b")
    rows.join(images(a, b))
    a.closed = True
    dropped = rows.drop(lambda g: g.closed)
    assert [(key, [(o.spec.id, k) for o, k in owners]) for key, owners in dropped] == [
        (("ddim", "interactive"), [("a", 0), ("a", 1)])
    ]
    assert rows.groups[("ddim", "interactive")].slots == [(b, 0)]
    rows.clear()
    assert rows.groups == {}
