"""The soak test (tests/soak.py) under pytest, reduced: `pytest -m slow tests/reliability/test_soak.py`.
Not in the default run. The full one: `python tests/soak.py` (400 requests over 3 minutes)."""

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_soak_reduced():
    import soak

    assert soak.main(["--requests", "120", "--clients", "6", "--minutes", "1.5", "--restart-every", "20"]) == 0
