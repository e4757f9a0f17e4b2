"""The search page (`cli.py search --html`) with hostile text in a caption, a video's file name and the
query, rendered by a real headless Chromium (Debian's `chromium`, as tests/test_search.py uses): nothing
executes, and the text shows as text.

Every payload, if it ran, would leave a mark on the page: `data-pwned` on <html> (set by an inline
script or by an <img onerror>). A positive control builds the same page without escaping and checks
that Chromium does show the mark, so the check below it can fail.
"""
from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import make_video, run_cli, tiny_extract_args, write_jsonl
from retrieval import page as P
from workflows import search as W

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH: the page must be rendered by a real "
                                "browser (Debian/Ubuntu: apt-get install chromium; scripts/test.sh does it as root)")

MARK = "document.documentElement.dataset.pwned"
# A video file name cannot hold "/", so the one with </script> in it lies in folders named to make it up.
NASTY_REL = (f"<script>alert(1)<", f"script><script>{MARK}='path'<", "script> & \"q\" 'a' &amp;.mp4")
NASTY_ID = "/".join(NASTY_REL)  # <script>alert(1)</script><script>...='path'</script> & "q" 'a' &amp;.mp4
IMG_NAME = f"<img src=x onerror=\"{MARK}='img'\"> & 'b'.mp4"
CAPTION = (f"<script>alert(1)</script><script>{MARK}='caption'</script> a dog & a \"cat\" 'here' "
           f"<img src=x onerror=\"{MARK}='capimg'\"> &lt;not an entity&gt;")
QUERY = f"<script>alert(1)</script> \"dog\" & 'cat' <img src=x onerror=\"{MARK}='query'\">"


@pytest.fixture(scope="module")
def nasty(tmp_path_factory):
    videos = tmp_path_factory.mktemp("xss_videos")
    nasty_path = videos.joinpath(*NASTY_REL)
    nasty_path.parent.mkdir(parents=True)
    make_video(videos / "a.mp4", seconds=2.0, size="64x48").rename(nasty_path)
    make_video(videos / "b.mp4", seconds=2.0, size="64x48", source="rgbtestsrc").rename(videos / IMG_NAME)
    write_jsonl(videos / "captions.jsonl", [
        {"video": NASTY_ID, "caption": CAPTION, "split": "test"},
        {"video": IMG_NAME, "caption": "a plain caption & nothing else", "split": "test"},
    ])
    out = tmp_path_factory.mktemp("xss") / "features"
    res = run_cli(*tiny_extract_args(videos, out, "--cluster", "none", "--keywords", "0"))
    assert res.returncode == 0, res.stdout + res.stderr
    return videos, out


class _Dom(HTMLParser):
    """Elements, attributes and text of a dumped DOM (entities decoded, as a reader sees them)."""

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.title = ""
        self._in_title = False
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_title:
            self.title += data


def render(page: Path, profile: Path) -> str:
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--dump-dom", page.as_uri()]
    try:
        res = subprocess.run(flags, capture_output=True, text=True, timeout=45)
    except subprocess.TimeoutExpired:  # what alert(1) does to headless Chromium: the dialog waits forever
        pytest.fail(f"Chromium did not finish rendering {page.name}: a JavaScript dialog (alert) opened?")
    assert res.stdout.strip(), res.stderr[-2000:]
    return res.stdout


def check_inert(dom: str, texts: list[str]) -> _Dom:
    parsed = _Dom(dom)
    assert "data-pwned" not in dom, dom[:3000]  # no payload ran (an alert would have hung render())
    assert 'data-ready="1"' in dom  # the page's own script did run: scripts were on, the page loaded
    scripts = [a for t, a in parsed.tags if t == "script"]
    assert len(scripts) == 1 and "src" not in scripts[0]  # only the page's own script element
    assert not [(t, a) for t, a in parsed.tags for k in a if k.startswith("on")]  # no event handler attribute
    assert all(a["src"].startswith("data:image/jpeg;base64,") for t, a in parsed.tags if t == "img")
    body = "".join(parsed.text)
    for text in texts:  # shown as text, every character as given
        assert text in body, text
    return parsed


def test_hostile_text_query_page(nasty, tmp_path):
    videos, features = nasty
    page = tmp_path / "text.html"
    res = run_cli("search", QUERY, "--features", str(features), "--top", "2", "--html", str(page), "--device", "cpu")
    assert res.returncode == 0, res.stdout + res.stderr
    parsed = check_inert(render(page, tmp_path / "profile"), [str(videos / NASTY_ID), str(videos / IMG_NAME)])
    assert parsed.title == f"search: videos for {QUERY}"
    h1 = "".join(parsed.text)
    assert f"videos for {QUERY}" in h1
    alts = [a["alt"] for t, a in parsed.tags if t == "img"]  # attribute values survive quotes and ampersands
    assert sorted(a.rsplit(" at ", 1)[0] for a in alts) == sorted([NASTY_ID, IMG_NAME])


def test_hostile_caption_and_video_query_page(nasty, tmp_path):
    videos, features = nasty
    page = tmp_path / "captions.html"
    query_video = videos / NASTY_ID
    res = run_cli("search", "--video", str(query_video), "--target", "captions", "--features", str(features),
                  "--top", "2", "--html", str(page), "--device", "cpu")
    assert res.returncode == 0, res.stdout + res.stderr
    parsed = check_inert(render(page, tmp_path / "profile"),
                         [CAPTION, "a plain caption & nothing else", str(videos / NASTY_ID), str(videos / IMG_NAME)])
    assert parsed.title == f"search: captions for {query_video}"


def test_control_an_unescaped_page_does_run_the_payloads(nasty, tmp_path, monkeypatch):
    """The same kind of page with escaping switched off: Chromium runs the payloads and the check sees it.
    (alert(1) is swapped for a mark here: a real alert leaves headless Chromium waiting on the dialog,
    which render() reports as a failure of its own.)"""
    videos, _ = nasty

    def defang(text: str) -> str:
        return text.replace("alert(1)", f"{MARK}='alert'")
    caption = defang(CAPTION)
    hits = [W.Hit(1, 0.5, defang(NASTY_ID), defang(str(videos / NASTY_ID)), 0.5, str(videos / NASTY_ID), caption),
            W.Hit(2, 0.4, IMG_NAME, str(videos / IMG_NAME), 0.5, str(videos / IMG_NAME), "plain")]
    result = W.SearchResult(defang(QUERY), "captions", "plain CLIP", "exact", 2, 2, hits)
    monkeypatch.setattr(P.html, "escape", lambda s, quote=True: s)
    dom = render(W.write_html(result, tmp_path / "naive.html"), tmp_path / "profile")
    assert "data-pwned=" in dom
    with pytest.raises(AssertionError):
        check_inert(dom, [caption])
