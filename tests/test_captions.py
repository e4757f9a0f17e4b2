"""Input listing: video discovery and the captions file's `video` field."""
from __future__ import annotations

from pipeline.captions import VideoIndex, find_videos, read_captions
from tests.conftest import write_jsonl


def test_video_field_resolution(tmp_path):
    for rel in ("a.mp4", "sub/b.mkv", "sub/deep/c.mp4", "x/dup.mp4", "y/dup.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a video")
    videos = find_videos(tmp_path)
    assert videos == ["a.mp4", "sub/b.mkv", "sub/deep/c.mp4", "x/dup.mp4", "y/dup.mp4"]
    index = VideoIndex(tmp_path, videos)
    assert index.resolve("a") == ("a.mp4", "")
    assert index.resolve("a.mp4") == ("a.mp4", "")
    assert index.resolve("sub/b") == ("sub/b.mkv", "")
    assert index.resolve("c") == ("sub/deep/c.mp4", "")          # bare id in a subfolder
    assert index.resolve("dup")[0] is None and "ambiguous" in index.resolve("dup")[1]
    assert index.resolve("a.avi")[0] is None                      # another extension is another file
    assert "escapes" in index.resolve("../outside.mp4")[1]
    assert "escapes" in index.resolve("/etc/passwd")[1]


def test_read_captions_reports_rows(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"video": "a", "caption": "  a   dog  "},
        "[1, 2]",
        {"video": "a", "caption": 5},
    ])
    captions, failures = read_captions(path, VideoIndex(tmp_path, ["a.mp4"]))
    assert [(c.caption_id, c.text, c.split) for c in captions] == [(1, "a dog", "train")]
    assert [f.path for f in failures] == [f"{path}:2", f"{path}:3"]
    assert "not a JSON object" in failures[0].error and "non-text" in failures[1].error
