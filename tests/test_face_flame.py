"""The flame backend on a small synthetic model written in FLAME's pickle layout.

FLAME itself is licence-gated; the test builds a tiny model with the same fields (chumpy-wrapped
arrays, a scipy sparse joint regressor, Python-2-style pickle), converts it with the CLI, and
fits expression and eye pose back from keypoints it generates.
"""

from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp

from pipelines.cli import main
from cogportrait.face.flame import FlameFitter, FlameModel, read_flame_pickle
from cogportrait.schema import KEYPOINT_INDICES, keypoint_slice

N_SHAPE, N_EXPR = 3, 4


def _fake_chumpy() -> type:
    """A stand-in for chumpy.ch.Ch, pickled as FLAME's file does (the converter never imports it)."""
    mod, sub = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = np.asarray(x)

        def __getstate__(self):
            return {"x": self.x, "_dirty_vars": set()}

    Ch.__module__ = "chumpy.ch"
    Ch.__qualname__ = "Ch"
    sub.Ch = Ch
    mod.ch = sub
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = mod, sub
    return Ch


def _template() -> np.ndarray:
    """62 keypoint positions in FLAME-like metres (x toward the subject's left, y up)."""
    kp = np.zeros((62, 3))
    for side, sx in (("left", 1.0), ("right", -1.0)):
        ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        kp[keypoint_slice(f"{side}_eye")] = np.column_stack([sx * 0.032 + 0.012 * np.cos(ang), 0.005 * np.sin(ang), np.zeros(16)])
        kp[keypoint_slice(f"{side}_brow")] = np.column_stack([sx * (0.015 + 0.004 * np.arange(10)), np.full(10, 0.02), np.zeros(10)])
        ang5 = np.linspace(0, 2 * np.pi, 4, endpoint=False)
        iris = np.column_stack([sx * 0.032 + np.r_[0, 0.005 * np.cos(ang5)], np.r_[0, 0.005 * np.sin(ang5)], np.full(5, 0.004)])
        kp[keypoint_slice(f"{side}_iris")] = iris
    return kp


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("flame")
    kp = _template()
    # one small triangle per keypoint, then 2 eyeball centres and 3 more joints' vertices
    tri = kp[:, None, :] + rng.normal(0, 0.0005, (62, 3, 3))
    extra = np.array([[0.032, 0.0, -0.012], [-0.032, 0.0, -0.012], [0, -0.05, 0], [0, -0.08, 0], [0, -0.06, 0.02]])
    v = np.concatenate([tri.reshape(-1, 3), extra])
    n_v = len(v)
    faces = np.arange(62 * 3).reshape(62, 3)
    eye_l, eye_r = 186, 187
    j_reg = np.zeros((5, n_v))
    j_reg[0, 188] = j_reg[1, 189] = j_reg[2, 190] = 1.0
    j_reg[3, eye_l] = j_reg[4, eye_r] = 1.0
    weights = np.zeros((n_v, 5))
    weights[:, 0] = 1.0
    for side, joint in (("left", 3), ("right", 4)):
        s = keypoint_slice(f"{side}_iris")
        rows = faces[s].ravel()
        weights[rows, 0], weights[rows, joint] = 0.0, 1.0
    shapedirs = np.zeros((n_v, 3, N_SHAPE + N_EXPR))
    shapedirs[:, :, :N_SHAPE] = rng.normal(0, 0.001, (n_v, 3, N_SHAPE))
    lids = np.concatenate([faces[keypoint_slice("left_eye")].ravel(), faces[keypoint_slice("right_eye")].ravel()])
    brows = np.concatenate([faces[keypoint_slice("left_brow")].ravel(), faces[keypoint_slice("right_brow")].ravel()])
    shapedirs[lids, 1, N_SHAPE + 0] = -0.004  # lids close
    shapedirs[brows, 1, N_SHAPE + 1] = 0.005  # brows up
    shapedirs[faces[keypoint_slice("left_brow")].ravel(), 1, N_SHAPE + 2] = 0.004  # left brow only
    shapedirs[brows, 0, N_SHAPE + 3] = np.sign(v[brows, 0]) * -0.003  # brows together (frown)
    Ch = _fake_chumpy()
    model = {
        "v_template": Ch(v), "shapedirs": Ch(shapedirs), "posedirs": np.zeros((n_v, 3, 36)),
        "J_regressor": sp.csc_matrix(j_reg), "weights": Ch(weights), "f": faces.astype(np.uint32),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "bs_style": "lbs", "bs_type": "lrotmin",
    }
    pkl = folder / "generic_model.pkl"
    pkl.write_bytes(pickle.dumps(model, protocol=2))
    del sys.modules["chumpy"], sys.modules["chumpy.ch"]  # the converter must not need chumpy
    bary = rng.dirichlet(np.ones(3), size=62)
    emb = folder / "mediapipe_landmark_embedding.npz"
    np.savez(emb, lmk_face_idx=np.arange(62), lmk_b_coords=bary, landmark_indices=np.array(KEYPOINT_INDICES))
    return {"pkl": pkl, "emb": emb, "out": folder / "flame.npz", "v": v, "shapedirs": shapedirs}


