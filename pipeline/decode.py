"""Decode stage: one frame per second of video, streamed out of ffmpeg through a pipe.

Frames are taken at the centre of each second (0.5 s, 1.5 s, ...): the first frame whose
timestamp reaches k + 0.5 fills slot k, which also handles variable frame rates and gaps.
A clip too short to reach 0.5 s gives its middle frame. ffmpeg applies rotation metadata
(autorotate), converts any pixel format to RGB and scales the short side to the model's
input size; frames come out as PPM images, whose headers carry their size, so rotated,
odd-sized or size-changing streams need no probing. Nothing is written to disk.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import ffmpeg
import numpy as np

# Slot k is filled by the first frame at or after k + 0.5 s; ld(0) holds the next free slot.
# A frame in the first half of its second stands for the second before only when the frame before
# it lay in that second (a low frame rate); after a gap it does not, so an empty second is never
# filled and the second after the gap is not taken twice. ld(1): the second of the previous frame.
_SELECT_CENTRES = ("if(gte(t,ld(0)+0.5)*(gte(t-floor(t),0.5)+eq(floor(t),ld(1)+1)),st(0,floor(t-0.5)+1)*0+1,0)"
                   "+st(1,floor(t))*0")
_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_PTS_TIME = re.compile(r"Parsed_showinfo.*?pts_time:\s*(-?[\d.]+)")
_INPUT_FORMAT = re.compile(r"Input #0, ([\w,]+), from")
# Damaged input: an error-level line ("-loglevel level+..." tags each line), or a warning that a packet or
# a decoded frame is corrupt; ffmpeg logs them and goes on, and still exits 0.
_DAMAGE = re.compile(r"\[(?:error|fatal|panic)\] |\[warning\] .*corrupt", re.I)
# Demuxers that mean "this is a still image, not a video".
_IMAGE_FORMATS = ("image2", "_pipe")

# ffmpeg's messages that have a plainer explanation for a user.
_KNOWN_ERRORS = (
    ("matches no streams", "no video stream (audio-only or not a video file)"),
    ("does not contain any stream", "no video stream (audio-only or not a video file)"),
    ("moov atom not found", "not a complete MP4/MOV file (moov atom not found: truncated, or not a video)"),
    ("Invalid data found when processing input", "not a decodable video (invalid data)"),
    ("Permission denied", "permission denied"),
    ("No such file or directory", "file not found"),
)


class DecodeError(RuntimeError):
    """A video that yields no usable frame; the message names the file and the cause."""


@dataclass
class DecodeResult:
    """What ffmpeg said about a video once its frames have been read."""
    duration: float = float("nan")
    times: list[float] = field(default_factory=list)
    warning: str = ""


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """System ffmpeg when on PATH, else the binary of the imageio-ffmpeg wheel."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


def check_file(path: Path) -> None:
    """Fail early, with a plain reason, on what ffmpeg would only report cryptically."""
    try:
        st = os.stat(path)
    except OSError as e:
        reason = "symlink loop" if e.errno == 40 else (e.strerror or str(e)).lower()
        raise DecodeError(f"{path}: {reason}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DecodeError(f"{path}: is a directory, not a video file")
    if not stat.S_ISREG(st.st_mode):
        raise DecodeError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise DecodeError(f"{path}: permission denied")


def ffmpeg_args(path: Path, size: int, squash: bool, select: str, max_frames: int | None = None) -> list[str]:
    """The argument list (never a shell string) that streams selected frames as PPM."""
    stream = ffmpeg.input(f"file:{os.path.abspath(path)}", nostdin=None)
    # "V" skips attached pictures: an audio file's cover art is not a video.
    video = stream["V:0"].setpts("PTS-STARTPTS").filter("select", select).filter("showinfo")
    if squash:
        video = video.filter("scale", size, size, flags="bicubic")
    else:  # short side to `size`, the long side keeps the aspect ratio (even, for chroma)
        video = video.filter("scale", f"if(lt(iw,ih),{size},-2)", f"if(lt(iw,ih),-2,{size})", flags="bicubic")
    out_kwargs = {"format": "image2pipe", "vcodec": "ppm", "pix_fmt": "rgb24", "fps_mode": "passthrough"}
    if max_frames:
        out_kwargs["frames:v"] = max_frames
    # "level+": each line of the log names its level, so that errors are told apart (see _DAMAGE)
    args = ffmpeg.output(video, "pipe:1", **out_kwargs).global_args("-hide_banner", "-loglevel", "level+info",
                                                                    "-threads", "1").get_args()
    return [ffmpeg_exe(), *args]


def _read_ppm(pipe) -> np.ndarray | None:
    """One binary PPM (P6) image from the pipe, or None at the end of the stream."""
    header: list[bytes] = []
    token = b""
    while len(header) < 4:
        ch = pipe.read(1)
        if not ch:
            if header or token:
                raise DecodeError("ffmpeg output ended inside a frame header")
            return None
        if ch.isspace():
            if token:
                header.append(token)
                token = b""
        else:
            token += ch
    if header[0] != b"P6" or header[3] != b"255":
        raise DecodeError(f"unexpected frame header from ffmpeg: {header!r}")
    width, height = int(header[1]), int(header[2])
    data = pipe.read(width * height * 3)
    if len(data) != width * height * 3:
        raise DecodeError("ffmpeg output ended inside a frame")
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)


