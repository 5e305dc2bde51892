import pytest

from arcdiff.model.registry import ModelRegistry


@pytest.fixture(scope="module")
def loaded(model_dir):
    """The tiny test models, loaded once per module, for engines built in the test process."""
    reg = ModelRegistry(model_dir)
    return {name: reg.load(name) for name in ("tiny", "tiny-eps")}
