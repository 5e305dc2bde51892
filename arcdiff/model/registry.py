"""Find models by name in a models folder (ARCDIFF_MODEL_DIR, default: the ones shipped here) and
load them. The listing is arcdiff.model.catalog's (torch-free: what the API reads); this module
adds loading, which needs torch.
"""

from __future__ import annotations

import torch

# the catalogue's names, re-exported for the callers that load models
from arcdiff.model.catalog import (  # noqa: F401
    NAME_PATTERN,
    SHIPPED_MODEL_DIR,
    ModelCatalog,
    ModelInfo,
    default_model_dir,
    describe,
)
from arcdiff.model.diffusers_adapter import load_diffusers_model
from arcdiff.model.format import LoadedModel, load_model


class ModelRegistry(ModelCatalog):
    """The models in one folder, by name (see ModelCatalog), and loading them onto a device."""

    def load(self, name: str, device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None) -> LoadedModel:
        info = self.info(name)
        loader = load_diffusers_model if info.kind == "diffusers" else load_model
        return loader(info.path, device=device, amp_dtype=amp_dtype)