def _is_image(input_format: str) -> bool:
    return any(input_format == f or input_format.endswith(f) for f in _IMAGE_FORMATS)


def _explain(path: Path, stderr_lines: list[str], returncode: int | None) -> str:
    text = "\n".join(stderr_lines)
    for needle, reason in _KNOWN_ERRORS:
        if needle in text:
            return f"{path}: {reason}"
    tail = " | ".join(line.strip() for line in stderr_lines[-3:] if line.strip())
    return f"{path}: ffmpeg failed (exit code {returncode}): {tail or 'no message'}"


class _Ffmpeg:
    """A running ffmpeg whose stderr is drained in a thread and which a watchdog may kill."""

    def __init__(self, args: list[str], stall_timeout: float):
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=1 << 20)
        self.stderr: deque[str] = deque(maxlen=200)
        self.errors, self.first_error = 0, ""  # lines that say the input is damaged (_DAMAGE)
        self.times: list[float] = []
        self.duration = float("nan")
        self.input_format = ""
        # When the reader started waiting for the current frame; None while the consumer holds a
        # frame (a slow model or a full queue downstream is not a stalled decoder).
        self.waiting_since: float | None = time.monotonic()
        self.timed_out = False
        self._done = threading.Event()
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        threading.Thread(target=self._watch, args=(stall_timeout,), daemon=True).start()

    def _drain(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if m := _PTS_TIME.search(line):
                self.times.append(float(m.group(1)))
                continue
            if m := _DURATION.search(line):
                h, mi, s = m.groups()
                self.duration = int(h) * 3600 + int(mi) * 60 + float(s)
            if m := _INPUT_FORMAT.search(line):
                self.input_format = m.group(1)
            if _DAMAGE.search(line):
                self.errors += 1
                self.first_error = self.first_error or line
            self.stderr.append(line)

    def _watch(self, stall_timeout: float) -> None:
        # A hung decoder produces nothing; a slow one still makes progress.
        while not self._done.wait(1.0 if stall_timeout > 2 else 0.1):
            since = self.waiting_since
            if since is not None and time.monotonic() - since > stall_timeout:
                self.timed_out = True
                self.proc.kill()
                return

    def frames(self) -> Iterator[np.ndarray]:
        while True:
            self.waiting_since = time.monotonic()
            frame = _read_ppm(self.proc.stdout)
            if frame is None:
                return
            self.waiting_since = None
            yield frame

    def close(self) -> int:
        self._done.set()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        code = self.proc.wait()
        self._drainer.join(timeout=10)  # every showinfo line is parsed before times are read
        self.proc.stderr.close()
        return code


def decode_frames(path: Path, size: int, *, squash: bool = False, stall_timeout: float = 120.0,
                  result: DecodeResult | None = None) -> Iterator[np.ndarray]:
    """Yield (H, W, 3) uint8 RGB frames at 1 FPS, short side `size`; fill `result` as it goes.

    Raises DecodeError, naming the file, when the video yields no frame.
    """
    path = Path(path)
    result = result if result is not None else DecodeResult()
    check_file(path)
    n = yield from _run(path, ffmpeg_args(path, size, squash, _SELECT_CENTRES), stall_timeout, result)
    if n == 0 and not result.warning:
        # Shorter than half a second: take the middle frame instead.
        middle = result.duration / 2 if result.duration == result.duration else 0.0
        args = ffmpeg_args(path, size, squash, f"gte(t,{middle:.6f})", max_frames=1)
        n = yield from _run(path, args, stall_timeout, result)
    if n == 0:
        raise DecodeError(result.warning or f"{path}: no decodable video frame")


def _run(path: Path, args: list[str], stall_timeout: float, result: DecodeResult):
    proc = _Ffmpeg(args, stall_timeout)
    count = 0
    try:
        for frame in proc.frames():
            if count == 0 and _is_image(proc.input_format):
                break
            count += 1
            yield frame
    finally:
        code = proc.close()
    if _is_image(proc.input_format):  # checked again: stderr is read in another thread
        raise DecodeError(f"{path}: an image ({proc.input_format}), not a video")
    result.duration = proc.duration
    times = proc.times[:count]
    result.times.extend(times + [k + 0.5 for k in range(len(times), count)])  # nominal, if a line was lost
    if proc.timed_out:
        raise DecodeError(f"{path}: decoder hung, killed after {stall_timeout:g} s without a frame")
    if code != 0:
        message = _explain(path, list(proc.stderr), code)
        if count == 0:
            result.warning = message
        else:  # frames came out before the error (a broken packet): keep them, say so
            result.warning = f"partial decode: {message}"
    elif proc.errors and count:  # decoded to the end, but past damaged data: keep the frames, say so
        first = re.sub(r"^(\[[^]]*\] )+", "", proc.first_error.strip())
        result.warning = (f"partial decode: {path}: ffmpeg reported {proc.errors} decoding error(s), "
                          f"frames may be missing or damaged (first: {first})")
    return count
