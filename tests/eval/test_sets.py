"""`arcdiff eval sets`: disjoint sets, paired noise, the floor from real sets, two feature spaces."""

import json
import math
import statistics

import pytest
import torch

from arcdiff.eval.sets import Cell, paired, parse_cell, split_real


def test_cells_parse_with_the_solvers_own_grid_and_cost():
    assert parse_cell("mnist:dpmpp2m_sde@10") == Cell("mnist", "dpmpp2m_sde", "karras", 10)
    rk4 = parse_cell("mnist:rk4@80")
    assert (rk4.schedule, rk4.steps, rk4.amp) == ("uniform", 20, "none")
    assert parse_cell("mnist-2step:ddim:uniform@2+bf16") == Cell("mnist-2step", "ddim", "uniform", 2, "bf16")
    assert parse_cell("m:unipc2:logsnr@5").label == "m unipc2/logsnr @5"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mnist:rk4@10", "4 NFE per step"),
        ("mnist:nope@10", "unknown solver"),
        ("mnist:ddim", "model:solver"),
        ("mnist@10", "model:solver"),
        ("mnist:ddim@10+fp8", "suffix"),
    ],
)
def test_bad_cells_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_cell(spec)


def test_real_images_split_into_a_reference_half_and_disjoint_floor_sets():
    images = torch.arange(100).view(100, 1, 1, 1)
    reference, floor = split_real(images, sets=4, set_size=12)
    ids = [set(reference.flatten().tolist())] + [set(f.flatten().tolist()) for f in floor]
    assert len(ids[0]) == 50 and all(len(f) == 12 for f in ids[1:])
    assert sum(len(i) for i in ids) == len(set().union(*ids))  # pairwise disjoint
    again, _ = split_real(images, sets=4, set_size=12)
    assert torch.equal(reference, again)  # one fixed split
    with pytest.raises(ValueError, match="lower --sets or --set-size"):
        split_real(images, sets=5, set_size=12)


def test_paired_differences_by_hand():
    d = paired({"fd": [3.0, 5.0, 4.0]}, {"fd": [4.0, 4.0, 6.0]})
    assert d["mean"] == pytest.approx(-2 / 3) and d["lower_in"] == 2 and d["sets"] == 3
    assert d["sd"] == pytest.approx(statistics.stdev([-1.0, 1.0, -2.0]))


def test_eval_sets_end_to_end(tiny_models, blob_folder, tmp_path, capsys):
    from arcdiff.cli import main
    from arcdiff.eval.evaluate import generate_samples
    from arcdiff.eval.features import extract, get_extractor
    from arcdiff.eval.metrics import frechet_distance_stats, gaussian_stats
    from arcdiff.model.registry import ModelRegistry
    from arcdiff.training.data import load_images

    out = tmp_path / "sets"
    argv = [
        "eval", "sets", "--ref", str(blob_folder), "--model-dir", str(tiny_models),
        "--cells", "tiny:ddim@2,tiny:ddpm@2,tiny:rk4@4", "--sets", "2", "--set-size", "10",
        "--seed", "7", "--features", "mnist,judge", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "tiny rk4/uniform @4" in capsys.readouterr().out
    result = json.loads((out / "sets.json").read_text())
    assert result["command"].startswith("arcdiff eval sets --ref MNIST_DIR --model-dir MODEL_DIR --cells")
    assert result["baseline"] == "tiny ddim/uniform @2" and set(result["floor"]) == {"mnist", "judge"}
    assert result["extractors"]["judge"].startswith("mnist-mlp:") and result["extractors"]["mnist"].startswith(
        "mnist-cnn:"
    )
    cells = {c["label"]: c for c in result["cells"]}
    assert [c["nfe"] for c in result["cells"]] == [2, 2, 4]
    for c in result["cells"]:
        for feat in ("mnist", "judge"):
            s = c["scores"][feat]
            assert len(s["fd"]) == 2 and all(math.isfinite(v) and v >= 0 for v in s["fd"])
            assert s["mean"] == pytest.approx(statistics.fmean(s["fd"])) and s["min"] <= s["mean"] <= s["max"]
            assert all(0 <= v <= 1 for v in s["confident"])
    base = cells["tiny ddim/uniform @2"]
    assert base["paired"] == {}
    rk4 = cells["tiny rk4/uniform @4"]
    diff = rk4["scores"]["judge"]["mean"] - base["scores"]["judge"]["mean"]
    assert rk4["paired"]["judge"]["mean"] == pytest.approx(diff) and 0 <= rk4["paired"]["judge"]["lower_in"] <= 2
    assert (out / "sets.md").read_text().count("| tiny ") == 6 and (out / "sets.png").stat().st_size > 1000

    # image k of a cell is the request with seed 7 + k: the sets of every cell are paired on the noise
    (stored,) = out.glob("samples/tiny-ddim-uniform-2nfe-none-s7-n20.safetensors")
    from safetensors.torch import load_file

    samples = load_file(str(stored))["samples"]
    model = ModelRegistry(tiny_models).load("tiny")
    assert torch.equal(samples, generate_samples(model, "ddim", 2, 20, seed=7))

    # set 1's figure is the Frechet distance of images 10..19 to the reference half of the real images
    extractor = get_extractor("judge", 1)
    reference, _ = split_real(load_images(blob_folder, 8, 1), 2, 10)
    ref_stats = gaussian_stats(extract(extractor, reference)[0])
    want = frechet_distance_stats(ref_stats, gaussian_stats(extract(extractor, samples[10:20])[0]))
    assert base["scores"]["judge"]["fd"][1] == pytest.approx(want, rel=1e-6)

    # a rerun samples nothing again and gives the same figures
    stamp = stored.stat().st_mtime_ns
    assert main(argv) == 0
    assert stored.stat().st_mtime_ns == stamp
    assert json.loads((out / "sets.json").read_text())["cells"] == result["cells"]


def test_eval_sets_refuses_mixed_shapes_and_unknown_models(tiny_models, blob_folder, tmp_path, capsys):
    from arcdiff.cli import main

    common = ["--ref", str(blob_folder), "--model-dir", str(tiny_models), "--out", str(tmp_path), "--quiet"]
    assert main(["eval", "sets", "--cells", "tiny:ddim@2,nope:ddim@2", *common]) == 2
    assert "unknown model(s) nope" in capsys.readouterr().err
    assert main(["eval", "sets", "--cells", "tiny:ddim@2", "--sets", "5", "--set-size", "10", *common]) == 2
    assert "lower --sets or --set-size" in capsys.readouterr().err
