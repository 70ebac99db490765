"""The table, the JSON and the HTML page: complete, finite, self-contained, written atomically."""

import base64
import json
from html.parser import HTMLParser

import normlab
from normlab.health.render import table, write_html, write_json

from .conftest import make_batches


class _Resources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.external = [], []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href"):
                (self.images if tag == "img" else self.external).append(value)
            if key == "src" and tag != "img":
                self.external.append(value)


def test_the_page_embeds_its_plots_and_loads_nothing(healthy, tmp_path):
    healthy[4].running_mean.add_(5.0)
    report = normlab.inspect(healthy, make_batches(2, seed=2))
    write_html(report, tmp_path / "health.html")
    page = (tmp_path / "health.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    parser = _Resources()
    parser.feed(page)
    parser.close()
    assert parser.external == [] and "http" not in page
    assert len(parser.images) == 1 + 3  # the per-layer bar chart, then one figure per layer
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[-8:-4] == b"IEND" and len(png) > 2000
    assert "stale_stats" in page and "<table>" in page
    assert [p.name for p in tmp_path.iterdir()] == ["health.html"]  # no temporary file left behind


def test_json_and_table(healthy, tmp_path):
    healthy[1].running_var[0] = float("nan")
    report = normlab.inspect(healthy, make_batches(2, seed=2))
    write_json(report, tmp_path / "health.json")
    data = json.loads((tmp_path / "health.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert data["layers"][0]["flags"] == ["nonfinite_stats"] and data["thresholds"]["STALE_SIGMA"] == 0.5
    text = table(report)
    assert text.splitlines()[0].split()[:3] == ["layer", "kind", "C"]
    assert "nonfinite_stats: running mean or variance holds NaN or inf" in text and "issue(s) found" in text
