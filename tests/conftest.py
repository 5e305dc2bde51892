# tests/ is on sys.path through pytest's `pythonpath` setting (pyproject.toml), so helpers such as
# servicekit and gmm import as plain modules
import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Tiny models made on the spot: 'tiny' (dual head) and 'tiny-eps' (noise only), 8x8x1."""
    from servicekit import make_models

    return make_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port for the whole session."""
    from servicekit import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis, emptied for this test."""
    redis_server.client.flushall()
    return redis_server.url
