from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import Hale  # noqa: E402


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Hale]:
    server = Hale(tmp_path / "data")
    yield server
    server.stop()
