from __future__ import annotations

import pytest

from pipelines.config import ToyworldConfig
from pipelines.toyworld.generate import generate
from tests.pipelines.helpers import SMALL_TOYWORLD


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> str:
    """A small toyworld, generated once per test session (real JPEG/PNG, MP4 and JSON files)."""
    out = tmp_path_factory.mktemp("toyworld")
    generate(ToyworldConfig(**SMALL_TOYWORLD, out_dir=str(out)))
    return str(out)
