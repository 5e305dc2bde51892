"""Fixtures of the reliability tests: real `arcdiff serve` processes (uvicorn) on free ports."""

import pytest
from servicekit import Api


@pytest.fixture
def start_api_process(model_dir, tmp_path):
    apis = []

    def start(**env):
        api = Api(model_dir, tmp_path / f"api{len(apis)}.log", **env)
        apis.append(api)
        return api

    yield start
    for api in apis:
        api.close()
