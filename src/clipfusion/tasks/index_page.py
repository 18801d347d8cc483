"""``index.html`` of a predict run: one self-contained page (thumbnails embedded, no external URL,
a content-security policy that forbids loading anything), sorted by score, filterable by OK/NG."""
from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, select_autoescape

from clipfusion.decisions import NG, OK
from clipfusion.outputs import write_atomic

MAX_CARDS = 1000  # the highest-scoring images; every row stays in results.csv

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>clipfusion predict: {{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 20px; color: #222; }
h1 { font-size: 20px; margin: 0 0 6px; } .meta { color: #555; font-size: 13px; margin: 2px 0; }
.filters { margin: 12px 0; } .filters button { font-size: 14px; padding: 4px 12px; margin-right: 6px; }
.filters button.on { background: #333; color: #fff; }
#cards { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 256px; font-size: 12px; border: 1px solid #ddd; padding: 4px; }
figure img { display: block; max-width: 256px; max-height: 256px; margin: auto; }
figcaption { margin-top: 4px; } .path { word-break: break-all; color: #555; }
.verdict { color: #fff; padding: 0 6px; border-radius: 3px; background: #777; }
.NG .verdict { background: #c42020; } .OK .verdict { background: #208040; }
</style></head><body>
<h1>{{ title }}</h1>
<p class="meta">{{ counts.all }} images scored: {{ counts.NG }} NG, {{ counts.OK }} OK{% if counts.skipped %},
{{ counts.skipped }} skipped (see summary.json){% endif %}. Decisions: {{ how }}.</p>
<p class="meta">{{ details }}</p>
{% if shown < counts.all %}<p class="meta">Showing the {{ shown }} highest scores; every image is in
results.csv and results.jsonl.</p>{% endif %}
<div class="filters">
<button class="on" data-filter="all">all ({{ counts.all }})</button>
<button data-filter="NG">NG ({{ counts.NG }})</button><button data-filter="OK">OK ({{ counts.OK }})</button>
</div>
<div id="cards">
{% for card in cards %}<figure class="{{ card.decision }}" data-decision="{{ card.decision }}">
<a href="{{ card.overlay }}"><img src="{{ card.thumbnail }}" alt="overlay of {{ card.path }}"></a>
<figcaption><span class="verdict">{{ card.decision }}</span> score {{ card.score }}{% if card.normalised is not none
%} (normalised {{ card.normalised }}){% endif %}, {{ card.regions }} region(s)<br>
<span class="path">{{ card.path }}</span></figcaption>
</figure>
{% endfor %}</div>
<script>
for (const button of document.querySelectorAll(".filters button")) {
  button.addEventListener("click", () => {
    const wanted = button.dataset.filter;
    for (const other of document.querySelectorAll(".filters button")) other.classList.toggle("on", other === button);
    for (const card of document.querySelectorAll("#cards figure"))
      card.style.display = wanted === "all" || card.dataset.decision === wanted ? "" : "none";
  });
}
</script>
</body></html>
"""


def write_index(out: Path, rows: list[dict[str, Any]], title: str, how: str, details: str, skipped: int) -> Path:
    """Write ``out/index.html`` from the run's rows (each with a ``thumbnail`` file under ``out``)."""
    ranked = sorted(rows, key=lambda row: -row["score"])[:MAX_CARDS]
    cards = []
    for row in ranked:
        thumbnail = out / row["thumbnail"]
        data = base64.b64encode(thumbnail.read_bytes()).decode("ascii") if thumbnail.is_file() else ""
        cards.append({"decision": row["decision"] if row["decision"] in (NG, OK) else "none",
                      # a relative URL of the name's own bytes (non-UTF-8 names too): 'part#1.png' would
                      # otherwise name a fragment, 'lot%20A.png' another file
                      "overlay": quote(os.fsencode(row["overlay"])), "thumbnail": f"data:image/jpeg;base64,{data}",
                      "path": row["path"],
                      "score": f"{row['score']:.4f}", "regions": len(row["regions"] or []),
                      "normalised": None if row["normalised_score"] is None else f"{row['normalised_score']:.3f}"})
    counts = {"all": len(rows), NG: sum(r["decision"] == NG for r in rows),
              OK: sum(r["decision"] == OK for r in rows), "skipped": skipped}
    page = Environment(autoescape=select_autoescape(default=True)).from_string(TEMPLATE).render(
        title=title, how=how, details=details, counts=counts, cards=cards, shown=len(cards))
    write_atomic(out / "index.html", page)
    return out / "index.html"
