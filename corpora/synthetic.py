"""Synthetic set: short H.264 clips of coloured shapes doing events in order, with captions.

The set exists to test the whole chain without real data, and to check that a model uses
time: part of the test split comes in twins whose events are the same but in reverse order,
and whose captions differ only in that order.

Difficulty knobs (all off by default; each aimed at one mechanism of the LSECA head, so that an
ablation can show whether the module earns its place). Each knob draws from its own child
stream of the seed, after the base plan: with every knob off the output is exactly what it was
before the knobs existed (synthetic.json only gains keys), and switching one on changes
neither the clips' events nor another knob's draws.

- partial_captions (S4, text-conditioned pooling): that share of the captions of every split,
  train and test alike, name only ONE event of the clip ("A red circle grows." for a clip where
  a red circle grows, then a blue square moves left), so the text has to pick out its part of
  the video. Twins keep full captions (one event fits both twins equally). A one-event caption
  can be ambiguous across clips: another clip of the split may hold the same event (object,
  action and, for "appear", position). The event is therefore taken among the clip's events
  that no other clip of its split holds whenever there is one; synthetic.json records, per
  caption, the indices of the events it names (`caption_info`), so a checker can verify it, and
  per split the number of one-event captions that remain ambiguous
  (`ambiguous_partial_captions`: none in the test split of the 200-clip demo set, about half
  of them at 1,000 clips, where the split's events start to repeat).
- wordy_captions (S3, keyword-guided text enhancement): that share of the captions of every
  split get filler that says nothing about the clip: an opener, an aside after an object's
  name, a closer, drawn from fixed lists (FILLER_*) that hold no colour, shape, action or
  position word. Captions stay within WORDY_MAX_WORDS words (under CLIP's 77 tokens), and the
  colour, shape and action words become a minority of the words, so the keywords that KeyBERT
  picks should be the content words. The filler is spread over the caption rather than kept
  after the first 32 tokens, so train on a wordy set with `train-heads --max-words 77`: the
  default 32 cuts off the later events of a long caption. Twin captions get the same filler
  (the same aside after the same object), so they still differ only in the order of events.
- distractor_s (S2, adaptive frame weights): every clip gets round(distractor_s * fps) frames
  of footage no caption mentions (an empty background, tiny confetti in colours that are none
  of the object colours, or grey block noise), in up to one span per gap before, between and
  after the events, each span at least 1 s when the total allows. Clips then last up to
  max_video_s + distractor_s. synthetic.json records the spans (start_s, end_s, kind) per
  video. Twins reverse their events as usual; their distractors are drawn independently.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.decode import ffmpeg_exe

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
ONE_EVENT_TEMPLATES = ("{0}", "at some point {0}", "{0} at one point")

# Filler of wordy captions: no colour, shape, action or position word (a test checks), common
# words only, so that a word costs about one CLIP token.
FILLER_OPENERS = (
    "in this short and rather simple little clip that we recorded, you can see that",
    "if you watch this brief video closely from the very beginning, you will notice that",
    "here is a quick and fairly ordinary piece of footage in which",
    "as far as anyone can tell from this plain and somewhat boring recording,",
)
FILLER_ASIDES = (
    "as you can probably see quite clearly",
    "which is honestly not all that surprising",
    "well, more or less",
    "so to speak",
    "if we are being completely honest about it",
    "for whatever reason",
)
FILLER_CLOSERS = (
    "and that is pretty much all there is to it",
    "and nothing much else happens after that",
    "which is about all that one can say about this one",
)
WORDY_MAX_WORDS = 55  # with punctuation well under CLIP's 77 tokens

# Distractor footage: tiny dots in colours far from every object colour, or grey block noise
# (greys stay far from white), or the empty background.
DISTRACTOR_KINDS = ("empty", "confetti", "noise")
DISTRACTOR_COLOURS = ((240, 130, 20), (20, 200, 200), (250, 150, 200), (130, 80, 40))


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
    # Difficulty knobs, all off by default (module docstring):
    partial_captions: float = 0.0  # share of captions naming one event only (aimed at S4 pooling)
    wordy_captions: float = 0.0  # share of captions buried in filler words (aimed at S3 keywords)
    distractor_s: float = 0.0  # seconds of unmentioned footage per clip, on top of max_video_s (S2)


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
class Distractor:
    """Footage that no caption mentions, shown before event `gap` (len(events): after the last)."""

    gap: int
    frames: int
    kind: str  # one of DISTRACTOR_KINDS
    seed: int  # the clutter is drawn from it, so rendering stays a pure function of the plan


@dataclass(frozen=True)
class Clip:
    name: str
    split: str
    events: tuple[Event, ...]
    captions: tuple[str, ...]
    twin: str | None = None
    caption_events: tuple[tuple[int, ...], ...] = ()  # per caption, the events it names; () = all
    wordy: tuple[bool, ...] = ()  # per caption, whether filler was added; () = none
    distractors: tuple[Distractor, ...] = ()

    def named_events(self) -> tuple[tuple[int, ...], ...]:
        every = tuple(range(len(self.events)))
        return self.caption_events or tuple(every for _ in self.captions)

    def wordy_flags(self) -> tuple[bool, ...]:
        return self.wordy or tuple(False for _ in self.captions)


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


def describe(n_videos: int, seed: int, settings: SyntheticSettings | None = None) -> dict:
    """What make_synthetic would write to synthetic.json, without rendering anything."""
    cfg = settings or SyntheticSettings()
    _check_settings(cfg, n_videos)
    meta = _metadata(n_videos, seed, cfg, plan_clips(n_videos, seed, cfg))
    return json.loads(json.dumps(meta))


def _check_settings(cfg: SyntheticSettings, n_videos: int) -> None:
    if n_videos < 1:
        raise ValueError(f"n_videos must be at least 1, got {n_videos}")
    if cfg.width % 2 or cfg.height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {cfg.width}x{cfg.height}")
    if 3 * cfg.min_event_s > cfg.max_video_s:
        raise ValueError("three events of min_event_s do not fit in max_video_s")
    if abs(sum(cfg.split_fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must sum to 1, got {cfg.split_fractions}")
    for name in ("partial_captions", "wordy_captions"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} is a share in [0, 1], got {getattr(cfg, name)}")
    if cfg.distractor_s < 0:
        raise ValueError(f"distractor_s must be at least 0, got {cfg.distractor_s}")


# ---------------------------------------------------------------------------------------------
# Planning: every random draw happens here, in one fixed order: the base set from one Generator,
# then each knob that is on from its own.


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
    # The knobs come last, each from its own stream: with all of them off, the draws above are
    # all there is, in the order they always had.
    if cfg.partial_captions > 0:
        clips = _partial_captions(_knob_rng(seed, 0), clips, cfg.partial_captions)
    if cfg.wordy_captions > 0:
        clips = _wordy_captions(_knob_rng(seed, 1), clips, cfg.wordy_captions)
    if cfg.distractor_s > 0:
        knob = _knob_rng(seed, 2)
        clips = [dataclasses.replace(c, distractors=_draw_distractors(knob, len(c.events), cfg))
                 for c in clips]
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
# Difficulty knobs: each rewrites the base plan with draws from its own stream.


def _knob_rng(seed: int, knob: int) -> np.random.Generator:
    # A child of the seed's SeedSequence (spawn key `knob`), independent of the base stream.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(knob,)))


def _share(share: float, n: int) -> int:
    return int(np.floor(share * n + 0.5))


def _event_key(event: Event) -> tuple[str, str, str, str]:
    """What a one-event caption says about an event."""
    return event.colour, event.shape, event.action, event.position


def _partial_captions(rng: np.random.Generator, clips: list[Clip], share: float) -> list[Clip]:
    clips = list(clips)
    for split in SPLITS:
        members = [i for i, c in enumerate(clips) if c.split == split]
        # How many clips of the split hold each event: a one-event caption should name one
        # that no other clip of the split (its retrieval gallery) holds.
        holders = Counter(key for i in members for key in {_event_key(e) for e in clips[i].events})
        slots = [(i, k) for i in members if clips[i].twin is None
                 for k in range(len(clips[i].captions))]
        chosen = rng.choice(len(slots), size=_share(share, len(slots)), replace=False)
        for slot in sorted(int(j) for j in chosen):
            i, k = slots[slot]
            clips[i] = _one_event_caption(rng, clips[i], k, holders)
    return clips


def _one_event_caption(rng: np.random.Generator, clip: Clip, k: int, holders: Counter) -> Clip:
    unique = [j for j, e in enumerate(clip.events) if holders[_event_key(e)] == 1]
    candidates = unique or list(range(len(clip.events)))
    others = clip.captions[:k] + clip.captions[k + 1 :]
    # Bounded retries for a caption the clip does not have yet; a duplicate is harmless.
    for _ in range(20):
        j = candidates[int(rng.integers(len(candidates)))]
        phrase = _event_phrase(rng, clip.events[j])
        text = _render(_pick(rng, ONE_EVENT_TEMPLATES), [phrase])
        if text not in others:
            break
    captions = list(clip.captions)
    named = list(clip.named_events())
    captions[k], named[k] = text, (j,)
    return dataclasses.replace(clip, captions=tuple(captions), caption_events=tuple(named))


def _wordy_captions(rng: np.random.Generator, clips: list[Clip], share: float) -> list[Clip]:
    clips = list(clips)
    index = {c.name: i for i, c in enumerate(clips)}
    for split in SPLITS:
        # A twin pair is one unit, filled with the same filler, so that its captions still
        # differ only in the order of events.
        units = [[(i, k)] for i, c in enumerate(clips) if c.split == split and c.twin is None
                 for k in range(len(c.captions))]
        units += [[(i, 0), (index[c.twin], 0)] for i, c in enumerate(clips)
                  if c.split == split and c.twin and c.name < c.twin]
        # Exact share, except that a pair may leave it one caption short.
        target = _share(share, sum(len(u) for u in units))
        taken = 0
        for u in rng.permutation(len(units)):
            unit = units[int(u)]
            if taken + len(unit) > target:
                continue
            choice = _filler_choice(rng, clips[unit[0][0]].events)
            for i, k in unit:
                clips[i] = _make_wordy(clips[i], k, choice)
            taken += len(unit)
    return clips


def _filler_choice(rng: np.random.Generator, events: tuple[Event, ...]) -> dict:
    """Which filler goes where, keyed by object so that twins (reversed events) share it."""
    objects = [(e.colour, e.shape) for e in events]
    asides = rng.choice(len(FILLER_ASIDES), size=len(objects), replace=False)
    slots: list = ["opener", "closer", *objects]
    return {
        "opener": FILLER_OPENERS[int(rng.integers(len(FILLER_OPENERS)))],
        "closer": FILLER_CLOSERS[int(rng.integers(len(FILLER_CLOSERS)))],
        "asides": {obj: FILLER_ASIDES[int(a)] for obj, a in zip(objects, asides)},
        # Slots are filled in this order while the caption stays within WORDY_MAX_WORDS.
        "order": [slots[int(j)] for j in rng.permutation(len(slots))],
    }


def _make_wordy(clip: Clip, k: int, choice: dict) -> Clip:
    body = clip.captions[k][0].lower() + clip.captions[k][1:].rstrip(".")
    named = [clip.events[j] for j in clip.named_events()[k]]
    words = len(body.split())
    keep = set()
    for slot in choice["order"]:
        if slot == "opener" or slot == "closer":
            text = choice[slot]
        elif slot in {(e.colour, e.shape) for e in named}:
            text = choice["asides"][slot]
        else:
            continue
        if words + len(text.split()) <= WORDY_MAX_WORDS:
            keep.add(slot)
            words += len(text.split())
    for e in named:
        if (e.colour, e.shape) in keep:
            noun = f"a {e.colour} {e.shape}"
            body = body.replace(noun, f"{noun}, {choice['asides'][(e.colour, e.shape)]},", 1)
    if "opener" in keep:
        body = f"{choice['opener']} {body}"
    if "closer" in keep:
        body = f"{body}, {choice['closer']}"
    captions = list(clip.captions)
    captions[k] = body[0].upper() + body[1:] + "."
    flags = list(clip.wordy_flags())
    flags[k] = True
    return dataclasses.replace(clip, captions=tuple(captions), wordy=tuple(flags))


def _draw_distractors(
    rng: np.random.Generator, n_events: int, cfg: SyntheticSettings
) -> tuple[Distractor, ...]:
    total = int(np.floor(cfg.distractor_s * cfg.fps + 0.5))
    if total == 0:
        return ()
    # At most one span per gap, and each at least 1 s when the total allows, so that 1 FPS
    # sampling sees every span.
    n_spans = int(rng.integers(1, max(1, min(n_events + 1, total // cfg.fps)) + 1))
    gaps = np.sort(rng.choice(n_events + 1, size=n_spans, replace=False))
    floor = min(cfg.fps, total // n_spans)
    extra = rng.multinomial(total - n_spans * floor, [1.0 / n_spans] * n_spans)
    kinds = rng.integers(len(DISTRACTOR_KINDS), size=n_spans)
    seeds = rng.integers(2**31, size=n_spans)
    return tuple(
        Distractor(int(g), floor + int(x), DISTRACTOR_KINDS[int(kind)], int(s))
        for g, x, kind, s in zip(gaps, extra, kinds, seeds)
    )


# ---------------------------------------------------------------------------------------------
# Drawing and encoding


def render_frames(
    events: tuple[Event, ...],
    cfg: SyntheticSettings,
    distractors: tuple[Distractor, ...] = (),
) -> np.ndarray:
    """All frames of a clip, (T, H, W, 3) uint8; pure function of the events and distractors."""
    yy, xx = np.mgrid[0 : cfg.height, 0 : cfg.width].astype(np.float32)
    before = {d.gap: d for d in distractors}
    frames = []
    for i, event in enumerate(events):
        if i in before:
            frames.extend(_clutter(before[i], cfg, xx, yy))
        for k in range(event.frames):
            frame = np.empty((cfg.height, cfg.width, 3), np.uint8)
            frame[:] = BACKGROUND
            state = _object_state(event, k / max(event.frames - 1, 1), cfg)
            if state is not None:
                cx, cy, radius = state
                frame[_shape_mask(event.shape, xx - cx, yy - cy, radius)] = COLOURS[event.colour]
            frames.append(frame)
    if len(events) in before:
        frames.extend(_clutter(before[len(events)], cfg, xx, yy))
    return np.stack(frames)  # (T, H, W, 3)


def _clutter(
    d: Distractor, cfg: SyntheticSettings, xx: np.ndarray, yy: np.ndarray
) -> list[np.ndarray]:
    """The frames of one distractor span: nothing that any caption could name."""
    rng = np.random.default_rng(d.seed)
    h, w = cfg.height, cfg.width
    empty = np.empty((h, w, 3), np.uint8)
    empty[:] = BACKGROUND
    if d.kind == "empty":
        return [empty.copy() for _ in range(d.frames)]
    if d.kind == "noise":
        # Coarse grey blocks, redrawn every frame; greys in 60-170 are far from every colour.
        block = max(2, min(h, w) // 12)
        frames = []
        for _ in range(d.frames):
            grey = rng.integers(60, 171, size=(-(-h // block), -(-w // block)), dtype=np.uint8)
            big = np.repeat(np.repeat(grey, block, axis=0), block, axis=1)[:h, :w]
            frames.append(np.repeat(big[:, :, None], 3, axis=2))
        return frames
    # Confetti: dots of half the smallest object's radius (a growing or shrinking object gets
    # down to 6 % of the short side), drifting a little from frame to frame.
    n_dots = int(rng.integers(8, 17))
    radius = max(1.0, 0.03 * min(h, w))
    x, y = rng.uniform(0, w, n_dots), rng.uniform(0, h, n_dots)
    colours = rng.integers(len(DISTRACTOR_COLOURS), size=n_dots)
    frames = []
    for _ in range(d.frames):
        frame = empty.copy()
        for cx, cy, c in zip(x, y, colours):
            frame[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius * radius] = DISTRACTOR_COLOURS[int(c)]
        frames.append(frame)
        x = np.clip(x + rng.normal(0, 0.02 * w, n_dots), 0, w - 1)
        y = np.clip(y + rng.normal(0, 0.02 * h, n_dots), 0, h - 1)
    return frames


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
    frames = render_frames(clip.events, cfg, clip.distractors)
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
        "generator": "corpora.synthetic",
        "seed": seed,
        "n_videos": n_videos,
        "settings": dataclasses.asdict(cfg),
        "captions_file": "captions.jsonl",
        "splits": {s: sum(c.split == s for c in clips) for s in SPLITS},
        "captions": {s: sum(len(c.captions) for c in clips if c.split == s) for s in SPLITS},
        "twins": [[c.name, c.twin] for c in clips if c.twin and c.name < c.twin],
        "ambiguous_partial_captions": _ambiguous_partial(clips),
        "videos": [_clip_record(c, cfg.fps) for c in clips],
    }


def _ambiguous_partial(clips: list[Clip]) -> dict[str, int]:
    """Per split, the one-event captions whose event another clip of the split also holds."""
    counts = {}
    for split in SPLITS:
        members = [c for c in clips if c.split == split]
        holders = Counter(key for c in members for key in {_event_key(e) for e in c.events})
        counts[split] = sum(
            len(named) == 1 < len(c.events) and holders[_event_key(c.events[named[0]])] > 1
            for c in members
            for named in c.named_events()
        )
    return counts


def _clip_record(clip: Clip, fps: int) -> dict:
    frames = sum(e.frames for e in clip.events) + sum(d.frames for d in clip.distractors)
    return {
        "video": clip.name,
        "split": clip.split,
        "frames": frames,
        "duration_s": frames / fps,
        "twin": clip.twin,
        "captions": list(clip.captions),
        "events": [dataclasses.asdict(e) for e in clip.events],
        # Per caption: the indices (into events) of the events it names, and whether it is wordy.
        "caption_info": [
            {"events": list(named), "wordy": wordy}
            for named, wordy in zip(clip.named_events(), clip.wordy_flags())
        ],
        "distractors": distractor_spans(clip, fps),
    }


def distractor_spans(clip: Clip, fps: int) -> list[dict]:
    """Start and end (seconds) and kind of each distractor span of a clip, in time order."""
    before = {d.gap: d for d in clip.distractors}
    spans, frame = [], 0
    for gap in range(len(clip.events) + 1):
        if gap in before:
            d = before[gap]
            end = frame + d.frames
            spans.append({"start_s": frame / fps, "end_s": end / fps, "kind": d.kind})
            frame += d.frames
        if gap < len(clip.events):
            frame += clip.events[gap].frames
    return spans


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
