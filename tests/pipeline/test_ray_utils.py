"""Process tuning in pipeline.ray_utils: glibc malloc settings for training workers and actors."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
from pipeline.ray_utils import tune_malloc
print(tune_malloc())
"""


def _run(env: dict[str, str]) -> str:
    import os

    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_malloc_applies_on_glibc_and_can_be_turned_off() -> None:
    """In a fresh process (mallopt changes the whole process): applied where the C library is
    glibc (this project's Linux images), skipped with STELE_MALLOC_TUNING=0."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert _run({}) == "True"
    assert _run({"STELE_MALLOC_TUNING": "0"}) == "False"
