"""Behaviour events: hysteresis units, and eye closures on real clips counted by eye.

Counted by looking at every frame of the curated 25 fps clips (eye-region contact sheets):
- lp_d0 (78 frames): one blink, lids half-closed at 64, closed 65-67, opening 68-69.
- lp_d3: the subject's LEFT eye (image right) closes alone at frames 5-17 (a wink); the right eye
  closes at 28-39 and both at 40-44; both close again at 47-53 (a blink) and stay down from
  ~96 to 137 and from ~192 to 215.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cogportrait.behavior.events import Event, excursions, eye_closures, hysteresis, sided
from cogportrait.config import ConfigError, EventsConfig

LP_D0_BLINK = {"closed": (65, 67), "span": (64, 69)}
LP_D3_LEFT_WINK = (5, 17)
LP_D3_RIGHT_CLOSED = (28, 39)
LP_D3_BLINK = (47, 53)
LP_D3_LONG_CLOSURES = ((100, 135), (195, 212))


def test_hysteresis_enters_high_and_leaves_low():
    s = np.array([0, 0.2, 0.6, 0.5, 0.45, 0.7, 0.3, 0.1, 0.6, 0.2])
    assert hysteresis(s, on=0.55, off=0.4) == [(2, 5), (8, 8)]
    assert hysteresis(s, on=0.55, off=0.4, min_len=2) == [(2, 5)]
    assert hysteresis(np.array([np.nan, 0.9, np.nan]), 0.5, 0.3) == [(1, 1)]


def _closure(ap_left, ap_right):
    cfg = EventsConfig()
    ap = np.stack([ap_left, ap_right], axis=1)
    return eye_closures(ap, np.zeros_like(ap), cfg)


def test_blink_prolonged_and_wink_classes():
    open_ = np.full(60, 0.3)
    both = open_.copy()
    both[10:13] = 0.02  # 3 frames = 0.12 s
    [e] = _closure(both, both)
    assert (e.event_type, e.eyes, e.start_frame, e.end_frame) == ("blink", "both", 10, 12)
    long_ = open_.copy()
    long_[10:20] = 0.02  # 10 frames = 0.4 s: prolonged (no gap between the classes)
    assert _closure(long_, long_)[0].event_type == "prolonged_closure"
    nine = open_.copy()
    nine[10:19] = 0.02
    assert _closure(nine, nine)[0].event_type == "blink"
    [w] = _closure(open_, both)
    assert (w.event_type, w.eyes) == ("wink", "right")
    half = open_.copy()
    half[10:13] = 0.15  # the other eye half closed: not a wink
    [h] = _closure(half, both)
    assert (h.event_type, h.eyes) == ("blink", "both")
    single = open_.copy()
    single[30] = 0.0  # one frame is enough at 25 fps
    assert len(_closure(single, single)) == 1


def test_excursions_are_relative_to_the_clip_median():
    x = np.full(50, 0.8)  # a subject whose brows rest high
    x[20:26] = 1.0
    [e] = excursions(x, 0.15, 0.08, 3, "brow_raise", "left")
    assert (e.start_frame, e.end_frame, e.eyes) == (20, 25, "left")
    assert e.amplitude == pytest.approx(0.2)
    assert excursions(np.full(50, 0.9), 0.15, 0.08, 3, "frown") == []


def test_a_brow_at_its_ceiling_counts_as_raised():
    """A raise found on the right counts for both brows when the left is at its ceiling meanwhile
    (held up for most of the clip, it has no room to rise above its median), and for the right
    alone when the left stays down."""
    right = np.full(60, 0.5)
    right[20:30] = 0.8
    left = np.full(60, 0.9)
    left[20:30] = 0.98  # within off (0.08) of 1
    [e] = sided(left, right, 0.15, 0.08, 3, "brow_raise")
    assert (e.start_frame, e.end_frame, e.eyes) == (20, 29, "both")
    left[:] = 0.5
    left[20:30] = 0.6  # rises, but neither by on nor to the ceiling
    [e] = sided(left, right, 0.15, 0.08, 3, "brow_raise")
    assert e.eyes == "right"


def test_event_type_vocabulary_is_closed():
    with pytest.raises(ValueError, match="unknown event type"):
        Event("yawn", 0, 1, 0, "", 0.0, 0.0)
    with pytest.raises(ConfigError, match="hysteresis"):
        EventsConfig(closure_on=0.3, closure_off=0.5)


@pytest.fixture(scope="module")
def closures(inverted_sample, curated_sample):
    from conftest import clip_ids_by_video

    ids = clip_ids_by_video(curated_sample / "clips.parquet")
    ev = pq.read_table(inverted_sample / "events.parquet")
    ev = ev.filter(pc.is_in(ev.column("event_type"), value_set=pa.array(["blink", "prolonged_closure", "wink"])))

    def of(video_id):
        t = ev.filter(pc.equal(ev.column("clip_id"), ids[video_id][0]))
        return sorted(t.to_pylist(), key=lambda r: r["start_frame"])

    return of


def _covering(events, lo, hi):
    return [e for e in events if e["start_frame"] <= lo and e["end_frame"] >= hi]


@pytest.mark.slow
def test_lp_d0_has_exactly_the_blink_counted(closures):
    [e] = closures("lp_d0")
    assert (e["event_type"], e["eyes"]) == ("blink", "both")
    lo, hi = LP_D0_BLINK["closed"]
    assert lo <= e["apex_frame"] <= hi
    assert abs(e["start_frame"] - LP_D0_BLINK["span"][0]) <= 1 and abs(e["end_frame"] - LP_D0_BLINK["span"][1]) <= 1


@pytest.mark.slow
def test_lp_d3_winks_and_closures(closures):
    ev = closures("lp_d3")
    [wink] = _covering(ev, LP_D3_LEFT_WINK[0] + 1, LP_D3_LEFT_WINK[1] - 1)
    assert (wink["event_type"], wink["eyes"]) == ("wink", "left")
    [right] = _covering(ev, LP_D3_RIGHT_CLOSED[0] + 2, LP_D3_RIGHT_CLOSED[1])
    assert right["eyes"] in ("right", "both")  # the right eye, then both at 40-44: one closure
    assert right["end_frame"] < LP_D3_BLINK[0]
    [blink] = _covering(ev, LP_D3_BLINK[0] + 1, LP_D3_BLINK[1] - 1)
    assert (blink["event_type"], blink["eyes"]) == ("blink", "both")
    for lo, hi in LP_D3_LONG_CLOSURES:
        [e] = _covering(ev, lo, hi)
        assert (e["event_type"], e["eyes"]) == ("prolonged_closure", "both")


@pytest.fixture(scope="module")
def all_events(inverted_sample, curated_sample):
    from conftest import clip_ids_by_video

    ids = clip_ids_by_video(curated_sample / "clips.parquet")
    ev = pq.read_table(inverted_sample / "events.parquet").to_pylist()
    return lambda video_id, kind: [e for e in ev if e["clip_id"] == ids[video_id][0] and e["event_type"] == kind]


@pytest.mark.slow
def test_brows_frowns_and_head_on_real_clips(all_events):
    """lp_d10 raises both brows again and again; lp_d3 frowns with the head lowered at frames
    ~110-140 and ~195-230 (looked at: frames 123, 200 and 210 show the frown and the lowered head)."""
    raises = all_events("lp_d10", "brow_raise")
    assert len(raises) >= 5 and sum(e["eyes"] == "both" for e in raises) >= 5
    frowns = all_events("lp_d3", "frown")
    for frame in (123, 210):
        assert any(e["start_frame"] <= frame <= e["end_frame"] for e in frowns), frame
    nods = all_events("lp_d3", "head_nod")
    assert any(e["start_frame"] <= 200 <= e["end_frame"] and e["amplitude"] < 0 for e in nods)  # head lowered: pitch −
