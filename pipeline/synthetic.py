"""Synthetic set: short H.264 clips of coloured shapes doing events in order, with captions.

The set exists to test the whole chain without real data, and to check that a model uses
time: part of the test split comes in twins whose events are the same but in reverse order,
and whose captions differ only in that order.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decode import ffmpeg_exe

SPLITS = ("train", "val", "test")

# Hues far apart in RGB so that a CLIP-sized model and the H.264 chroma subsampling keep
# them distinct on the grey background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (245, 225, 20),
    "purple": (150, 40, 190),
    "white": (250, 250, 250),
}
BACKGROUND = (110, 110, 110)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
ACTIONS = ("move_left", "move_right", "move_up", "move_down", "grow", "shrink", "appear")
# Corner and centre anchors as (x, y) fractions of the frame.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.28),
    "top right": (0.75, 0.28),
    "bottom left": (0.25, 0.72),
    "bottom right": (0.75, 0.72),
    "center": (0.5, 0.5),
}

ACTION_PHRASES: dict[str, tuple[str, ...]] = {
    "move_left": ("moves to the left", "moves left", "slides to the left", "travels leftward"),
    "move_right": ("moves to the right", "moves right", "slides to the right", "travels rightward"),
    "move_up": ("moves up", "moves upward", "rises", "goes up"),
    "move_down": ("moves down", "moves downward", "sinks", "goes down"),
    "grow": ("grows", "gets bigger", "grows larger", "expands"),
    "shrink": ("shrinks", "gets smaller", "becomes smaller", "contracts"),
    "appear": ("appears in the {pos}", "shows up in the {pos}", "pops up in the {pos}"),
}
TWO_EVENT_TEMPLATES = (
    "{0}, then {1}",
    "first {0}, after that {1}",
    "{0} and then {1}",
    "{0}; afterwards {1}",
)
THREE_EVENT_TEMPLATES = (
    "{0}, then {1}, then {2}",
    "first {0}, then {1}, and finally {2}",
    "{0}; after that {1}; at the end {2}",
)


@dataclass(frozen=True)
class SyntheticSettings:
    """How the synthetic set is drawn; saved in synthetic.json beside the videos."""

    width: int = 128  # pixels; even, as yuv420p needs
    height: int = 96  # pixels; even
    fps: int = 8  # frames per second of the written clips
    min_event_s: float = 2.0  # every event spans at least two 1 FPS samples
    max_video_s: float = 7.0  # clips last 4-7 s
    three_event_share: float = 0.3  # share of clips with three events instead of two
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train, val, test
    twin_fraction: float = 0.5  # share of test clips that belong to a time-reversed twin pair
    train_captions: int = 3  # paraphrases per training clip; val and test get one
    crf: int = 20  # x264 quality; the shapes are flat, so this stays small on disk


@dataclass(frozen=True)
class Event:
    """One object doing one action over a span of frames."""

    shape: str
    colour: str
    action: str
    frames: int
    x: float  # anchor position as a fraction of width
    y: float  # anchor position as a fraction of height
    position: str = ""  # named anchor, for "appear" only


@dataclass(frozen=True)
class Clip:
    name: str
    split: str
    events: tuple[Event, ...]
    captions: tuple[str, ...]
    twin: str | None = None


def make_synthetic(
    out: Path,
    n_videos: int,
    seed: int,
    *,
    settings: SyntheticSettings | None = None,
    workers: int | None = None,
) -> dict:
    """Write n_videos mp4 clips, out/captions.jsonl and out/synthetic.json; return the latter."""
    cfg = settings or SyntheticSettings()
    _check_settings(cfg, n_videos)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clips = plan_clips(n_videos, seed, cfg)
    n_workers = workers or min(4, os.cpu_count() or 1)
    # Clips are fully planned above, so the pool only renders: the output cannot depend on
    # scheduling. ffmpeg runs outside the GIL, so threads are enough.
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        list(pool.map(lambda clip: write_clip(out / clip.name, clip, cfg), clips))
    _write_atomic(out / "captions.jsonl", "".join(_caption_lines(clips)))
    text = json.dumps(_metadata(n_videos, seed, cfg, clips), indent=2) + "\n"
    _write_atomic(out / "synthetic.json", text)
    return json.loads(text)  # exactly what the file holds (tuples come back as lists)


def _check_settings(cfg: SyntheticSettings, n_videos: int) -> None:
    if n_videos < 1:
        raise ValueError(f"n_videos must be at least 1, got {n_videos}")
    if cfg.width % 2 or cfg.height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {cfg.width}x{cfg.height}")
    if 3 * cfg.min_event_s > cfg.max_video_s:
        raise ValueError("three events of min_event_s do not fit in max_video_s")
    if abs(sum(cfg.split_fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must sum to 1, got {cfg.split_fractions}")


# ---------------------------------------------------------------------------------------------
# Planning: every random draw happens here, in one fixed order, from one Generator.


def plan_clips(n_videos: int, seed: int, cfg: SyntheticSettings) -> list[Clip]:
    rng = np.random.default_rng(seed)
    n_train, n_val, n_test = split_sizes(n_videos, cfg.split_fractions)
    n_pairs = twin_pairs(n_test, cfg.twin_fraction)
    clips: list[Clip] = []
    for split, count, n_captions in (
        ("train", n_train, cfg.train_captions),
        ("val", n_val, 1),
        ("test", n_test - 2 * n_pairs, 1),
    ):
        for _ in range(count):
            events = _draw_events(rng, cfg)
            captions = _distinct_captions(rng, events, n_captions)
            clips.append(Clip(_name(len(clips)), split, events, captions))
    for _ in range(n_pairs):
        clips.extend(_twin_pair(rng, cfg, len(clips)))
    return clips


def split_sizes(n_videos: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    n_train = int(round(n_videos * fractions[0]))
    n_val = min(int(round(n_videos * fractions[1])), n_videos - n_train)
    return n_train, n_val, n_videos - n_train - n_val


def twin_pairs(n_test: int, twin_fraction: float) -> int:
    pairs = int(round(n_test * twin_fraction / 2))
    # A tiny set still gets one pair, so the time check is never silently absent.
    if twin_fraction > 0 and n_test >= 2:
        pairs = max(pairs, 1)
    return min(pairs, n_test // 2)


def _name(index: int) -> str:
    return f"synth_{index:05d}.mp4"


def _twin_pair(rng: np.random.Generator, cfg: SyntheticSettings, start: int) -> list[Clip]:
    events = _draw_events(rng, cfg)
    # The same wording in both orders: only the order of the events tells the captions apart.
    phrases = [_event_phrase(rng, e) for e in events]
    template = _pick(rng, _templates(len(events)))
    first, second = _name(start), _name(start + 1)
    return [
        Clip(first, "test", events, (_render(template, phrases),), twin=second),
        Clip(second, "test", events[::-1], (_render(template, phrases[::-1]),), twin=first),
    ]


def _draw_events(rng: np.random.Generator, cfg: SyntheticSettings) -> tuple[Event, ...]:
    n_events = 3 if rng.random() < cfg.three_event_share else 2
    lengths = _event_lengths(rng, n_events, cfg)
    # Distinct objects per clip, so that reversing the events always changes the caption.
    objects = rng.choice(len(SHAPES) * len(COLOURS), size=n_events, replace=False)
    actions = rng.choice(len(ACTIONS), size=n_events, replace=False)
    events = []
    for obj, action, frames in zip(objects, actions, lengths):
        shape = SHAPES[int(obj) // len(COLOURS)]
        colour = list(COLOURS)[int(obj) % len(COLOURS)]
        events.append(_place(rng, shape, colour, ACTIONS[int(action)], frames))
    return tuple(events)


def _event_lengths(rng: np.random.Generator, n_events: int, cfg: SyntheticSettings) -> list[int]:
    min_frames = int(np.ceil(cfg.min_event_s * cfg.fps))
    budget = int(cfg.max_video_s * cfg.fps) - n_events * min_frames
    # Two-event clips get up to 1.5 s extra per event, which keeps every clip within 4-7 s.
    extra_max = min(budget // n_events, int(1.5 * cfg.fps))
    return [min_frames + int(rng.integers(0, extra_max + 1)) for _ in range(n_events)]


def _place(rng: np.random.Generator, shape: str, colour: str, action: str, frames: int) -> Event:
    if action == "appear":
        position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        x, y = POSITIONS[position]
        return Event(shape, colour, action, frames, x, y, position)
    x, y = rng.uniform(0.3, 0.7, size=2)
    return Event(shape, colour, action, frames, float(round(x, 3)), float(round(y, 3)))


# ---------------------------------------------------------------------------------------------
# Captions


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _templates(n_events: int) -> tuple[str, ...]:
    return TWO_EVENT_TEMPLATES if n_events == 2 else THREE_EVENT_TEMPLATES


def _event_phrase(rng: np.random.Generator, event: Event) -> str:
    action = _pick(rng, ACTION_PHRASES[event.action]).format(pos=event.position)
    return f"a {event.colour} {event.shape} {action}"


def _render(template: str, phrases: list[str]) -> str:
    text = template.format(*phrases)
    return text[0].upper() + text[1:] + "."


def _caption(rng: np.random.Generator, events: tuple[Event, ...]) -> str:
    phrases = [_event_phrase(rng, e) for e in events]
    return _render(_pick(rng, _templates(len(events))), phrases)


def _distinct_captions(
    rng: np.random.Generator, events: tuple[Event, ...], count: int
) -> tuple[str, ...]:
    captions: list[str] = []
    # Bounded retries: a duplicate paraphrase is harmless, an endless loop is not.
    for _ in range(20 * count):
        text = _caption(rng, events)
        if text not in captions:
            captions.append(text)
        if len(captions) == count:
            break
    return tuple(captions)


def _caption_lines(clips: list[Clip]) -> list[str]:
    return [
        json.dumps({"video": c.name, "caption": text, "split": c.split}) + "\n"
        for c in clips
        for text in c.captions
    ]


# ---------------------------------------------------------------------------------------------
# Drawing and encoding


def render_frames(events: tuple[Event, ...], cfg: SyntheticSettings) -> np.ndarray:
    """All frames of a clip, (T, H, W, 3) uint8; pure function of the events."""
    yy, xx = np.mgrid[0 : cfg.height, 0 : cfg.width].astype(np.float32)
    frames = []
    for event in events:
        for k in range(event.frames):
            frame = np.empty((cfg.height, cfg.width, 3), np.uint8)
            frame[:] = BACKGROUND
            state = _object_state(event, k / max(event.frames - 1, 1), cfg)
            if state is not None:
                cx, cy, radius = state
                frame[_shape_mask(event.shape, xx - cx, yy - cy, radius)] = COLOURS[event.colour]
            frames.append(frame)
    return np.stack(frames)  # (T, H, W, 3)


def _object_state(
    event: Event, progress: float, cfg: SyntheticSettings
) -> tuple[float, float, float] | None:
    """Centre (pixels) and radius of the object at progress in [0, 1]; None when hidden."""
    w, h = cfg.width, cfg.height
    base = 0.12 * min(w, h)
    cx, cy = event.x * w, event.y * h
    # Moves cover 60 % of the frame, from one side to the other, whatever the anchor.
    travel = 0.8 - 0.6 * progress
    if event.action == "move_left":
        return travel * w, cy, base
    if event.action == "move_right":
        return (1.0 - travel) * w, cy, base
    if event.action == "move_up":
        return cx, travel * h, base
    if event.action == "move_down":
        return cx, (1.0 - travel) * h, base
    if event.action == "grow":
        return cx, cy, base * (0.5 + 1.5 * progress)
    if event.action == "shrink":
        return cx, cy, base * (2.0 - 1.5 * progress)
    # "appear": an empty frame first, so the appearance itself is visible.
    return None if progress < 0.25 else (cx, cy, base)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.3 * r
    if shape == "triangle":
        # Apex up; the half-width grows linearly from the apex to the base.
        inside_rows = (dy >= -r) & (dy <= r)
        return inside_rows & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "cross":
        bar = r / 3
        return ((np.abs(dx) <= r) & (np.abs(dy) <= bar)) | ((np.abs(dx) <= bar) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def write_clip(path: Path, clip: Clip, cfg: SyntheticSettings) -> None:
    frames = render_frames(clip.events, cfg)
    encode_mp4(frames, path, cfg.fps, cfg.crf)


def encode_mp4(frames: np.ndarray, path: Path, fps: int, crf: int) -> None:
    """Pipe raw RGB frames (T, H, W, 3) into ffmpeg/libx264; the file appears only when done."""
    _, height, width, _ = frames.shape
    partial = path.with_name(path.stem + ".partial.mp4")
    args = [
        ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps),
        "-i", "-",
        "-an", "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf),
        "-pix_fmt", "yuv420p", "-threads", "1",
        # Bit-exact muxing and no metadata: the same seed gives the same bytes.
        "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
        str(partial),
    ]  # fmt: skip
    result = subprocess.run(args, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg failed on {path}: {result.stderr.decode(errors='replace')}")
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------
# Outputs


def _metadata(n_videos: int, seed: int, cfg: SyntheticSettings, clips: list[Clip]) -> dict:
    return {
        "generator": "pipeline.synthetic",
        "seed": seed,
        "n_videos": n_videos,
        "settings": dataclasses.asdict(cfg),
        "captions_file": "captions.jsonl",
        "splits": {s: sum(c.split == s for c in clips) for s in SPLITS},
        "captions": {s: sum(len(c.captions) for c in clips if c.split == s) for s in SPLITS},
        "twins": [[c.name, c.twin] for c in clips if c.twin and c.name < c.twin],
        "videos": [_clip_record(c, cfg.fps) for c in clips],
    }


def _clip_record(clip: Clip, fps: int) -> dict:
    frames = sum(e.frames for e in clip.events)
    return {
        "video": clip.name,
        "split": clip.split,
        "frames": frames,
        "duration_s": frames / fps,
        "twin": clip.twin,
        "captions": list(clip.captions),
        "events": [dataclasses.asdict(e) for e in clip.events],
    }


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
