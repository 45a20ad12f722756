"""Debian packages the tests need beyond the Python ones (chromium for the dashboard, promtool
for the alerting rules): found on PATH, else installed with apt-get (once, as root), the way a
fresh CI machine gets them."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def ensure_binary(names: tuple[str, ...], package: str, *, recommends: bool = True) -> str:
    """The first of ``names`` on PATH; installs Debian's ``package`` with apt when none is
    there (with its recommended packages unless ``recommends`` is false), or skips, naming why,
    when that is impossible because we are not root."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() != 0:
        pytest.skip(f"{names[0]} is not installed and installing {package} with apt needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600)
    options = [] if recommends else ["--no-install-recommends"]
    subprocess.run(
        ["apt-get", "install", "-y", "-q", *options, package], check=True, env=env, timeout=1200
    )
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"apt-get install {package} did not provide {' or '.join(names)}")
