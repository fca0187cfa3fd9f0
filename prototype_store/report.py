"""``cogportrait library report``: one static HTML page to browse a prototype library.

People look at the library to judge what Stage 1 retrieves from: the counts per label and event
type, and each prototype's channels and motion. The page is one ``index.html`` plus image assets
(``assets/plots/ID.png``, the ``library show --plot`` picture; ``assets/previews/ID.gif``, the
stored keypoints drawn by the project's drawing code, ``preview.py``). Filters by label and event
type are two ``<select>`` elements and a few lines of inline JavaScript, with no CDN or network, so
the page works from ``file://`` offline and from any static file server; the filter state lives in
the URL hash (``#label=...&event_type=...``) so a filtered view can be linked or bookmarked.

With ``limit`` only that many prototypes get a card, picked round-robin over the event types and,
within each, over its labels, so a short report still shows every kind; the count tables always
cover the whole library. The report is built in a temporary folder beside ``out`` and renamed into place, so a
reader never sees half a report and an interrupted run leaves the previous one as it was.
"""

from __future__ import annotations

import hashlib
import html
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import polars as pl
from tqdm import tqdm

from cogportrait.io.atomic import atomic_dir
from cogportrait.schema import CLIP_FPS, PROTOTYPE_QUALITY_FLAGS
from prototype_store.errors import LibraryError
from prototype_store.plot import plot_prototype
from prototype_store.preview import PREVIEW_SIZE, write_keypoint_gif
from prototype_store.store import Match, PrototypeStore

GENERATOR = "cogportrait library report"  # marks a folder as a report this command may replace
NO_VALUE = "(none)"  # how a null label / event type / identity is shown and filtered
_FETCH_BATCH = 64  # prototypes whose arrays are read at once: memory stays flat in library size
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class ReportError(LibraryError):
    """A report cannot be written where asked (an unrelated non-empty folder, a file) or a bad limit."""


# ------------------------------------------------------------------------------------------------
# the public entry point
# ------------------------------------------------------------------------------------------------
def write_library_report(library: str | Path, out: str | Path, limit: int | None = None) -> dict[str, Any]:
    """Write ``out/index.html`` and ``out/assets/`` for the library at ``library``; return its counts.

    ``limit``: at most this many prototype cards (None = every prototype). The returned dict holds
    the library's totals (``prototypes``, ``identities``, ``clips``, counts per ``labels`` and
    ``event_types``), the ``cards`` drawn, the ``files`` written and the wall ``seconds``.
    """
    started = time.perf_counter()
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ReportError(f"--limit must be a positive number of prototypes, got {limit!r}")
    out = Path(out)
    _check_out(out)
    with PrototypeStore.open(library) as store:
        stats = store.stats()
        meta = pl.read_parquet(store.parquet, columns=["label", "event_type"])
        positions = pick_cards(meta, limit)
        cards_per_label = _count(meta, positions, "label")
        cards_per_type = _count(meta, positions, "event_type")
        with atomic_dir(out) as tmp:
            (tmp / "assets" / "plots").mkdir(parents=True)
            (tmp / "assets" / "previews").mkdir(parents=True)
            cards: list[str] = []
            files = 0
            with tqdm(total=len(positions), desc="report", unit="prototype", disable=None) as bar:
                for match in _matches(store, positions):
                    name = asset_name(match.prototype_id)
                    plot_prototype(match, tmp / "assets" / "plots" / f"{name}.png")
                    write_keypoint_gif(match.keypoints, tmp / "assets" / "previews" / f"{name}.gif")
                    files += 2
                    cards.append(_card_html(match, name))
                    bar.update(1)
            page = _page_html(str(library), stats, cards, cards_per_label, cards_per_type)
            (tmp / "index.html").write_text(page, encoding="utf-8")
            files += 1
    return {
        "library": str(library),
        "out": str(out),
        "prototypes": stats["prototypes"],
        "identities": stats["identities"],
        "clips": stats["clips"],
        "labels": _named_counts(stats["labels"]),
        "event_types": _named_counts(stats["event_types"]),
        "cards": len(positions),
        "files": files,
        "seconds": round(time.perf_counter() - started, 2),
    }


# ------------------------------------------------------------------------------------------------
# what to draw
# ------------------------------------------------------------------------------------------------
def pick_cards(meta: pl.DataFrame, limit: int | None) -> np.ndarray:
    """Row positions that get a card, in library order: all, or ``limit`` of them taken round-robin
    over the event types (sorted), each event type's turn going round-robin over its labels (sorted;
    each label's rows in library order).

    The library is sorted by label first, so its first rows are one label's: the round-robin keeps
    a short report representative, every event type first, then every label within it.
    """
    n = meta.height
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    types = meta["event_type"].fill_null(NO_VALUE).to_list()
    labels = meta["label"].fill_null(NO_VALUE).to_list()
    groups: dict[str, dict[str, list[int]]] = {}
    for pos, (event_type, label) in enumerate(zip(types, labels)):
        groups.setdefault(event_type, {}).setdefault(label, []).append(pos)
    per_type = [_round_robin([per_label[k] for k in sorted(per_label)]) for _, per_label in sorted(groups.items())]
    return np.sort(np.asarray(_round_robin(per_type)[:limit], dtype=np.int64))


