"""Input listing: find the videos of a folder and read the captions file (JSONL or CSV).

Nothing here raises on a bad row: every problem becomes a `Failure` naming the file, the
line and the cause, and the run goes on with the rest.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv",
    ".3gp", ".ts", ".mts", ".ogv",
})
REQUIRED = ("video", "caption")


@dataclass(frozen=True)
class Failure:
    path: str
    stage: str
    error: str


@dataclass(frozen=True)
class Caption:
    caption_id: int      # line number in the captions file: stable across reruns
    video_id: str        # the video's path relative to the videos folder
    split: str
    text: str


def find_videos(root: Path) -> list[str]:
    """Relative paths of every video-named entry under root, sorted (directories named
    like videos are listed too, so that they are reported rather than silently skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames + dirnames:
            if Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
        dirnames[:] = [d for d in dirnames if Path(d).suffix.lower() not in VIDEO_EXTENSIONS]
    return sorted(found)


def default_captions_file(root: Path) -> Path | None:
    for name in ("captions.jsonl", "captions.csv"):
        if (root / name).is_file():
            return root / name
    return None


def read_rows(path: Path):
    """(line number, dict or error text) for each row of a JSONL or CSV file (a .csv suffix means CSV)."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                yield 1, f"header lacks column(s) {', '.join(missing)} (has: {', '.join(reader.fieldnames or [])})"
                return
            for row in reader:
                yield reader.line_num, row
        return
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield number, f"invalid JSON ({e.msg} at column {e.colno})"
                continue
            yield number, row if isinstance(row, dict) else "not a JSON object"


class VideoIndex:
    """Resolves a captions file's `video` field (relative path or stem) inside the videos folder."""

    def __init__(self, root: Path, videos: list[str]):
        self.root = Path(root).resolve()
        self.videos = set(videos)
        self.by_stem: dict[str, list[str]] = {}
        self.by_name: dict[str, list[str]] = {}  # bare ids ("video7010") of videos in subfolders
        for rel in videos:
            self.by_stem.setdefault(str(Path(rel).with_suffix("")), []).append(rel)
            self.by_name.setdefault(Path(rel).stem, []).append(rel)

    def resolve(self, name: str) -> tuple[str | None, str]:
        """(relative path, "") or (None, why not)."""
        name = name.strip().replace("\\", "/")
        if os.path.isabs(name) or ".." in Path(name).parts:
            target = (self.root / name).resolve()
            if self.root not in target.parents:
                return None, f"path '{name}' escapes the videos folder"
            name = os.path.relpath(target, self.root)
        if name in self.videos:
            return name, ""
        matches = self.by_stem.get(name, [])
        if not matches and "/" not in name:
            matches = self.by_name.get(name, [])  # a bare id of a video in a subfolder
        if len(matches) == 1:
            return matches[0], ""
        if len(matches) > 1:
            return None, f"'{name}' is ambiguous: {', '.join(matches)}"
        return None, f"unknown video '{name}' (not found in {self.root})"


def read_captions(path: Path, index: VideoIndex, max_chars: int = 2000) -> tuple[list[Caption], list[Failure]]:
    """Captions that name a known video, and a Failure for every row that does not."""
    captions, failures = [], []
    path = Path(path)

    def fail(line: int, why: str) -> None:
        failures.append(Failure(f"{path}:{line}", "captions", why))

    try:
        rows = list(read_rows(path))
    except OSError as e:
        return [], [Failure(str(path), "captions", f"cannot read captions file: {e.strerror or e}")]
    for line, row in rows:
        if isinstance(row, str):
            fail(line, row)
            continue
        missing = [k for k in REQUIRED if not isinstance(row.get(k), str)]
        if missing:
            fail(line, f"missing or non-text field(s): {', '.join(missing)}")
            continue
        text = " ".join(row["caption"].split())
        if not text:
            fail(line, "empty caption")
            continue
        video, why = index.resolve(row["video"])
        if video is None:
            fail(line, why)
            continue
        if len(text) > max_chars:
            # CLIP reads 77 tokens at most; keeping megabytes of text helps nobody.
            text = text[:max_chars]
        split = str(row.get("split") or "train").strip().lower()
        captions.append(Caption(line, video, split, text))
    return captions, failures
