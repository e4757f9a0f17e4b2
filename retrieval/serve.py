"""The search server: one Searcher loaded once, a JSON API, and a page (static/) to search from.

    GET  /                            the page
    GET  /api/health                  what is loaded
    GET  /api/search?q=TEXT&top=N     text -> videos
    POST /api/search_video            an uploaded clip (multipart field `file`; `target` videos|captions, `top`)
    GET  /api/thumbnail/{video}?t=S   a JPEG of collection video number `video` at second S
    GET  /media/{video}               the video file itself, with range requests (HTML5 seeking)

Files are addressed by their number in the collection, never by a path from the request, and a file is
served only when its real path (symlinks resolved) lies inside the collection's videos folder. Every
error is a JSON object {"error": "..."} with a 4xx status. FastAPI runs the plain `def` handlers in a
thread pool, so queries are answered concurrently by the one loaded model.
"""

import logging
import os
import tempfile
from pathlib import Path

from . import CANDIDATES, SearchError
from .page import thumbnail
from .searcher import TARGETS, Searcher, SearchResult

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class Limits:
    query_chars = 500  # characters of a text query
    upload_bytes = 200 * 2 ** 20  # bytes of an uploaded clip
    top = 100  # hits per answer
    candidates = CANDIDATES  # stage-1 candidates per query


def collection_root(searcher: Searcher) -> Path:
    """The folder whose files may be served: extract's videos folder, else the videos' common folder."""
    configured = searcher.store.config().get("config", {}).get("videos")
    if configured:
        return Path(configured).resolve()
    return Path(os.path.commonpath([str(Path(v["path"]).resolve().parent) for v in searcher.store.videos]))


def create_app(searcher: Searcher, limits: Limits | None = None):
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    limits = limits or Limits()
    root = collection_root(searcher)
    app = FastAPI(title="lseca-retrieval search", docs_url=None, redoc_url=None, openapi_url=None)

    class ApiError(Exception):
        def __init__(self, status: int, message: str):
            self.status, self.message = status, message

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ()) if x not in ('query', 'body', 'path'))}: "
                 f"{err.get('msg', 'invalid')}" for err in e.errors()]
        return JSONResponse({"error": "bad request: " + "; ".join(parts)}, status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("request %s failed", request.url.path)
        return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)

    def video_file(video: int) -> Path:
        if not 0 <= video < len(searcher.store.videos):
            raise ApiError(404, f"no video {video} in this collection ({len(searcher.store.videos)} videos)")
        path = Path(searcher.store.videos[video]["path"])
        real = path.resolve()
        if not real.is_relative_to(root):  # a symlink (or a moved file) pointing out of the collection
            raise ApiError(403, f"video {video} resolves outside the collection folder; not served")
        if not real.is_file():
            raise ApiError(404, f"video {video} is no longer on disk")
        return real

    def check_top(top: int) -> None:
        if not 1 <= top <= limits.top:
            raise ApiError(400, f"top must be between 1 and {limits.top}, got {top}")

    def answer(result: SearchResult) -> dict:
        hits = []
        for h in result.hits:
            hits.append({"rank": h.rank, "score": round(h.score, 6), "video": h.video, "video_id": h.video_id,
                         "file": Path(h.path).name, "second": round(h.best_second, 3), "caption": h.caption,
                         "media": f"/media/{h.video}" if h.video is not None else None,
                         "thumbnail": (f"/api/thumbnail/{h.video}?t={h.best_second if result.target == 'videos' else 0.5:.3f}"
                                       if h.video is not None else None)})
        return {"query": result.query, "target": result.target, "scorer": result.scorer, "index": result.index,
                "gallery": result.gallery, "candidates": result.candidates, "hits": hits,
                "timings_ms": {k: round(1000 * v, 2) for k, v in result.timings.items()}}

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    def static(name: str):
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if name not in files:
            raise ApiError(404, "no such file")
        return FileResponse(files[name])

    @app.get("/api/health")
    def health():
        return {"status": "ok", "videos": len(searcher.store.videos), "captions": len(searcher.index.caption_vectors),
                "has_captions": searcher.has_captions, "scorer": searcher.scorer.name,
                "index": searcher.index.describe(), "limits": {"query_chars": limits.query_chars,
                                                               "upload_bytes": limits.upload_bytes, "top": limits.top}}

    @app.get("/api/search")
    def search(q: str = Query(""), top: int = Query(10)):
        check_top(top)
        if not q.strip():
            raise ApiError(400, "empty query: give the text to search for in q")
        if len(q) > limits.query_chars:
            raise ApiError(400, f"query too long: {len(q)} characters, at most {limits.query_chars}")
        try:
            return answer(searcher.text(q, top, max(limits.candidates, top)))
        except SearchError as e:
            raise ApiError(400, str(e)) from None

    @app.post("/api/search_video")
    def search_video(request: Request, file: UploadFile = File(...), target: str = Form("videos"),
                     top: int = Form(10)):
        check_top(top)
        if target not in TARGETS:
            raise ApiError(400, f"target must be one of {', '.join(TARGETS)}, not {target[:40]!r}")
        if target == "captions" and not searcher.has_captions:
            raise ApiError(400, "this collection has no captions to rank")
        with tempfile.TemporaryDirectory(prefix="lseca-upload-") as tmp:
            path = Path(tmp) / "query"
            size = 0
            with open(path, "wb") as out:
                while chunk := file.file.read(2 ** 20):
                    size += len(chunk)
                    if size > limits.upload_bytes:
                        raise ApiError(413, f"upload too large: more than {limits.upload_bytes} bytes")
                    out.write(chunk)
            if size == 0:
                raise ApiError(400, "empty upload: send a video file in the field `file`")
            try:
                result = searcher.video(path, target, top, max(limits.candidates, top))
            except SearchError as e:
                raise ApiError(400, str(e).replace(str(path), "the uploaded file")) from None
        result.query = Path(file.filename or "upload").name
        return answer(result)

    @app.get("/api/thumbnail/{video}")
    def thumb(video: int, t: float = Query(0.0, ge=0.0, le=1e7)):
        jpeg = thumbnail(str(video_file(video)), t)
        if jpeg is None:
            raise ApiError(404, f"no frame of video {video} at {t:.1f} s")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/media/{video}")
    def media(video: int):
        return FileResponse(video_file(video), content_disposition_type="inline")

    # a too-large upload is refused from its Content-Length before the body is read
    @app.middleware("http")
    async def _bound_upload(request: Request, call_next):
        length = request.headers.get("content-length")
        if request.url.path == "/api/search_video" and length and length.isdigit() \
                and int(length) > limits.upload_bytes + 2 ** 16:
            return JSONResponse({"error": f"upload too large: more than {limits.upload_bytes} bytes"}, status_code=413)
        return await call_next(request)

    return app


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None) -> None:
    """Run the server until interrupted."""
    import uvicorn

    if host not in LOCAL_HOSTS:
        log.warning("binding to %s: anyone who can reach this machine on port %d can search the collection and "
                    "download its videos (the default, 127.0.0.1, is this machine only)", host, port)
        print(f"WARNING: serving on {host}:{port}, reachable from other machines; use --host 127.0.0.1 to keep it local",
              flush=True)
    print(f"serving {len(searcher.store.videos)} videos on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(searcher, limits), host=host, port=port, log_level="warning")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