def _round_robin(queues: list[list[int]]) -> list[int]:
    """The first of each queue, then the second of each, and so on (exhausted queues are skipped)."""
    longest = max((len(q) for q in queues), default=0)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


def _matches(store: PrototypeStore, positions: np.ndarray) -> Iterator[Match]:
    """The picked prototypes with their controls and keypoints, fetched a batch at a time."""
    for start in range(0, len(positions), _FETCH_BATCH):
        yield from store.fetch(positions[start : start + _FETCH_BATCH], arrays=True)


def asset_name(prototype_id: str) -> str:
    """The file stem of a prototype's assets: its id when that is a safe file name (library ids are
    uuids), else a hash of it (an id is free text in the schema)."""
    if _SAFE_NAME.match(prototype_id) and not prototype_id.startswith("."):
        return prototype_id
    return "id-" + hashlib.sha1(prototype_id.encode()).hexdigest()[:20]


def _check_out(out: Path) -> None:
    """Refuse to replace anything but an earlier report: the report swaps the whole folder."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; give a folder for the report")
    if out.is_dir() and any(out.iterdir()):
        index = out / "index.html"
        if not (index.is_file() and f'content="{GENERATOR}"' in index.read_text(encoding="utf-8", errors="replace")[:2000]):
            raise ReportError(
                f"--out {out} is a non-empty folder without a library report in it; the report replaces its "
                f"folder as a whole, so give a new or empty folder (or an earlier report's)"
            )


def _count(meta: pl.DataFrame, positions: np.ndarray, column: str) -> dict[str, int]:
    values = meta[column].fill_null(NO_VALUE).gather(positions).to_list() if len(positions) else []
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def _named_counts(counts: dict[str | None, int]) -> dict[str, int]:
    """Counts keyed by name, a null key shown as NO_VALUE (JSON needs string keys)."""
    return {NO_VALUE if k is None else str(k): int(v) for k, v in counts.items()}


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------
def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _card_html(m: Match, name: str) -> str:
    label = m.label if m.label is not None else NO_VALUE
    event_type = m.event_type if m.event_type is not None else NO_VALUE
    identity = m.identity if m.identity is not None else NO_VALUE
    flags = ", ".join(m.quality_flags) if m.quality_flags else "none"
    flag_help = "; ".join(f"{f}: {PROTOTYPE_QUALITY_FLAGS.get(f, '')}" for f in m.quality_flags)
    return f"""<article class="card" id="p-{_e(name)}" data-label="{_e(label)}" data-event-type="{_e(event_type)}">
<h3><code class="pid">{_e(m.prototype_id)}</code></h3>
<div class="media">
<img class="preview" src="assets/previews/{_e(name)}.gif" width="{PREVIEW_SIZE}" height="{PREVIEW_SIZE}" alt="eye-region keypoints of {_e(m.prototype_id)}, animated" loading="lazy">
<a href="assets/plots/{_e(name)}.png"><img class="plot" src="assets/plots/{_e(name)}.png" alt="17 channels of {_e(m.prototype_id)}" loading="lazy"></a>
</div>
<dl>
<dt>label</dt><dd class="label">{_e(label)}</dd>
<dt>event type</dt><dd class="event-type">{_e(event_type)}</dd>
<dt>T</dt><dd class="frames">{m.T} frames ({m.T / CLIP_FPS:.2f} s)</dd>
<dt>identity</dt><dd class="identity">{_e(identity)}</dd>
<dt>clip</dt><dd><code>{_e(m.clip_id)}</code> frames {m.start_frame}–{m.end_frame - 1}</dd>
<dt>flags</dt><dd title="{_e(flag_help)}">{_e(flags)}</dd>
</dl>
</article>"""


def _count_table(title: str, key: str, library: dict[str, int], cards: dict[str, int]) -> str:
    rows = "\n".join(
        f'<tr><td><a href="#{_e(urlencode({key: name}))}">{_e(name)}</a></td><td>{n}</td><td>{cards.get(name, 0)}</td></tr>'
        for name, n in sorted(library.items())
    )
    return (f'<table class="counts" id="counts-{_e(key)}"><caption>per {_e(title)}</caption>\n'
            f"<thead><tr><th>{_e(title)}</th><th>prototypes</th><th>cards</th></tr></thead>\n<tbody>\n{rows}\n</tbody></table>")


def _options(library: dict[str, int]) -> str:
    return "\n".join(f'<option value="{_e(name)}">{_e(name)} ({n})</option>' for name, n in sorted(library.items()))


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
[hidden] { display: none !important; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
.summary { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
table.counts { border-collapse: collapse; background: #fff; }
table.counts caption { font-weight: 600; text-align: left; padding: .3em 0; }
table.counts th, table.counts td { border: 1px solid #ddd; padding: .2em .6em; text-align: left; }
table.counts td + td, table.counts th + th { text-align: right; }
.filters { position: sticky; top: 0; background: #fafafa; padding: .6em 0; margin: 1em 0; border-bottom: 1px solid #ddd; z-index: 1; }
.filters label { margin-right: 1.2em; }
#shown { font-weight: 600; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 1em; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6em .8em; }
.card h3 { font-size: .8em; margin: 0 0 .4em; font-weight: normal; word-break: break-all; }
.card .media { display: flex; gap: .6em; align-items: flex-start; }
.card img.preview { background: #1c1c20; border-radius: 4px; flex: none; }
.card img.plot { width: 100%; max-width: 220px; height: auto; border: 1px solid #eee; }
.card dl { display: grid; grid-template-columns: auto 1fr; gap: .1em .8em; margin: .5em 0 0; }
.card dt { color: #666; }
.card dd { margin: 0; word-break: break-word; }
"""

