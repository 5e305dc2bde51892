"""Training tests run torch in this process: one intra-op thread, so that on a busy 2-core machine
two threads do not spin against a core someone else holds (40 distillation steps of the tiny model
took over 300 s that way; the file's nine tests take 20 s on one thread)."""

import pytest
from servicekit import one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield
