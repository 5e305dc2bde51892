"""PNG encoding off the device thread: finished images on a pool of threads, previews on a thread
of their own. The device thread hands over uint8 pixels and goes on with the next tick."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from arcdiff.model.images import png_bytes, to_uint8
from arcdiff.worker import metrics as m
from arcdiff.worker.generation import Generation

log = logging.getLogger("arcdiff.engine")


def encode_png(model: str, pixels: torch.Tensor) -> bytes:
    """One (C, H, W) uint8 image -> PNG bytes, timed into the encode histogram."""
    t0 = time.perf_counter()
    png = png_bytes(pixels)
    m.ENCODE.labels(model).observe(time.perf_counter() - t0)
    return png


def encode_previews(owners: list[tuple[Generation, int, int]], pixels: torch.Tensor) -> None:
    """PNG-encode preview pixels and emit them: owners are (generation, image index, evaluations so
    far), one per row of `pixels`."""
    for (gen, k, nfe_done), px in zip(owners, pixels, strict=True):
        if gen.closed:
            continue
        png = base64.b64encode(png_bytes(px)).decode("ascii")
        gen.emit("preview", {"index": k, "nfe_done": nfe_done, "png_base64": png})


class Encoder:
    """Encodes finished images and previews; hands each finished PNG to `encoded(generation, image
    index, png)` and each failure to `failed(generation, reason)`, on the encode thread."""

    def __init__(
        self,
        threads: int,
        encoded: Callable[[Generation, int, bytes], object],
        failed: Callable[[Generation, str], object],
    ):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="arcdiff-encode")
        # previews get one thread of their own: in submission order, so a generation's previews reach
        # its listeners in evaluation order (a stale one never replaces a newer one on screen)
        self._preview_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arcdiff-preview")
        self._encoded, self._failed = encoded, failed

    def image(self, model: str, gen: Generation, k: int, pixels: torch.Tensor) -> None:
        self._pool.submit(self._encode, model, gen, k, pixels)

    def previews(
        self,
        ran: Iterable[tuple[Generation, int, int]],
        due: Collection[Generation],
        x0_hat: torch.Tensor,
        data_range: Sequence[float],
    ) -> None:
        """Previews of the generations `due`: `ran` names the rows of x0_hat in order, (generation,
        image index, evaluations it had left before this one). Their x0_hat rows (the clean
        estimate at this evaluation, no extra network call) become pixels here, PNGs on the preview
        thread."""
        rows: list[int] = []
        owners: list[tuple[Generation, int, int]] = []  # (generation, image index, its evaluations so far)
        for row, (gen, k, left) in enumerate(ran):
            if gen in due:
                rows.append(row)
                owners.append((gen, k, gen.nfe_per_image - left + 1))
        if rows:
            pixels = to_uint8(x0_hat[torch.tensor(rows, device=x0_hat.device)].float(), data_range)
            self._preview_pool.submit(encode_previews, owners, pixels)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._preview_pool.shutdown(wait=True, cancel_futures=True)

    def _encode(self, model: str, gen: Generation, k: int, pixels: torch.Tensor) -> None:
        try:
            png = encode_png(model, pixels)
        except Exception as e:
            log.exception("encoding image %d of %s failed", k, gen.spec.id)
            self._failed(gen, f"PNG encoding failed: {e}")
            return
        self._encoded(gen, k, png)