# Filters: hide the cards that match neither select, count the rest; the hash holds the state so
# a link (and the count tables' links) opens a filtered view. No network, no library: file:// works.
_JS = """
(function () {
  "use strict";
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.card"));
  var selects = { label: document.getElementById("filter-label"), event_type: document.getElementById("filter-event-type") };
  var fields = { label: "label", event_type: "eventType" };
  var shown = document.getElementById("shown");
  function known(select, value) {
    return Array.prototype.some.call(select.options, function (o) { return o.value === value; });
  }
  function apply() {
    var n = 0;
    cards.forEach(function (card) {
      var keep = Object.keys(selects).every(function (key) {
        var want = selects[key].value;
        return want === "" || card.dataset[fields[key]] === want;
      });
      card.hidden = !keep;
      if (keep) { n += 1; }
    });
    shown.textContent = n + " shown";
  }
  function fromHash() {
    var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    Object.keys(selects).forEach(function (key) {
      var value = params.get(key);
      selects[key].value = value !== null && known(selects[key], value) ? value : "";
    });
    apply();
  }
  function toHash() {
    var params = new URLSearchParams();
    Object.keys(selects).forEach(function (key) {
      if (selects[key].value !== "") { params.set(key, selects[key].value); }
    });
    window.location.hash = params.toString();
  }
  Object.keys(selects).forEach(function (key) { selects[key].addEventListener("change", toHash); });
  window.addEventListener("hashchange", fromHash);
  fromHash();
  document.body.setAttribute("data-ready", "1");
})();
"""


def _page_html(
    library: str, stats: dict[str, Any], cards: list[str], cards_per_label: dict[str, int], cards_per_type: dict[str, int]
) -> str:
    labels, types = _named_counts(stats["labels"]), _named_counts(stats["event_types"])
    frames = stats["frames"]
    n_cards = len(cards)
    scope = "every prototype" if n_cards == stats["prototypes"] else f"{n_cards} of {stats['prototypes']} prototypes (--limit)"
    flags = ", ".join(f"{_e(k)}: {v}" for k, v in sorted(_named_counts(stats["quality_flags"]).items())) or "none"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{GENERATOR}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Prototype library: {_e(library)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Prototype library <code>{_e(library)}</code></h1>
<p class="totals"><span id="total-prototypes">{stats['prototypes']}</span> prototypes ·
<span id="total-identities">{stats['identities']}</span> identities ·
<span id="total-clips">{stats['clips']}</span> clips ·
T {frames['min']}–{frames['max']} frames (median {frames['median']}) at {CLIP_FPS} fps · quality flags: {flags}</p>
<div class="summary">
{_count_table("label", "label", labels, cards_per_label)}
{_count_table("event type", "event_type", types, cards_per_type)}
</div>
<form class="filters" onsubmit="return false">
<label>label <select id="filter-label"><option value="">all labels</option>
{_options(labels)}
</select></label>
<label>event type <select id="filter-event-type"><option value="">all event types</option>
{_options(types)}
</select></label>
<span id="shown">{n_cards} shown</span> · cards for {scope}
</form>
<p class="legend">Each card: the eye-region keypoints stored for the prototype, animated at the clip's speed
(subject's left blue, right orange), and its 17 control channels over time (click to enlarge).</p>
<main class="cards" id="cards" data-cards="{n_cards}">
{chr(10).join(cards)}
</main>
<script>{_JS}</script>
</body>
</html>
"""


__all__ = ["GENERATOR", "ReportError", "asset_name", "pick_cards", "write_library_report"]
