"""The experiment API tests' config (helpers.make_config)."""
import pytest

from tests.unit.experiments.helpers import make_config


@pytest.fixture
def config(tmp_path, monkeypatch) -> dict:
    return make_config(tmp_path, monkeypatch)
