"""Shared fixtures: tiny real checkpoint pairs built in tmp folders (see tests/factory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import factory  # noqa: E402


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-layer Llama base (2 shards) and a post-trained copy (3 shards), bf16."""
    return factory.make_pair(tmp_path_factory.mktemp("pair"))
