"""The HTML report is self-contained and shows what it was given."""
from __future__ import annotations

import base64
import re

from megaportrait.shared.imaging import decode_png
from megaportrait.shared.report import Figure, Section, write_report


def test_report_inlines_images_and_escapes_text(tmp_path, astronaut):
    sec = Section("Results <1>", paragraphs=["a & b"], tables=[(["pair", "identity"], [["obama x 021333", 0.61234]])],
                  image_rows=[[Figure(astronaut, "source"), Figure(astronaut[::2, ::2], "small")]])
    path = write_report(tmp_path / "r" / "report.html", "Demo", [sec])
    text = path.read_text()
    assert "Results &lt;1&gt;" in text and "a &amp; b" in text and "0.612" in text
    assert "http" not in text.replace("http://www.w3.org", "")  # nothing external to fetch
    uris = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(uris) == 2
    first = decode_png(base64.b64decode(uris[0]))
    assert first.shape == (384, 384, 3)  # 512 px astronaut shrunk to the figure's max side