def test_convert_cli_writes_a_pickle_free_model(flame_files, capsys):
    assert main(["face", "convert-flame", str(flame_files["pkl"]), str(flame_files["emb"]), str(flame_files["out"]), "--n-shape", str(N_SHAPE)]) == 0
    assert '"keypoints_covered": 62' in capsys.readouterr().out
    with np.load(flame_files["out"], allow_pickle=False) as z:
        assert np.allclose(z["v_template"], flame_files["v"])
        assert np.allclose(z["exprdirs"], flame_files["shapedirs"][:, :, N_SHAPE:])
        assert z["shapedirs"].shape[2] == N_SHAPE and z["J_regressor"].shape == (5, len(flame_files["v"]))
    assert FlameModel.load(flame_files["out"]).n_expr == N_EXPR


def test_fit_recovers_expression_and_eye_pose(flame_files):
    if not flame_files["out"].exists():
        main(["face", "convert-flame", str(flame_files["pkl"]), str(flame_files["emb"]), str(flame_files["out"]), "--n-shape", str(N_SHAPE)])
    model = FlameModel.load(flame_files["out"])
    rng = np.random.default_rng(1)
    t = 12
    expr = rng.uniform(-1, 1, (t, N_EXPR))
    eye = np.zeros((t, 2, 3))
    eye[:, :, 1] = rng.uniform(-0.3, 0.3, (t, 1))  # both eyes turn together (yaw)
    eye[:, :, 0] = rng.uniform(-0.2, 0.2, (t, 1))  # and pitch
    expr[: t // 2] = 0.0  # half the frames neutral: the similarity is fitted on the median shape
    eye[: t // 2] = 0.0
    scale, shift = 1 / 0.064, np.array([0.1, -0.2, 0.05])  # into IOD-like units
    target = scale * model.landmarks(expr, eye) + shift
    full = np.zeros((t, 62, 3))
    full[:, model.keypoint_rows] = target + rng.normal(0, 1e-4, target.shape)
    fit = FlameFitter(model, ridge=1e-6).fit(full)
    assert fit.scale == pytest.approx(scale, rel=0.02)
    assert np.abs(fit.expr - expr).max() < 0.05
    assert np.abs(fit.eye_pose[:, :, :2] - eye[:, :, :2]).max() < 0.03
    assert fit.residual.max() < 0.01


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"v_template": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_flame_pickle(bad)
    assert not (tmp_path / "pwned").exists()


def test_sub_mesh_landmarks_equal_the_full_mesh(flame_files):
    if not flame_files["out"].exists():
        main(["face", "convert-flame", str(flame_files["pkl"]), str(flame_files["emb"]), str(flame_files["out"]), "--n-shape", str(N_SHAPE)])
    model = FlameModel.load(flame_files["out"])
    rng = np.random.default_rng(4)
    expr, eye = rng.uniform(-1, 1, (3, N_EXPR)), rng.uniform(-0.3, 0.3, (3, 2, 3))
    full = model.vertices(expr, eye)[:, model.faces[model.lmk_faces]]
    assert np.allclose(model.landmarks(expr, eye), np.einsum("tkcx,kc->tkx", full, model.lmk_bary))


@pytest.mark.slow
def test_invert_writes_flame_fits(flame_files, edge_extracted, tmp_path):
    """With invert.flame_model set, every frame gets a FLAME fit row (null where the face is lost)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cogportrait.config import InvertConfig
    from cogportrait.schema import FLAME_FITS_SCHEMA
    from pipelines.invert import run

    if not flame_files["out"].exists():
        main(["face", "convert-flame", str(flame_files["pkl"]), str(flame_files["emb"]), str(flame_files["out"]), "--n-shape", str(N_SHAPE)])
    run(InvertConfig(frames=str(edge_extracted), out=str(tmp_path), flame_model=str(flame_files["out"]), num_workers=2))
    fits = pq.read_table(tmp_path / "flame_fits.parquet")
    controls = pq.read_table(tmp_path / "controls.parquet")
    assert fits.schema.equals(FLAME_FITS_SCHEMA) and fits.num_rows == controls.num_rows
    loss = fits.filter(pc.equal(fits.column("clip_id"), "edge-face_loss")).sort_by("frame")
    present = pq.read_table(tmp_path / "controls.parquet").filter(pc.equal(controls.column("clip_id"), "edge-face_loss")).sort_by("frame")
    for fit, p in zip(loss.column("expression").to_pylist(), present.column("face_present").to_pylist()):
        assert (fit is None) == (not p)
        if fit is not None:
            assert len(fit) == N_EXPR and np.isfinite(fit).all()
