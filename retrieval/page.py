"""Output of a search: the printed table, thumbnails (ffmpeg) and the self-contained HTML report."""
from __future__ import annotations

import base64
import html
import os
import subprocess
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.decode import ffmpeg_exe

from .searcher import SearchResult


def format_result(result: SearchResult) -> str:
    """The hits as a table, then the time of each stage."""
    lines = [f"{result.target} for {result.query!r}: {result.scorer}; {result.candidates} of {result.gallery} "
             f"candidates from {result.index}",
             f"{'rank':>4} {'score':>8} {'second':>7}  {'caption  |  ' if result.target == 'captions' else ''}path"]
    for h in result.hits:
        caption = f"{h.caption}  |  " if h.caption is not None else ""
        lines.append(f"{h.rank:>4} {h.score:8.4f} {h.best_second:7.1f}  {caption}{h.path}")
    lines.append("time: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in result.timings.items()))
    return "\n".join(lines)


def thumbnail(video: str, second: float, width: int = 320) -> bytes | None:
    """A JPEG of the frame at `second`, or None when the video can no longer be read."""
    args = [ffmpeg_exe(), "-v", "error", "-ss", f"{max(second, 0.0):.3f}", "-i", f"file:{os.path.abspath(video)}",
            "-frames:v", "1", "-vf", f"scale={width}:-2", "-f", "image2pipe", "-vcodec", "mjpeg", "pipe:1"]
    try:
        out = subprocess.run(args, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 and out.stdout else None


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>search: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.hit {{ display: flex; gap: 1em; align-items: center; margin: .6em 0; }}
.hit img {{ width: 240px; border: 1px solid #ccc; }}
.missing {{ width: 240px; height: 135px; background: #eee; display: flex; align-items: center;
           justify-content: center; color: #777; }}
.meta {{ font-size: .95em; }} .path {{ font-family: monospace; word-break: break-all; }}
</style></head>
<body><h1>{title}</h1><p>{summary}</p>
{hits}
<script>
// marks each image that decoded, so a headless browser (and a test) can tell a broken page
window.addEventListener("load", () => {{
  for (const img of document.images) img.dataset.loaded = img.complete && img.naturalWidth > 0 ? "1" : "0";
  document.body.dataset.ready = "1";
}});
</script>
</body></html>
"""


def write_html(result: SearchResult, path: Path | str) -> Path:
    """A self-contained page (thumbnails embedded) of the hits: matching second, score, path."""
    path = Path(path)
    rows = []
    for h in result.hits:
        jpeg = thumbnail(h.moment_path, h.best_second)
        picture = (f'<img alt="{html.escape(h.video_id)} at {h.best_second:.1f} s" '
                   f'src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">' if jpeg
                   else '<div class="missing">no thumbnail (video unreadable)</div>')
        caption = f"<div>{html.escape(h.caption)}</div>" if h.caption is not None else ""
        rows.append(f'<div class="hit" data-rank="{h.rank}">{picture}<div class="meta">'
                    f"<b>#{h.rank}</b> score {h.score:.4f} at {h.best_second:.1f} s{caption}"
                    f'<div class="path">{html.escape(h.path)}</div></div></div>')
    summary = (f"{html.escape(result.scorer)}; {result.candidates} of {result.gallery} candidates from "
               f"{html.escape(result.index)}")
    page = _PAGE.format(title=html.escape(f"{result.target} for {result.query}"), summary=summary,
                        hits="\n".join(rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, page)
