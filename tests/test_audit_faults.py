"""The audit on runs that are damaged, unfinished, foreign or hostile: every value from the run
reaches the report escaped.

The runs here are synthetic part files (``engine/audit/synthetic.py``).
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradcam_batch.engine.audit import audit
from gradcam_batch.engine.audit.synthetic import write_synthetic_run
from gradcam_batch.engine.job.sink import Manifest

FAST = {"spray": {"view": "spectral"}}


# -- item 20: every attribute escaped ----------------------------------------------------------------

HOSTILE = "x\"><img src=x onerror=alert(1)><svg onload=alert(2)><b data-pwn='1'>"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


def _hostile_run(root: Path) -> Path:
    """Two hostile methods, hostile ids and class names, in a directory with a hostile name and model."""
    src = root / "src"
    write_synthetic_run(src, rows_per_class={0: 24, 1: 16}, planted={0: 0.5}, seed=4)
    t = pq.read_table(src / "part-00000.parquet")
    n = t.num_rows
    methods = pa.DictionaryArray.from_arrays(
        pa.array(np.arange(2 * n) % 2, pa.int32()), pa.array([f"m1{HOSTILE}", f"m2{HOSTILE}"])
    )
    both = pa.concat_tables([t, t])
    order = np.argsort(np.r_[np.arange(n), np.arange(n)], kind="stable")
    both = both.take(pa.array(order))
    ids = [f"{HOSTILE}{i}" for i in range(n) for _ in range(2)]
    names = [f"class {c}{HOSTILE}" for c in both["class_index"].to_pylist()]
    both = both.set_column(0, "id", pa.array(ids)).append_column("method", methods)
    both = both.append_column("class_name", pa.array(names))
    out = root / HOSTILE
    out.mkdir()
    pq.write_table(both, out / "part-00000.parquet")
    manifest = Manifest.new(out, fingerprint="f", config={"model": f"model{HOSTILE}", "method": "a,b"}, versions={})
    manifest.commit_file("part-00000.parquet", rows=2 * n, images=n, errors=0, units=["u"])
    manifest.data["status"] = "complete"
    manifest.save()
    return out


def _check_page(page: str, expect_in_text: list[str], expect_in_attrs: list[str]) -> None:
    p = _parse(page)
    clean = {"html", "head", "meta", "title", "style", "script", "body", "main", "h1", "h2", "h3", "p", "code"}
    clean |= {"div", "span", "a", "b", "br", "img", "table", "thead", "tbody", "tr", "th", "td", "figure"}
    clean |= {"figcaption", "section"}
    assert {t for t, _ in p.tags} <= clean
    assert sum(1 for t, _ in p.tags if t == "script") == 1
    for tag, attrs in p.tags:
        assert not [a for a in attrs if a.startswith("on") or a == "data-pwn"], (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), attrs
    ids = [a["id"] for _, a in p.tags if "id" in a]
    assert len(ids) == len(set(ids))
    for _, a in p.tags:  # every link lands on an element of the page
        if a.get("href", "").startswith("#"):
            assert a["href"][1:] in ids, a["href"]
    text = "".join(p.text)
    for value in expect_in_text:
        assert value in text
    values = [v for _, a in p.tags for v in a.values() if v]
    for value in expect_in_attrs:
        assert value in values


def test_hostile_values_reach_the_page_as_text_only(tmp_path):
    out = _hostile_run(tmp_path)
    rep = tmp_path / "rep"
    result = audit(out, rep, **FAST)
    assert {c.method for c in result.classes} == {f"m1{HOSTILE}", f"m2{HOSTILE}"}
    assert result.classes[0].clusters[0].sample_ids[0].startswith(HOSTILE)
    page = (rep / "index.html").read_text()
    _check_page(
        page,
        expect_in_text=[f"m1{HOSTILE}", f"class 0{HOSTILE}", HOSTILE, f"model{HOSTILE}"],
        expect_in_attrs=[str(out), result.classes[0].clusters[0].sample_ids[0]],
    )
    # --class-names takes the names' place; they are escaped the same way.
    names = tmp_path / "names.txt"
    names.write_text(f"zero{HOSTILE}\none{HOSTILE}\n")
    audit(out, rep, class_names=names.read_text().splitlines(), **FAST)
    page = (rep / "index.html").read_text()
    _check_page(page, expect_in_text=[f"zero{HOSTILE}", f"one{HOSTILE}"], expect_in_attrs=[])
