"""AU backends: the default blendshape mapping, and the optional py-feat one (skipped without it)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cogportrait.config import ConfigError, ExtractConfig
from cogportrait.face.au_backends import AUBackendError, BlendshapeBackend, make_backend
from cogportrait.schema import BLENDSHAPE_NAMES


def test_blendshape_backend_maps_design_table():
    bs = np.zeros((2, 52), dtype=np.float32)
    bs[0, BLENDSHAPE_NAMES.index("browInnerUp")] = 0.7
    bs[0, BLENDSHAPE_NAMES.index("eyeBlinkRight")] = 0.8
    bs[1, BLENDSHAPE_NAMES.index("eyeLookOutLeft")] = 0.6
    bs[1, BLENDSHAPE_NAMES.index("eyeLookInRight")] = 0.4
    bs[1, BLENDSHAPE_NAMES.index("eyeLookDownLeft")] = 0.5
    bs[1, BLENDSHAPE_NAMES.index("eyeLookDownRight")] = 0.5
    au, gaze = BlendshapeBackend(gaze_down_blink_coupling=0.5).clip_proxies(bs, None, np.ones(2, bool))
    assert au.shape == (2, 10) and gaze.shape == (2, 4)
    assert au[0, 0] == pytest.approx(0.7) and au[0, 9] == pytest.approx(0.8) and au[0, 8] == 0
    assert np.isnan(au[:, 7]).all()  # AU41: geometric, computed by invert
    assert gaze[1, 0] == pytest.approx(0.5) and gaze[1, 1] == 0 and gaze[1, 3] == pytest.approx(0.5)


def test_unknown_or_unconfigured_backends_fail_clearly():
    with pytest.raises(AUBackendError, match="choose one of"):
        make_backend("openface", None, 0.5)
    with pytest.raises(AUBackendError, match="au_model_dir"):
        make_backend("pyfeat", None, 0.5)
    with pytest.raises(ConfigError, match="choose one of"):
        ExtractConfig(au_backend="openface")
    with pytest.raises(ConfigError, match="au_model_dir"):
        ExtractConfig(au_backend="pyfeat")


@pytest.mark.skipif(importlib.util.find_spec("feat") is not None, reason="py-feat is installed")
def test_pyfeat_backend_says_what_is_missing(tmp_path):
    with pytest.raises(AUBackendError, match="py-feat"):
        make_backend("pyfeat", str(tmp_path), 0.5)


@pytest.mark.skipif(importlib.util.find_spec("feat") is None, reason="py-feat is not installed (optional backend)")
def test_pyfeat_backend_runs_from_a_local_model_dir(tmp_path):
    import os

    model_dir = os.environ.get("COGPORTRAIT_PYFEAT_MODELS")
    if not model_dir:
        pytest.skip("set COGPORTRAIT_PYFEAT_MODELS to a local py-feat model folder")
    backend = make_backend("pyfeat", model_dir, 0.5)
    rgb = np.zeros((2, 256, 256, 3), dtype=np.uint8)
    au, gaze = backend.clip_proxies(np.zeros((2, 52), np.float32), None, np.array([False, False]), list(rgb))
    assert au.shape == (2, 10) and gaze.shape == (2, 4)
