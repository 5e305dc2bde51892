"""torch.compile in the engine: one graph per batch bucket, compiled at warm-up, and no recompile
in steady state (dynamo's fail_on_recompile stance turns one into an error), on real tiny models.

The default run uses dynamo's "eager" backend: the guards and graphs that decide recompiles are
dynamo's, whatever backend compiles them. The slow test repeats it with inductor."""

import time

import pytest
import torch
from servicekit import one_thread, reference

from arcdiff.contract import GenerationSpec
from arcdiff.model.registry import ModelRegistry
from arcdiff.model.solvers import SOLVERS
from arcdiff.worker.engine import Engine, EngineConfig
from arcdiff.worker.loading import SpeedSettings, cpu_has_native_bf16, prepare_models, resolve_speed


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    with one_thread():
        torch._dynamo.reset()
        yield
        torch.compiler.set_stance("default")
        torch._dynamo.reset()


def spec(id, steps, solver, seed, n, model="tiny"):
    return GenerationSpec(id=id, model=model, steps=steps, solver=solver, seed=seed, n=n, submitted_at=time.time())


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def run_mixed(model_dir, backend, mode="default"):
    prepared = prepare_models(
        ModelRegistry(model_dir),
        ["tiny", "tiny-eps"],
        torch.device("cpu"),
        SpeedSettings(compile=mode),
        backend=backend,
    )
    eng = Engine(
        prepared, EngineConfig(max_batch=8, keep_samples=True, warm_up=True, recompile_stance="fail_on_recompile")
    )
    before = graphs()  # the counter is process-wide and other tests compile too
    eng.start()
    try:
        after_warm_up = graphs()
        # every solver, several step counts and image counts, two models: batches of every size
        # from 1 to 8 pass through the buckets 1, 2, 4, 8
        specs = [spec(f"g{i}", steps=1 + i % 4, solver=s, seed=10 * i, n=1 + i % 3) for i, s in enumerate(SOLVERS * 2)]
        specs += [spec("e", steps=3, solver="heun", seed=7, n=3, model="tiny-eps")]
        futures = [eng.submit(s) for s in specs]
        results = [f.result(300) for f in futures]
        sizes = set().union(*(r.metrics.batch_sizes for r in results))
        assert graphs() == after_warm_up, "a graph was compiled after the warm-up"
        return eng, specs, results, sizes, after_warm_up - before
    finally:
        eng.close()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_engine_has_one_graph_per_bucket_and_no_recompiles(model_dir, mode):
    """reduce-overhead also runs the CUDA-graph wrapper (step marker, outputs copied out); on a
    CPU there is no graph to replay, but the wrapper's bookkeeping must not change a sample."""
    eng, specs, results, sizes, n_graphs = run_mixed(model_dir, backend="eager", mode=mode)
    assert n_graphs == 2 * len(eng.buckets), "one graph per model and bucket"
    assert len(sizes) >= 4, f"the mix should have run several batch sizes, got {sorted(sizes)}"
    assert set(eng.warm_up_s) == {"tiny", "tiny-eps"} and not eng.failed_models
    for s, r in zip(specs, results, strict=True):  # compiled or not, the same images
        want, _ = reference(model_dir, s.model, s.steps, s.solver, s.seed, s.n)
        assert torch.allclose(r.extra["samples"], want, atol=1e-5), s


def test_a_recompile_after_warm_up_is_an_error_under_the_guard(model_dir):
    """The guard is live: a shape that no bucket covers fails instead of compiling quietly."""
    prepared = prepare_models(
        ModelRegistry(model_dir), ["tiny"], torch.device("cpu"), SpeedSettings(compile="default"), backend="eager"
    )
    fwd = prepared["tiny"].forward
    with torch.inference_mode():
        fwd(torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5))
        torch.compiler.set_stance("fail_on_recompile")
        fwd(torch.zeros(2, 1, 8, 8), torch.full((2,), 0.7))  # same shape: no recompile
        with pytest.raises(Exception, match=r"(?i)recompil"):
            fwd(torch.zeros(3, 1, 8, 8), torch.full((3,), 0.5))


def test_a_compiler_that_fails_leaves_the_model_served_eagerly(model_dir, caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("this compiler cannot build the graph")

    prepared = prepare_models(
        ModelRegistry(model_dir),
        ["tiny"],
        torch.device("cpu"),
        SpeedSettings(compile="default"),
        backend=broken_backend,
    )
    eng = Engine(prepared, EngineConfig(max_batch=4, keep_samples=True, warm_up=True))
    eng.start()
    try:
        assert "serving it uncompiled" in caplog.text and "tiny" in eng.models and not eng.failed_models
        res = eng.submit(spec("a", 3, "rk4", 5, 2)).result(60)
        want, _ = reference(model_dir, "tiny", 3, "rk4", 5, 2)
        assert torch.allclose(res.extra["samples"], want, atol=1e-5)
    finally:
        eng.close()


def test_auto_speed_settings_per_device():
    cpu = resolve_speed(torch.device("cpu"))
    # bf16 where this CPU has it natively (AVX512-BF16 / AMX), float32 elsewhere
    assert (cpu.amp, cpu.compile, cpu.channels_last) == ("bf16" if cpu_has_native_bf16() else "none", "none", False)
    asked = resolve_speed(torch.device("cpu"), amp="bf16", compile_mode="default", channels_last=True)
    assert (asked.amp, asked.compile, asked.channels_last) == ("bf16", "default", True)
    with pytest.raises(ValueError, match="amp"):
        resolve_speed(torch.device("cpu"), amp="int8")


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx2 avx512f {extra}
bugs\t\t: spectre_v1
"""


@pytest.mark.parametrize(
    ("extra", "native"),
    [("avx512_bf16", True), ("amx_tile amx_bf16", True), ("avx512_vnni", False), ("", False)],
)
def test_native_bf16_is_read_from_the_cpu_flags(extra, native):
    assert cpu_has_native_bf16(CPUINFO.format(extra=extra)) is native
    assert cpu_has_native_bf16("bugs\t: avx512_bf16\n") is False  # only the flags line counts


def test_bf16_autocast_on_cpu_when_asked_keeps_the_solver_in_float32(model_dir):
    prepared = prepare_models(ModelRegistry(model_dir), ["tiny"], torch.device("cpu"), SpeedSettings(amp="bf16"))
    eng = Engine({"tiny": prepared["tiny"].loaded}, EngineConfig(max_batch=4, keep_samples=True))
    eng.start()
    try:
        res = eng.submit(spec("b", 4, "ddim", 3, 2)).result(60)
    finally:
        eng.close()
    got = res.extra["samples"]
    want, _ = reference(model_dir, "tiny", 4, "ddim", 3, 2)
    assert got.dtype == torch.float32
    err = (got - want).abs().max().item()
    assert 0 < err < 0.1, f"bf16 should differ from float32 a little, not {err}"


@pytest.mark.slow
def test_inductor_compiled_engine_no_recompiles(model_dir):
    _eng, specs, results, _sizes, _n_graphs = run_mixed(model_dir, backend="inductor", mode="reduce-overhead")
    for s, r in zip(specs, results, strict=True):
        want, _ = reference(model_dir, s.model, s.steps, s.solver, s.seed, s.n)
        assert torch.allclose(r.extra["samples"], want, atol=1e-4), s
