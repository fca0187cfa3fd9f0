"""``cogportrait library report``: the HTML report of the sample library, checked against the Parquet
and opened in headless Chromium (Debian's package; the browser tests skip without /usr/bin/chromium).

The library is the repository's ``data/library`` when ``dvc repro`` has built it, else the session's
``sample_library`` fixture (the same sample, built by the tests).
"""

from __future__ import annotations

import json
import math
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode

import polars as pl
import pytest
from PIL import Image

from pipelines.cli import main
from prototype_store.preview import MAX_PREVIEW_FRAMES, PREVIEW_SIZE
from prototype_store.report import ReportError, write_library_report

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
LIMIT = 26  # two cards per event type of the sample (13 types): ~10 s of plotting on 2 cores


@pytest.fixture(scope="module")
def library(request) -> Path:
    built = REPO / "data" / "library"
    if (built / "prototypes.parquet").is_file() and (built / "index" / "meta.json").is_file():
        return built
    return request.getfixturevalue("sample_library")


@pytest.fixture(scope="module")
def table(library) -> pl.DataFrame:
    return pl.read_parquet(library / "prototypes.parquet", columns=["prototype_id", "label", "event_type", "identity", "clip_id", "T"])


@pytest.fixture(scope="module")
def report(library, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report") / "site"
    return out, write_library_report(library, out, limit=LIMIT)


class _Cards(HTMLParser):
    """The cards (their data attributes, images and <dd> fields) and count tables of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self.tables: dict[str, dict[str, int]] = {}
        self._field: str | None = None
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell = False
        self.shown: str | None = None
        self._in_shown = False
        self.body: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "article" and "card" in (a.get("class") or ""):
            self.cards.append({"label": a["data-label"], "event_type": a["data-event-type"], "hidden": "hidden" in a,
                               "img": [], "dd": {}, "pid": None})
        elif tag == "img" and self.cards and self._table is None:
            self.cards[-1]["img"].append(a["src"])
        elif tag == "dd" and self.cards:
            self._field = (a.get("class") or "").strip() or None
        elif tag == "code" and a.get("class") == "pid":
            self._field = "pid"
        elif tag == "table" and "counts" in (a.get("class") or ""):
            self._table = a["id"].removeprefix("counts-")
            self.tables[self._table] = {}
        elif tag == "tr" and self._table:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = True
            self._row.append("")
        elif tag == "span" and a.get("id") == "shown":
            self._in_shown, self.shown = True, ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("dd", "code"):
            self._field = None
        elif tag == "td":
            self._cell = False
        elif tag == "tr" and self._row:
            self.tables[self._table][self._row[0]] = int(self._row[1])
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "span":
            self._in_shown = False

    def handle_data(self, data: str) -> None:
        if self._field == "pid":
            self.cards[-1]["pid"] = data
        elif self._field:
            self.cards[-1]["dd"][self._field] = self.cards[-1]["dd"].get(self._field, "") + data
        if self._cell and self._row is not None:
            self._row[-1] += data
        if self._in_shown:
            self.shown += data


def _parse(text: str) -> _Cards:
    page = _Cards()
    page.feed(text)
    return page


def test_counts_match_the_parquet(report, table):
    _, result = report
    assert result["prototypes"] == table.height
    assert result["identities"] == table["identity"].n_unique()
    assert result["clips"] == table["clip_id"].n_unique()
    assert result["labels"] == dict(table.group_by("label").len().iter_rows())
    assert result["event_types"] == dict(table.group_by("event_type").len().iter_rows())
    assert result["cards"] == LIMIT
    assert result["files"] == 2 * LIMIT + 1
    json.dumps(result)  # what the CLI prints


def test_cards_and_images(report, table):
    out, result = report
    page = _parse((out / "index.html").read_text(encoding="utf-8"))
    # the count tables cover the whole library, whatever the limit
    assert page.tables["label"] == result["labels"]
    assert page.tables["event_type"] == result["event_types"]
    assert len(page.cards) == LIMIT and page.shown == f"{LIMIT} shown"
    rows = {r["prototype_id"]: r for r in table.iter_rows(named=True)}
    assert len({c["pid"] for c in page.cards}) == LIMIT
    # the round-robin pick shows every event type even with few cards
    assert {c["event_type"] for c in page.cards} == set(result["event_types"])
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert len(written) == result["files"]
    for card in page.cards:
        row = rows[card["pid"]]
        assert (card["label"], card["event_type"]) == (row["label"], row["event_type"])
        assert card["dd"]["identity"] == row["identity"]
        assert card["dd"]["frames"].startswith(f"{row['T']} frames")
        assert len(card["img"]) == 2 and set(card["img"]) <= written
        png, gif = (out / next(src for src in card["img"] if src.endswith(ext)) for ext in (".png", ".gif"))
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 400
        with Image.open(gif) as im:
            step = math.ceil(row["T"] / MAX_PREVIEW_FRAMES)
            assert im.format == "GIF" and im.size == (PREVIEW_SIZE, PREVIEW_SIZE)
            assert im.n_frames == len(range(0, row["T"], step)) <= MAX_PREVIEW_FRAMES
            assert im.info["duration"] == 40 * step  # real speed at 25 fps
            im.seek(im.n_frames // 2)  # something is drawn on the dark canvas
            assert len(im.convert("RGB").getcolors(maxcolors=4096)) > 3


def _chromium(page: Path, fragment: str, profile: Path) -> tuple[_Cards, list[str]]:
    """The DOM after the page's scripts ran, and the console messages Chromium logged."""
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    proc = subprocess.run(
        [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={profile}", "--no-first-run", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return _parse(proc.stdout), console


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (Debian's chromium package; scripts/setup.sh installs it as root)")
def test_page_in_headless_chromium(report, table, tmp_path):
    out, _ = report
    index = out / "index.html"
    profile = tmp_path / "profile"
    dom, console = _chromium(index, "", profile)
    assert console == []  # no JS error, nor any other console message
    assert dom.body.get("data-ready") == "1"  # the filter script ran to its end
    assert len(dom.cards) == LIMIT and not any(c["hidden"] for c in dom.cards)
    assert dom.shown == f"{LIMIT} shown"

    ids = [c["pid"] for c in dom.cards]
    shown = table.filter(pl.col("prototype_id").is_in(ids))
    event_type = shown["event_type"].value_counts(sort=True)["event_type"][0]  # the type with most cards
    label = shown["label"].value_counts(sort=True)["label"][0]
    cases = [
        ({"event_type": event_type}, pl.col("event_type") == event_type),
        ({"label": label}, pl.col("label") == label),  # labels hold spaces and ';': URL-encoded
        ({"label": label, "event_type": event_type}, (pl.col("label") == label) & (pl.col("event_type") == event_type)),
        ({"event_type": "no_such_type"}, pl.lit(True)),  # an unknown value is ignored: all shown
    ]
    for params, expected in cases:
        dom, console = _chromium(index, urlencode(params), profile)
        assert console == []
        n = shown.filter(expected).height
        assert 0 < n
        assert dom.shown == f"{n} shown", params
        visible = [c for c in dom.cards if not c["hidden"]]
        assert len(visible) == n and len(dom.cards) == LIMIT
        for c in visible:
            assert all(c[k] == v for k, v in params.items() if v != "no_such_type")


def test_replaces_only_an_earlier_report(library, tmp_path):
    # an unrelated non-empty folder is refused, untouched
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ReportError, match="non-empty folder"):
        write_library_report(library, other, limit=1)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    # an earlier report is replaced as a whole: nothing of the old one survives
    site = tmp_path / "site"
    write_library_report(library, site, limit=1)
    (site / "assets" / "previews" / "stale.gif").write_bytes(b"old")
    result = write_library_report(library, site, limit=1)
    assert not (site / "assets" / "previews" / "stale.gif").exists()
    assert len([p for p in site.rglob("*") if p.is_file()]) == result["files"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_cli(library, tmp_path, capsys):
    assert main(["library", "report", str(library), "--out", str(tmp_path / "r"), "--limit", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["cards"] == 1 and (tmp_path / "r" / "index.html").is_file()
    assert main(["library", "report", str(library), "--out", str(tmp_path / "r2"), "--limit", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--limit" in err[0] and not (tmp_path / "r2").exists()
