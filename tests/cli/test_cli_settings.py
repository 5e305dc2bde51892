"""The command line (serve, worker, generate) and the ARCDIFF_ settings."""

import subprocess
import sys

import numpy as np
import pytest
from servicekit import REPO, child_env, one_thread, png_pixels, reference

from arcdiff.cli import build_parser, main
from arcdiff.cli._common import settings_from
from arcdiff.service.settings import Settings
from arcdiff.worker.settings import WorkerSettings


@pytest.mark.parametrize("command", ["serve", "worker", "generate"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: arcdiff {command}" in out and len(out) > 400


def test_top_level_help_lists_the_commands():
    help_text = build_parser().format_help()
    for command in ("serve", "worker", "generate"):
        assert command in help_text


def test_command_modules_import_no_heavy_libraries():
    code = (
        "import sys; import arcdiff.cli.serve, arcdiff.cli.worker, arcdiff.cli.generate; "
        "heavy = [m for m in ('torch', 'uvicorn', 'fastapi', 'rq') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_generate_writes_the_same_images_as_the_service(model_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    with one_thread():
        code = main(
            [
                "generate",
                "--model",
                "tiny",
                "--steps",
                "3",
                "--solver",
                "ddpm",
                "--seed",
                "5",
                "-n",
                "5",
                "-o",
                str(out),
                "--model-dir",
                str(model_dir),
                "--device",
                "cpu",
                "--batch",
                "2",
            ]
        )
        assert code == 0
        _, want = reference(model_dir, "tiny", 3, "ddpm", 5, 5, amp="auto")
    assert "wrote" in capsys.readouterr().out
    grid = png_pixels(out.read_bytes())
    assert grid.shape == (2 + 2 * 10, 2 + 3 * 10)  # 3 per row, 2 rows of 8x8 tiles with 2-pixel padding
    for k in range(5):
        r, c = divmod(k, 3)
        tile = grid[2 + r * 10 : 10 + r * 10, 2 + c * 10 : 10 + c * 10].astype(int)
        assert np.abs(tile - want[k].astype(int)).max() <= 1


def test_generate_rejects_bad_arguments(model_dir, tmp_path, capsys):
    code = main(
        ["generate", "--model", "nope", "--steps", "0", "-o", str(tmp_path / "x.png"), "--model-dir", str(model_dir)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--steps" in err and "unknown model 'nope'" in err
    assert not (tmp_path / "x.png").exists()


def test_serve_and_worker_refuse_unknown_models(model_dir):
    env = child_env(model_dir)
    for args in (
        ["serve", "--model", "nope", "--port", "8999"],
        ["worker", "--model", "nope", "--redis", "redis://127.0.0.1:1/0"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "arcdiff.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 2 and "unknown model(s) nope" in out.stderr, out.stderr


def test_worker_needs_redis(model_dir):
    out = subprocess.run(
        [sys.executable, "-m", "arcdiff.cli", "worker", "--model", "tiny"],
        cwd=REPO,
        env=child_env(model_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "needs a Redis URL" in out.stderr


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("ARCDIFF_REDIS_URL", "")  # empty means unset
    monkeypatch.setenv("ARCDIFF_MAX_IMAGES", "4")
    monkeypatch.setenv("ARCDIFF_MODELS", "mnist, mnist-eps")
    monkeypatch.setenv("ARCDIFF_API_KEYS", "a,b")
    monkeypatch.setenv("ARCDIFF_WORKER_METRICS_PORT", "9200")
    s = Settings()
    assert s.redis_url is None and s.embedded and s.port == 8000 and s.max_images == 4
    assert s.models == ["mnist", "mnist-eps"] and s.api_keys == ["a", "b"]
    # the worker loop's settings are the worker's alone; the engine's are in both (embedded mode)
    assert WorkerSettings().worker_metrics_port == 9200 and "worker_metrics_port" not in Settings.model_fields
    assert WorkerSettings().models == s.models and "max_batch" in Settings.model_fields
    monkeypatch.setenv("ARCDIFF_REDIS_URL", "redis://r:6379/0")
    assert not Settings().embedded


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("ARCDIFF_PORT", "9000")
    monkeypatch.setenv("ARCDIFF_MAX_BATCH", "4")
    s = settings_from(Settings, port=8123, max_batch=None)
    assert s.port == 8123 and s.max_batch == 4


@pytest.mark.parametrize("var, value", [("ARCDIFF_DEVICE", "gpu"), ("ARCDIFF_MAX_BATCH", "0"), ("ARCDIFF_AMP", "fp8")])
def test_bad_settings_exit_2_naming_the_variable(monkeypatch, capsys, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as e:
        settings_from(WorkerSettings)
    assert e.value.code == 2 and var in capsys.readouterr().err


def test_engine_threads_default_to_one_on_a_cpu(monkeypatch):
    """One intra-op thread on a CPU unless ARCDIFF_TORCH_THREADS says otherwise; torch's own default
    elsewhere (docs/performance.md#cpu-threads has the figures behind it)."""
    monkeypatch.delenv("ARCDIFF_TORCH_THREADS", raising=False)
    assert WorkerSettings().engine_threads("cpu") == 1
    assert WorkerSettings().engine_threads("cuda") is None
    monkeypatch.setenv("ARCDIFF_TORCH_THREADS", "3")
    assert WorkerSettings().engine_threads("cpu") == 3 and WorkerSettings().engine_threads("cuda") == 3
