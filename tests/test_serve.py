"""`serve`: the JSON API over a real uvicorn server on a free port; every error answers JSON; only files of the
collection are served; concurrent queries share the one loaded model."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from retrieval import query as Q  # noqa: E402
from retrieval.serve import Limits, create_app, free_port  # noqa: E402
from tests.conftest import make_video  # noqa: E402
from tests.search_fixtures import features, run  # noqa: E402,F401 (fixtures)
from workflows import search as W  # noqa: E402

QUERY = "a dog runs in the park"


class Server:
    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)

    def get(self, path: str, headers: dict | None = None):
        return self.request(urllib.request.Request(self.url + path, headers=headers or {}))

    def request(self, req):
        """(status, headers, body bytes) for any status."""
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def upload(self, data: bytes, filename="clip.mp4", target="videos", top="3"):
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="target"\r\n\r\n{target}\r\n'.encode(),
                 f'--{boundary}\r\nContent-Disposition: form-data; name="top"\r\n\r\n{top}\r\n'.encode(),
                 f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f'Content-Type: video/mp4\r\n\r\n'.encode() + data + b"\r\n", f"--{boundary}--\r\n".encode()]
        req = urllib.request.Request(self.url + "/api/search_video", data=b"".join(parts), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return self.request(req)


@pytest.fixture(scope="module")
def searcher(features, run):
    s = W.open_searcher(features, run)
    s.encoder()
    return s


@pytest.fixture(scope="module")
def server(searcher):
    limits = Limits()
    limits.query_chars, limits.upload_bytes, limits.top = 200, 200_000, 20
    srv = Server(create_app(searcher, limits))
    yield srv
    srv.stop()


def _json(status_headers_body):
    status, headers, body = status_headers_body
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:200])
    return status, json.loads(body)


def test_search_thumbnail_and_ranged_media(server, searcher, features, run):
    status, health = _json(server.get("/api/health"))
    assert status == 200 and health["videos"] == 4 and health["has_captions"]
    status, answer = _json(server.get("/api/search?top=3&q=" + urllib.request.quote(QUERY)))
    assert status == 200
    expected = W.search_text(features, QUERY, run=run, top=3)
    assert [h["video_id"] for h in answer["hits"]] == [h.video_id for h in expected.hits]
    assert [h["second"] for h in answer["hits"]] == pytest.approx([h.best_second for h in expected.hits], abs=1e-3)
    hit = answer["hits"][0]
    status, headers, jpeg = server.get(hit["thumbnail"])
    assert status == 200 and headers["content-type"] == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
    path = Path(searcher.store.videos[hit["video"]]["path"])
    status, headers, part = server.get(hit["media"], {"Range": "bytes=10-109"})
    assert status == 206 and part == path.read_bytes()[10:110]
    assert headers["content-range"] == f"bytes 10-109/{path.stat().st_size}"


def test_every_bad_request_is_a_json_error(server):
    cases = {
        "/api/search?q=": (400, "empty query"),
        "/api/search?q=%20%20": (400, "empty query"),
        "/api/search?q=" + "a" * 201: (400, "query too long"),
        "/api/search?q=dog&top=0": (400, "top must be between 1 and 20"),
        "/api/search?q=dog&top=21": (400, "top must be between 1 and 20"),
        "/api/search?q=dog&top=ten": (400, "bad request: top"),
        "/media/4": (404, "no video 4"),
        "/media/-1": (404, "no video -1"),
        "/media/abc": (400, "bad request: video"),
        "/media/..%2F..%2F..%2Fetc%2Fpasswd": (404, "Not Found"),
        "/media/0/../../../etc/passwd": (404, "Not Found"),
        "/static/..%2F__init__.py": (404, "Not Found"),
        "/static/serve.py": (404, "no such file"),
        "/api/thumbnail/0?t=-1": (400, "bad request: t"),
        "/api/thumbnail/9": (404, "no video 9"),
        "/nothing": (404, "Not Found"),
    }
    for path, (code, message) in cases.items():
        status, body = _json(server.get(path))
        assert status == code and message in body["error"], (path, status, body)


def test_upload_errors_and_video_queries(server, clip_collection):
    clip = (clip_collection / "a.mp4").read_bytes()
    status, answer = _json(server.upload(clip))
    assert status == 200 and answer["target"] == "videos" and answer["hits"][0]["video_id"] == "a.mp4"
    status, answer = _json(server.upload(clip, target="captions"))
    assert status == 200 and answer["hits"][0]["caption"] and answer["query"] == "clip.mp4"
    for args, (code, message) in {
        (b"",): (400, "empty upload"),
        (b"not a video at all",): (400, "query video"),
        (b"x" * 200_001,): (413, "upload too large"),
        (b"x" * 400_000,): (413, "upload too large"),  # refused from its Content-Length
        (clip, "clip.mp4", "frames"): (400, "target must be one of videos, captions"),
        (clip, "clip.mp4", "videos", "0"): (400, "top must be between"),
    }.items():
        status, body = _json(server.upload(*args))
        assert status == code and message in body["error"], (args[1:], status, body)
        assert "lseca-upload" not in body["error"]  # no server path in the message


def test_only_collection_files_are_served(searcher, tmp_path, monkeypatch):
    root = tmp_path / "collection"
    outside = make_video(tmp_path / "secret.mp4", seconds=1.0, size="32x32")
    (root / "sub").mkdir(parents=True)
    (root / "link.mp4").symlink_to(outside)  # a file inside by name, outside by its real path
    (root / "sub" / "uplink").symlink_to(tmp_path, target_is_directory=True)
    inside = make_video(root / "ok.mp4", seconds=1.0, size="32x32")
    monkeypatch.setattr(searcher.store, "config", lambda: {"config": {"videos": str(root)}})
    paths = [str(inside), str(root / "link.mp4"), str(root / ".." / "secret.mp4"), str(root / "sub/uplink/secret.mp4")]
    for v, p in enumerate(paths):
        monkeypatch.setitem(searcher.store.videos[v], "path", p)
    srv = Server(create_app(searcher))
    try:
        status, _, body = srv.get("/media/0")
        assert status == 200 and body == inside.read_bytes()
        for v in (1, 2, 3):
            status, body = _json(srv.get(f"/media/{v}"))
            assert status == 403 and "outside the collection" in body["error"]
            status, body = _json(srv.get(f"/api/thumbnail/{v}?t=0.5"))
            assert status == 403
    finally:
        srv.stop()


def test_concurrent_queries_share_one_model(server):
    loads = Q._load_encoder.cache_info().misses
    url = "/api/search?top=2&q="
    queries = [QUERY, "a man cooks pasta", "two cars race", QUERY, "children play football", QUERY]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda q: _json(server.get(url + urllib.request.quote(q))), queries))
    assert all(status == 200 for status, _ in answers)
    tops = {q: [h["video_id"] for h in a["hits"]] for q, (_, a) in zip(queries, answers)}
    assert [tops[QUERY]] * 3 == [[h["video_id"] for h in a["hits"]] for q, (_, a) in zip(queries, answers)
                                 if q == QUERY]
    assert Q._load_encoder.cache_info().misses == loads  # nothing was loaded again


def test_bind_elsewhere_warns(searcher, monkeypatch, capsys):
    from retrieval import serve as S
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    S.serve(searcher)
    assert calls[-1]["host"] == "127.0.0.1" and "WARNING" not in capsys.readouterr().out
    S.serve(searcher, host="0.0.0.0", port=8123)
    assert calls[-1]["host"] == "0.0.0.0" and "WARNING: serving on 0.0.0.0:8123" in capsys.readouterr().out


def test_page_script_never_parses_server_text_as_html():
    from retrieval.serve import STATIC
    code = "\n".join(line for line in (STATIC / "app.js").read_text().splitlines()
                     if not line.strip().startswith("//"))
    assert "textContent" in code
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in code, sink
