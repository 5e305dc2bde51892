"""Sample a model and score the samples against real data: FID, sFID, precision, recall.

Samples are reproducible: image k of an eval with seed S starts from the noise of image seed
(S + k) (model.rng), exactly as `arcdiff generate --seed S` would draw it, and does not depend on
the batch size. Every result carries the real-vs-real floor of its reference set.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from arcdiff.eval.features import FeatureExtractor, extract, get_extractor
from arcdiff.eval.metrics import PR_NEIGHBOURS, frechet_distance_stats, gaussian_stats, precision_recall
from arcdiff.eval.reference import ReferenceFeatures, reference_features
from arcdiff.model.format import LoadedModel
from arcdiff.model.images import save_grid, to_uint8
from arcdiff.model.rng import image_generator, image_seed, initial_noise
from arcdiff.model.solvers import get_solver, nfe, sample

PR_SUBSET_SEED = 0
CONFIDENT = 0.9  # the issue's bar for "a recognisable digit"


@dataclass
class EvalResult:
    model: str
    solver: str
    steps: int
    nfe: int
    num_samples: int
    seed: int
    ref: str
    ref_images: int
    extractor: str
    fid: float
    sfid: float
    precision: float
    recall: float
    pr_ref_images: int  # real images in precision/recall: a random subset as large as the sample set
    floor: dict[str, float]  # the metrics between two disjoint random halves of the real data
    floor_fid_at_k: float | None  # FID of K real images vs the other N - K (None: K > N/2)
    floor_sfid_at_k: float | None
    confident_fraction: float | None  # classifier confidence > 0.9 (MNIST extractor only)
    class_counts: list[int] | None
    sample_seconds: float
    feature_seconds: float
    wall_seconds: float
    device: str
    threads: int
    batch: int
    schedule: str = "uniform"  # the sampling time grid (solver_names.GRIDS)
    grid: torch.Tensor | None = field(default=None, repr=False)  # the first (up to) 64 samples, uint8

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("grid")
        d["k_neighbours"] = PR_NEIGHBOURS
        d["ms_per_image_nfe"] = round(1000 * self.sample_seconds / max(1, self.num_samples * self.nfe), 4)
        return d

    def line(self) -> str:
        f = self.floor
        s = (
            f"{self.model} {self.solver} {self.schedule} steps={self.steps} NFE={self.nfe} K={self.num_samples}: "
            f"FID {self.fid:.3f}  sFID {self.sfid:.3f}  precision {self.precision:.3f}  recall {self.recall:.3f}"
            f"  | floor (real halves of {int(f['n_half'])}): FID {f['fid']:.3f}  sFID {f['sfid']:.3f}"
            f"  precision {f['precision']:.3f}  recall {f['recall']:.3f}"
        )
        if self.floor_fid_at_k is not None:
            s += f"  | floor at K: FID {self.floor_fid_at_k:.3f}"
        if self.confident_fraction is not None:
            s += f"  | confident digits {self.confident_fraction:.1%}"
        return s + f"  | {self.wall_seconds:.1f} s"


@torch.inference_mode()
def generate_samples(
    loaded: LoadedModel,
    solver: str,
    steps: int,
    num_samples: int,
    *,
    seed: int = 0,
    batch: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
    schedule: str = "uniform",
) -> torch.Tensor:
    """num_samples images (uint8, (K, C, H, W)) from `loaded` with `solver` in `steps` steps on the
    time grid `schedule`."""
    from tqdm import tqdm

    get_solver(solver)  # validates the name before any work
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    shape = loaded.image_shape
    lo, hi = loaded.config.get("data_range", [-1.0, 1.0])
    per_batch = nfe(solver, steps)
    out = []
    with tqdm(
        total=math.ceil(num_samples / batch) * per_batch,
        desc=f"sampling {solver} x{steps}",
        unit="nfe",
        disable=not progress,
        leave=False,
    ) as bar:
        for start in range(0, num_samples, batch):
            gens = [image_generator(image_seed(seed, k)) for k in range(start, min(num_samples, start + batch))]
            x_T = torch.stack([initial_noise(shape, g) for g in gens]).to(device)
            x0 = sample(
                loaded.denoiser,
                x_T,
                steps,
                solver,
                generator=gens,
                callback=lambda *_: bar.update(1),
                schedule=schedule,
            )
            out.append(to_uint8(x0, (lo, hi)))
    return torch.cat(out)


def _subset(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


def score(
    samples: torch.Tensor,
    reference: ReferenceFeatures,
    extractor: FeatureExtractor,
    *,
    batch: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """The metrics of uint8 samples against reference features."""
    k = samples.shape[0]
    if k < PR_NEIGHBOURS + 1:
        raise ValueError(f"need at least {PR_NEIGHBOURS + 1} samples (k = {PR_NEIGHBOURS} neighbours), got {k}")
    pooled, spatial = extract(extractor, samples, batch=batch, progress=progress, desc="sample features")
    n = reference.count
    # precision/recall depend on set sizes (k-NN radii shrink as a set grows): compare equal sizes
    pr_idx = _subset(n, min(k, n), PR_SUBSET_SEED)
    precision, recall = precision_recall(reference.pooled[pr_idx], pooled)
    floor_k = reference.floor_at(k)
    out: dict[str, Any] = {
        # the reference goes first: its covariance square root is computed once and reused
        "fid": frechet_distance_stats(reference.stats("pooled"), gaussian_stats(pooled)),
        "sfid": frechet_distance_stats(reference.stats("spatial"), gaussian_stats(spatial)),
        "precision": precision,
        "recall": recall,
        "pr_ref_images": int(pr_idx.numel()),
        "floor_fid_at_k": floor_k[0] if floor_k else None,
        "floor_sfid_at_k": floor_k[1] if floor_k else None,
        "confident_fraction": None,
        "class_counts": None,
    }
    probabilities = getattr(extractor, "probabilities", None)
    if probabilities is not None:
        p = probabilities(samples)
        conf, cls = p.max(1)
        out["confident_fraction"] = float((conf > CONFIDENT).float().mean())
        out["class_counts"] = torch.bincount(cls, minlength=p.shape[1]).tolist()
    return out


def evaluate(  # noqa: PLR0913 - the options of `arcdiff eval`, each a keyword with a default
    model: str | LoadedModel,
    solver: str,
    steps: int,
    num_samples: int,
    ref: str | Path,
    *,
    seed: int = 0,
    batch: int = 128,
    model_dir: str | Path | None = None,
    features: str = "auto",
    inception: str | Path | None = None,
    mnist_weights: str | Path | None = None,
    extractor: FeatureExtractor | None = None,
    reference: ReferenceFeatures | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = False,
    schedule: str = "uniform",
) -> EvalResult:
    """Sample `num_samples` images from a registry model (or a loaded one) and score them against
    the real images at `ref`. Pass `extractor` and `reference` to reuse them across evals."""
    t0 = time.perf_counter()
    if num_samples < PR_NEIGHBOURS + 1:
        raise ValueError(
            f"num_samples must be at least {PR_NEIGHBOURS + 1} (k = {PR_NEIGHBOURS} neighbours), got {num_samples}"
        )
    get_solver(solver)
    if isinstance(model, str):
        from arcdiff.model.registry import ModelRegistry

        model = ModelRegistry(model_dir).load(model, device=device)
    c, size, _ = model.image_shape
    if extractor is None:
        extractor = get_extractor(features, c, inception_path=inception, mnist_weights=mnist_weights, device=device)
    if reference is None:
        reference = reference_features(
            ref, size, c, extractor, cache_dir=cache_dir, use_cache=use_cache, progress=progress
        )
    t1 = time.perf_counter()
    samples = generate_samples(
        model, solver, steps, num_samples, seed=seed, batch=batch, device=device, progress=progress, schedule=schedule
    )
    t2 = time.perf_counter()
    scores = score(samples, reference, extractor, progress=progress)
    t3 = time.perf_counter()
    return EvalResult(
        model=model.name,
        solver=solver,
        steps=steps,
        nfe=nfe(solver, steps),
        num_samples=num_samples,
        seed=seed,
        ref=str(ref),
        ref_images=reference.count,
        extractor=extractor.id,
        **scores,
        floor={k: (int(v) if k == "n_half" else float(v)) for k, v in reference.floor.items()},
        sample_seconds=round(t2 - t1, 3),
        feature_seconds=round(t3 - t2 + (t1 - t0), 3),
        wall_seconds=round(t3 - t0, 3),
        device=str(device),
        threads=torch.get_num_threads(),
        batch=batch,
        schedule=schedule,
        grid=samples[:64].clone(),
    )


def record_stem(result: EvalResult) -> str:
    grid = "" if result.schedule == "uniform" else f"-{result.schedule}"
    return f"{result.model}-{result.solver}{grid}-{result.steps}steps-k{result.num_samples}-seed{result.seed}"


def write_record(result: EvalResult, out: str | Path, scale: int = 2) -> tuple[Path, Path]:
    """Write OUT/<stem>.json and OUT/<stem>.png (a grid of the first samples)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = record_stem(result)
    js = out / f"{stem}.json"
    js.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    png = save_grid(result.grid, out / f"{stem}.png", scale=scale) if result.grid is not None else out / f"{stem}.png"
    return js, png
