"""Edits in the engine's shared batch (issue 22): each kind as model/editing.py computes it, the
same PNGs alone and mixed with generations, and bad inputs failing only their own generation."""

import base64
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image
from servicekit import one_thread

from arcdiff.contract import GenerationSpec, decode_latents, encode_latents
from arcdiff.model import editing
from arcdiff.model.rng import image_generator, image_seed, initial_noise
from arcdiff.worker.engine import Engine, EngineConfig, GenerationFailed
from arcdiff.worker.loading import Prepared

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


DIGIT = (np.add.outer(np.arange(8), np.arange(8)) * 16).clip(0, 255)  # a ramp: any picture will do
HALF = np.zeros((8, 8))
HALF[4:] = 255  # regenerate the bottom half


def spec(id, kind="generate", steps=6, solver="ddim", seed=0, n=1, priority="interactive", **kw):
    return GenerationSpec(
        id=id,
        model="tiny",
        steps=steps,
        solver=solver,
        seed=seed,
        n=n,
        submitted_at=time.time(),
        kind=kind,
        priority=priority,
        **kw,
    )


def make_engine(loaded, max_batch=16):
    models = {name: Prepared(lm, lm.denoiser) for name, lm in loaded.items()}
    return Engine(models, EngineConfig(max_batch=max_batch, worker="test", keep_samples=True, warm_up=False)).start()


def pixels(arr):
    return torch.from_numpy(arr.astype(np.float32))[None, None] / 127.5 - 1


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpmpp2m", "unipc2", "ddpm", "dpmpp2m_sde"])
def test_edits_in_the_engine_are_the_reference(loaded, solver):
    """img2img and inpainting through the engine = editing.edit with the image's own noise stream."""
    den = loaded["tiny"].denoiser
    eng = make_engine(loaded)
    try:
        for mask in (None, HALF):
            s = spec(
                "e", kind="edit", steps=7, solver=solver, seed=11, n=2, image=png_b64(DIGIT), strength=0.6,
                mask=png_b64(mask) if mask is not None else "",
            )  # fmt: skip
            res = eng.submit(s).result(60)
            assert res.nfe == {"heun": 2}.get(solver, 1) * 4  # floor(0.6 * 7) = 4 steps
            for k in range(2):
                gen = image_generator(image_seed(11, k))
                eps = initial_noise(SHAPE, gen)[None]
                m = None if mask is None else pixels(mask) / 2 + 0.5
                want = editing.edit(den, pixels(DIGIT), eps, 7, solver, 0.6, mask=m, generator=[gen])
                assert torch.allclose(res.extra["samples"][k], want[0], atol=1e-5), solver
            if mask is not None:  # the kept half comes back exactly
                got = np.asarray(Image.open(io.BytesIO(res.images[0].png)))
                assert np.array_equal(got[:4], DIGIT[:4])
    finally:
        eng.close()


def test_encodings_interpolations_and_given_noise(loaded):
    den = loaded["tiny"].denoiser
    eng = make_engine(loaded)
    try:
        for solver in ("ddim", "rk4"):
            res = eng.submit(spec("enc" + solver, kind="encode", steps=5, solver=solver, image=png_b64(DIGIT))).result(
                60
            )
            want = editing.encode(den, pixels(DIGIT), 5, solver)
            z = decode_latents(res.latents[0], 1, SHAPE)
            assert np.allclose(z, want.numpy(), atol=1e-5)
            assert res.nfe == 5 * (4 if solver == "rk4" else 1)
        # decoding the latent as a generation's noise
        dec = eng.submit(spec("dec", steps=5, noise=res.latents[0], solver="rk4")).result(60)
        assert torch.allclose(dec.extra["samples"], editing.decode(den, torch.from_numpy(z), 5, "rk4"), atol=1e-5)
        # interpolation between two seeds: the ends are those seeds' generations
        frames = eng.submit(spec("int", kind="interpolate", steps=4, seed=3, seed_to=8, n=4)).result(60)
        ends = [eng.submit(spec(f"g{s}", steps=4, seed=s)).result(60).extra["samples"][0] for s in (3, 8)]
        assert torch.allclose(frames.extra["samples"][0], ends[0], atol=1e-5)
        assert torch.allclose(frames.extra["samples"][3], ends[1], atol=1e-5)
        z0, z1 = initial_noise(SHAPE, image_generator(3)), initial_noise(SHAPE, image_generator(8))
        want = editing.interpolate(den, z0, z1, 4, 4, "ddim")
        assert torch.allclose(frames.extra["samples"], want, atol=1e-5)
        # interpolation between two given latents
        two = encode_latents(torch.stack([z0, z1]).numpy())
        again = eng.submit(spec("int2", kind="interpolate", steps=4, seed=0, noise=two, n=4)).result(60)
        assert torch.allclose(again.extra["samples"], want, atol=1e-5)
    finally:
        eng.close()


