"""The invert job on the sample data: controls, face model artefact, events, quality gates."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cogportrait.face.extract import read_frames
from cogportrait.face.model import MODEL_VERSION, NUISANCE_TERMS, LinearFaceModel, load_baselines
from cogportrait.schema import CONTROLS_SCHEMA, EVENT_TYPES, EVENTS_SCHEMA

pytestmark = pytest.mark.slow


def test_controls_cover_every_frame(extracted_sample, inverted_sample):
    frames = read_frames(extracted_sample, ["clip_id", "frame", "face_present"])
    controls = pq.read_table(inverted_sample / "controls.parquet")
    assert controls.schema.equals(CONTROLS_SCHEMA)
    assert controls.num_rows == frames.num_rows
    key = lambda t: sorted(zip(t.column("clip_id").to_pylist(), t.column("frame").to_pylist()))  # noqa: E731
    assert key(controls) == key(frames)
    present = controls.filter(controls.column("face_present"))
    c = np.array(present.column("controls").to_pylist(), dtype=np.float64)
    assert c.shape[1] == 17 and np.isfinite(c).all()
    assert (c[:, :14] >= 0).all() and (c[:, :14] <= 1).all()
    assert (np.abs(c[:, 14:]) < 90).all()
    err = np.array(present.column("residual_error").to_pylist())
    assert np.isfinite(err).all() and np.median(err) < 0.03


def test_face_model_artefact(inverted_sample):
    folder = inverted_sample / "face_model"
    meta = json.loads((folder / "model.json").read_text())
    assert meta["version"] == MODEL_VERSION == 3 and "gaze_horizontal" in meta["regressors"]
    assert meta["regressors"][-len(NUISANCE_TERMS):] == list(NUISANCE_TERMS)  # the smile: fitted, only subtracted
    model = LinearFaceModel.load(folder)
    assert model.basis.shape == (len(meta["regressors"]), 186)
    assert len(load_baselines(folder / "baselines.npz")) == meta["meta"]["identities"]


def test_quality_gates_recorded_leave_one_identity_out(inverted_sample):
    """The issue 11 gates, leave-one-identity-out with the shipped generic prior (README's table).

    Met on the sample: iris R² and the correlations of AU1, AU2L/R, AU45L/R and horizontal gaze.
    Not yet met (seven people with one frowner; README): overall R² ~0.78 of 0.80 and AU4L ~0.70
    of 0.70 (0.52 before the smile's nuisance regressors), guarded here near their measured level
    so they cannot silently fall.
    """
    from cogportrait.config import InvertConfig

    cfg = InvertConfig()
    m = json.loads((inverted_sample / "metrics.json").read_text())
    gates = m["gates"]
    corr_gated = ("AU1", "AU2L", "AU2R", "AU45L", "AU45R", "gaze_horizontal")
    assert set(gates) == {"loio_r2_overall", "loio_r2_iris", *(f"loio_corr_{c}" for c in (*corr_gated, "AU4L", "AU4R"))}
    assert gates["loio_r2_overall"]["threshold"] == cfg.gate_loio_r2_overall == 0.80
    assert gates["loio_corr_AU4L"]["threshold"] == cfg.gate_loio_corr_au4 == 0.70
    for name in ("loio_r2_iris", *(f"loio_corr_{c}" for c in corr_gated)):
        assert gates[name]["passed"], (name, gates[name])
    assert gates["loio_r2_overall"]["value"] >= 0.76
    assert gates["loio_corr_AU4L"]["value"] >= 0.6 and gates["loio_corr_AU4R"]["value"] >= 0.7
    # the sample's six labelled people are held out; the multi-shot edit's unlabelled clips are not
    assert m["loio"]["identities"] == 6 and m["loio"]["stated_identities_only"]
    prior = m["face_model"]["prior"]
    assert prior["used"] and "sadtalker_katie_hill" in prior["identities"]
    assert {"lp_woman_d3", "lp_man_d20"} <= set(prior["left_out_as_in_dataset"])  # the sample's people are not their own prior
    assert m["r2_by_group"]["loco_xy"]["overall"] >= 0.75  # LOCO kept for reference (bench reads it)
    assert m["mean_residual_error_iod"] < 0.03


def test_fit_generic_keeps_labelled_people_only(extracted_sample, tmp_path):
    """fit-generic on the sample: the multi-shot edit's unlabelled clips repeat labelled people,
    so they stay out; the folder loads, its hash checks, and it serves as a prior."""
    from cogportrait.config import InvertConfig
    from cogportrait.face.model import GenericFaceModel
    from pipelines.invert import fit_generic

    out = fit_generic(InvertConfig(num_workers=2), [str(extracted_sample)], str(tmp_path / "g"))
    generic = GenericFaceModel.load(tmp_path / "g")
    assert sorted(generic.stats) == ["edtalk_woman", "lp_man_d20", "lp_man_greenscreen", "lp_woman_d10", "lp_woman_d3", "tpsmm_man"]
    assert len(out["fitting_set"]["unlabelled_clips_left_out"]) == 4
    assert generic.meta["quality"]["loio"]["identities"] == 6
    prior, used = generic.prior({"lp_woman_d3"}, set(), 1000.0)
    assert "lp_woman_d3" not in used and len(used) == 5 and abs(prior.n - 1000.0) < 1e-9


def test_the_fit_reads_the_wider_median_and_the_inversion_the_narrower(extracted_sample):
    """prepare_step hands the inversion signals filtered over ``smooth_frames`` and the fit moments
    and rest frames filtered over ``fit_smooth_frames``; an even window is a config error."""
    from cogportrait.config import ConfigError, InvertConfig
    from cogportrait.face.extract import frames_files
    from cogportrait.face.fitting import clip_moments
    from cogportrait.face.model import MOMENT_FIELDS
    from cogportrait.face.signals import FaceSignals
    from pipelines.invert import _clip_info, _clip_rows, prepare_step

    cfg = InvertConfig()
    row = next(r for r in _clip_rows(frames_files(extracted_sample), _clip_info(extracted_sample)[0]) if r["identity"] == "lp_woman_d3")
    split = prepare_step(row, cfg.pose_refine, cfg.rest, 3, 5)
    narrow, wide = prepare_step(row, cfg.pose_refine, cfg.rest, 3, 3), prepare_step(row, cfg.pose_refine, cfg.rest, 5, 5)
    np.testing.assert_array_equal(FaceSignals.from_row(split).canon, FaceSignals.from_row(narrow).canon)
    for f in MOMENT_FIELDS:
        np.testing.assert_array_equal(split[f"moment_{f}"], wide[f"moment_{f}"])
    assert not np.array_equal(split["moment_zz"], narrow["moment_zz"])  # the 5-frame median did change the fit's data
    np.testing.assert_allclose(split["moment_zz"], clip_moments(FaceSignals.from_row(wide)).zz)
    with pytest.raises(ConfigError, match="fit_smooth_frames=4 must be odd"):
        InvertConfig(fit_smooth_frames=4)


def test_events_schema_and_vocabulary(inverted_sample):
    ev = pq.read_table(inverted_sample / "events.parquet")
    assert ev.schema.equals(EVENTS_SCHEMA)
    rows = ev.to_pylist()
    assert rows and {r["event_type"] for r in rows} <= set(EVENT_TYPES)
    for r in rows:
        assert r["start_frame"] <= r["apex_frame"] <= r["end_frame"]
        if r["event_type"] in ("blink", "prolonged_closure", "wink"):
            assert r["eyes"] in ("both", "left", "right")
            assert (r["eyes"] == "both") == (r["event_type"] != "wink")


def test_face_loss_frames_have_null_controls(edge_extracted, tmp_path):
    from cogportrait.config import InvertConfig
    from pipelines.invert import run

    m = run(InvertConfig(frames=str(edge_extracted), out=str(tmp_path), num_workers=2))
    controls = pq.read_table(tmp_path / "controls.parquet")
    loss = controls.filter(pc.equal(controls.column("clip_id"), "edge-face_loss")).sort_by("frame")
    assert loss.num_rows == 78
    present = np.asarray(loss.column("face_present").to_pylist())
    values = loss.column("controls").to_pylist()
    assert all(v is None for v, p in zip(values, present) if not p)
    assert all(v is not None for v, p in zip(values, present) if p)
    one = controls.filter(pc.equal(controls.column("clip_id"), "edge-one_frame"))
    assert one.num_rows == 1
    assert m["frames"] == controls.num_rows


def test_a_clip_without_a_usable_face_is_rejected_not_lost(edge_extracted, tmp_path):
    """A clip whose identity has no rest frame cannot be inverted: it ends in rejects (no_face),
    its frames in no controls row, and the other clips are inverted as before."""
    from cogportrait.config import InvertConfig
    from pipelines.invert import run

    faceless = "edge-face_loss"
    frames = pq.read_table(edge_extracted / "frames.parquet")
    present = pc.and_(frames.column("face_present"), pc.not_equal(frames.column("clip_id"), faceless))
    frames = frames.set_column(frames.schema.get_field_index("face_present"), "face_present", present)
    src = tmp_path / "extract"
    src.mkdir()
    pq.write_table(frames, src / "frames.parquet")
    shutil.copy(edge_extracted / "clips.parquet", src / "clips.parquet")

    m = run(InvertConfig(frames=str(src), out=str(tmp_path / "out"), num_workers=2))
    rejects = pq.read_table(tmp_path / "out/rejects.parquet").to_pylist()
    assert [(r["video_id"], r["stage"], r["reason"]) for r in rejects] == [(faceless, "invert", "no_face")]
    controls = pq.read_table(tmp_path / "out/controls.parquet")
    clip_ids = set(controls.column("clip_id").to_pylist())
    assert faceless not in clip_ids and len(clip_ids) == m["clips"] == 2 and m["rejects"] == 1
    n_faceless = pc.sum(pc.equal(frames.column("clip_id"), faceless)).as_py()
    assert n_faceless > 0 and controls.num_rows == frames.num_rows - n_faceless  # every other clip's frames, each once
