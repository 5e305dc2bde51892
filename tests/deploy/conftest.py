import pytest
from deploy_helpers import find_binary


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    path = find_binary("prometheus")
    if path is None:
        pytest.skip("Debian's `prometheus` binary is not installed (apt-get install prometheus)")
    return path


@pytest.fixture(scope="session")
def promtool_bin() -> str:
    path = find_binary("promtool")
    if path is None:
        pytest.skip("`promtool` is not installed (apt-get install prometheus ships it)")
    return path