def test_an_edit_alone_and_mixed_with_generations_gives_the_same_pngs(loaded):
    """An image depends only on its request: an edit run alone, then beside generations of the same
    solver and others (rows joining and leaving around it, batch rows paused), gives the same PNGs."""
    eng = make_engine(loaded, max_batch=16)
    edits = [
        spec("img2img", kind="edit", steps=8, solver="dpmpp2m", seed=5, n=2, image=png_b64(DIGIT), strength=0.5),
        spec("inpaint", kind="edit", steps=6, solver="heun", seed=6, n=1, image=png_b64(DIGIT), mask=png_b64(HALF)),
        spec("encode", kind="encode", steps=6, solver="ddim", image=png_b64(DIGIT)),
        spec("interp", kind="interpolate", steps=5, solver="unipc2", seed=1, seed_to=2, n=3),
    ]
    try:
        alone = {s.id: eng.submit(s).result(60) for s in edits}
        crowd = [
            eng.submit(spec(f"g{i}", steps=3 + i, solver=sol, seed=100 + i, n=2, priority=pri))
            for i, (sol, pri) in enumerate(
                [("dpmpp2m", "interactive"), ("heun", "batch"), ("ddim", "interactive"), ("unipc2", "batch")] * 2
            )
        ]
        mixed_futs = {
            s.id: eng.submit(GenerationSpec(**{**s.to_payload(), "id": s.id + "-mixed", "submitted_at": time.time()}))
            for s in edits
        }
        crowd += [eng.submit(spec(f"h{i}", steps=4, solver="dpmpp2m", seed=200 + i)) for i in range(3)]
        mixed = {k: f.result(60) for k, f in mixed_futs.items()}
        for f in crowd:
            f.result(60)
        for s in edits:
            a, b = alone[s.id], mixed[s.id]
            assert max(b.metrics.batch_sizes) > max(a.metrics.batch_sizes), s.id  # really shared a batch
            assert [im.png for im in a.images] == [im.png for im in b.images], s.id
            # floats may differ in the last bits with the batch size (CPU kernels): the PNGs may not
            for za, zb in zip(a.latents, b.latents, strict=True):
                assert np.allclose(decode_latents(za, 1, SHAPE), decode_latents(zb, 1, SHAPE), atol=1e-5)
    finally:
        eng.close()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "edit", "image": png_b64(np.zeros((28, 28)))}, "28x28 pixels; model tiny takes 8x8"),
        ({"kind": "edit", "image": png_b64(DIGIT), "mask": png_b64(np.zeros((4, 4)))}, "mask is 4x4"),
        ({"kind": "edit", "image": base64.b64encode(b"GIF89a....").decode()}, "not a PNG"),
        ({"kind": "generate", "noise": base64.b64encode(b"\0" * 12).decode()}, "256 bytes"),
        ({"kind": "generate", "noise": encode_latents(np.full((1, 1, 8, 8), np.nan))}, "NaN"),
    ],
)
def test_bad_inputs_fail_their_generation_only(loaded, fields, message):
    eng = make_engine(loaded)
    try:
        bad = eng.submit(spec("bad", **fields))
        good = eng.submit(spec("good", steps=3))
        with pytest.raises(GenerationFailed, match=message):
            bad.result(30)
        assert good.result(30).images
    finally:
        eng.close()
