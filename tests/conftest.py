"""Shared fixtures: where the real test material lives, and small helpers every test module may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def realdata_root() -> Path:
    """``$HRSEG_REALDATA`` or ``../shared/realdata`` beside the repository (read-only real slides and H&E)."""
    env = os.environ.get("HRSEG_REALDATA")
    return Path(env) if env else (REPO.parent / "shared" / "realdata")


REALDATA = realdata_root()


@pytest.fixture(scope="session")
def realdata() -> Path:
    """Root of the real test material; tests that need it skip with the reason when it is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real test material not found at {REALDATA} (set HRSEG_REALDATA)")
    return REALDATA
