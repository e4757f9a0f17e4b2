"""Decode stage: 1 FPS at the centre of each second, odd inputs, hostile inputs."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from pipeline.decode import DecodeError, DecodeResult, decode_frames, ffmpeg_exe
from tests.conftest import make_video

SIZE = 32


def decode(path, **kw):
    result = DecodeResult()
    frames = list(decode_frames(path, SIZE, result=result, **kw))
    return frames, result


def test_one_frame_per_second_at_centres(tmp_path):
    frames, result = decode(make_video(tmp_path / "v.mp4", seconds=3.3))
    assert len(frames) == 3
    assert result.times == pytest.approx([0.5, 1.5, 2.5], abs=1 / 30)
    assert result.duration == pytest.approx(3.3, abs=0.05)
    assert all(f.dtype == np.uint8 and min(f.shape[:2]) == SIZE and f.shape[2] == 3 for f in frames)


def test_centre_frame_is_the_one_at_half_second(tmp_path):
    # A clip that is black for 0.5 s and white after: the first sampled frame must be white.
    path = tmp_path / "step.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "color=black:s=64x48:r=30:d=0.5",
                    "-f", "lavfi", "-i", "color=white:s=64x48:r=30:d=1.0", "-filter_complex",
                    "[0:v][1:v]concat=n=2:v=1", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True)
    frames, result = decode(path)
    assert len(frames) == 1 and frames[0].mean() > 200


def test_short_clip_gives_one_frame(tmp_path):
    frames, result = decode(make_video(tmp_path / "short.mp4", seconds=0.2))
    assert len(frames) == 1
    assert result.times[0] < 0.2


def test_rotation_metadata_is_applied(tmp_path):
    plain = make_video(tmp_path / "plain.mp4", seconds=1.0, size="64x48")
    rotated = tmp_path / "rotated.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-display_rotation", "90", "-i", str(plain),
                    "-c", "copy", str(rotated)], check=True)
    (f_plain,), _ = decode(plain)
    (f_rot,), _ = decode(rotated)
    assert f_plain.shape[0] < f_plain.shape[1]  # landscape
    assert f_rot.shape[0] > f_rot.shape[1]      # displayed as portrait


@pytest.mark.parametrize("size,pix_fmt", [("321x241", "yuv444p"), ("320x240", "yuv420p10le"), ("17x9", "yuv420p")])
def test_odd_sizes_and_pixel_formats(tmp_path, size, pix_fmt):
    path = make_video(tmp_path / "v.mp4", seconds=2.0, size=size, extra=["-c:v", "libx264", "-pix_fmt", pix_fmt])
    frames, _ = decode(path)
    assert len(frames) == 2 and min(frames[0].shape[:2]) == SIZE


def test_variable_frame_rate(tmp_path):
    src = make_video(tmp_path / "cfr.mp4", seconds=4.0)
    vfr = tmp_path / "vfr.mkv"
    # Drop frames irregularly and keep the original timestamps: a variable frame rate stream.
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(src), "-vf",
                    "select='not(mod(n,3))+between(t,1,2)',setpts=PTS", "-fps_mode", "vfr",
                    "-c:v", "libx264", str(vfr)], check=True)
    frames, result = decode(vfr)
    assert len(frames) == 4
    assert all(abs(t - (k + 0.5)) < 0.15 for k, t in enumerate(result.times))


def _bad(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("name,content,reason", [
    ("zero.mp4", b"", "empty file"),
    ("random.mp4", np.random.default_rng(0).bytes(20000), "not a complete MP4"),
    ("notes.avi", b"hello, this is text and not a video\n" * 50, "not a decodable video"),
])
def test_garbage_files_fail_clearly(tmp_path, name, content, reason):
    path = _bad(tmp_path, name, content)
    with pytest.raises(DecodeError, match=reason) as e:
        decode(path)
    assert str(path) in str(e.value)


def test_truncated_audio_image_directory_and_loop(tmp_path):
    good = make_video(tmp_path / "good.mp4", seconds=2.0)
    truncated = _bad(tmp_path, "trunc.mp4", good.read_bytes()[: good.stat().st_size // 2])
    audio = tmp_path / "audio.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1", str(audio)], check=True)
    image = tmp_path / "image.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48",
                    "-frames:v", "1", "-f", "image2", "-c:v", "png", str(image)], check=True)
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    loop = tmp_path / "loop.mp4"
    os.symlink(loop, loop)
    for path, reason in ((truncated, "not a complete MP4"), (audio, "no video stream"),
                         (image, "an image"), (folder, "is a directory"), (loop, "symlink loop")):
        with pytest.raises(DecodeError, match=reason):
            decode(path)


def test_audio_with_cover_art_is_not_a_video(tmp_path):
    cover = tmp_path / "cover.png"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48",
                    "-frames:v", "1", str(cover)], check=True)
    song = tmp_path / "song.m4a"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=2", "-i", str(cover),
                    "-map", "0", "-map", "1", "-c:a", "aac", "-c:v", "png", "-disposition:v", "attached_pic",
                    str(song)], check=True)
    with pytest.raises(DecodeError, match="no video stream"):
        decode(song)


def test_broken_packet_in_the_middle_keeps_the_good_frames(tmp_path):
    good = make_video(tmp_path / "good.ts", seconds=6.0, extra=["-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mpegts"])
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4000] = bytes(4000)  # zero a stretch of packets
    broken = tmp_path / "broken.ts"
    broken.write_bytes(bytes(data))
    frames, result = decode(broken)
    assert len(frames) >= 4


def test_hung_decoder_is_killed(tmp_path, monkeypatch):
    # A fake "ffmpeg" that never answers stands for a decoder stuck on a bad stream.
    video = make_video(tmp_path / "v.mp4", seconds=1.0)
    fake = tmp_path / "hang.sh"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr("pipeline.decode.ffmpeg_exe", lambda: str(fake))
    with pytest.raises(DecodeError, match="hung"):
        decode(video, stall_timeout=0.5)


def test_long_video_streams_with_bounded_memory(tmp_path):
    # 10 minutes at 2 fps and tiny size: frames come out one by one, never all at once.
    path = make_video(tmp_path / "long.mp4", seconds=600, size="32x24", rate=2)
    result = DecodeResult()
    count = 0
    for frame in decode_frames(path, SIZE, result=result):
        count += 1
    assert count == 600


def test_unreadable_file_is_reported_before_ffmpeg(tmp_path, monkeypatch):
    # Permission bits cannot be exercised as root (tests/test_robustness.py runs the real case
    # as a normal user); here the access check itself is made to fail.
    path = make_video(tmp_path / "locked.mp4", seconds=1.0)
    monkeypatch.setattr("pipeline.decode.os.access", lambda p, mode: False)
    with pytest.raises(DecodeError, match="permission denied") as e:
        decode(path)
    assert str(path) in str(e.value)
