"""What a generation collects while its images run, and the JobResult assembled from it.

The engine's tick loop only records facts here (when the first image entered the batch, when the
last left, the batch sizes it ran at, each image's PNG); the encode threads (encoding.py) turn
finished pixels into PNGs, and the last one to finish assembles the result with its latency
breakdown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from arcdiff.contract import GenerationSpec, ImageResult, JobMetrics, JobResult, encode_latents, spec_nfe
from arcdiff.model.rng import image_seed
from arcdiff.worker import metrics as m


@dataclass
class Collected:
    """One generation's outputs and timings so far (times are time.time())."""

    pngs: dict[int, bytes] = field(default_factory=dict)
    samples: dict[int, torch.Tensor] = field(default_factory=dict)  # only when the engine keeps samples
    first_admit: float | None = None  # its first image entered the batch
    last_leave: float | None = None  # its last image left the batch
    batch_sizes: set[int] = field(default_factory=set)  # the batch sizes of the evaluations it was in


def job_result(
    spec: GenerationSpec, collected: Collected, device: str, worker: str, keep_samples: bool = False
) -> JobResult:
    """The result of a generation all of whose images are encoded, with its latency breakdown:
    queue (accepted -> first image admitted), sample (-> last image left the batch), encode (-> now)."""
    now = time.time()
    first = collected.first_admit or now
    last = collected.last_leave or now
    m.SAMPLE.labels(spec.model).observe(max(0.0, last - first))
    per_image = spec_nfe(spec)
    images = [ImageResult(k, image_seed(spec.seed, k), collected.pngs[k]) for k in range(spec.n)]
    metrics = JobMetrics(
        queue_ms=round(max(0.0, first - spec.submitted_at) * 1000, 3),
        sample_ms=round(max(0.0, last - first) * 1000, 3),
        encode_ms=round(max(0.0, now - last) * 1000, 3),
        total_ms=round(max(0.0, now - spec.submitted_at) * 1000, 3),
        nfe=per_image,
        batch_sizes=sorted(collected.batch_sizes),
        device=device,
        worker=worker,
    )
    extra = {"samples": torch.stack([collected.samples[k] for k in range(spec.n)])} if keep_samples else {}
    # an encoding's answer is its latent (kept as floats: its PNG is only a picture of it)
    latents = []
    if spec.kind == "encode":
        latents = [encode_latents(collected.samples[k][None].numpy()) for k in range(spec.n)]
    return JobResult(images=images, nfe=per_image, metrics=metrics, extra=extra, latents=latents)
