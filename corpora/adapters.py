"""Dataset adapters: read benchmark annotations as published and write one captions JSONL.

Every adapter yields (video, caption, split) records; `prepare` writes them as the JSONL the
extractor reads ({"video", "caption", "split"} per line). Structural faults (a missing file,
bad JSON, a missing field or column) raise AnnotationError naming the file and the field;
faults confined to one row (an empty caption, a short line, an unknown video) skip that row
and are listed in the report.
"""
from __future__ import annotations

import csv
import inspect
import json
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.captions import VIDEO_EXTENSIONS, VideoIndex, find_videos, read_rows

SPLITS = ("train", "val", "test")


class AnnotationError(ValueError):
    """An annotation file is missing or not in the published format; the message names it."""


@dataclass(frozen=True)
class Record:
    video: str
    caption: str
    split: str
    file: str = ""  # where the record came from, to report it if it is skipped later
    line: int | None = None


@dataclass(frozen=True)
class Skipped:
    file: str
    line: int | None  # 1-based line in the file; None for JSON items and whole videos
    reason: str


@dataclass
class Collected:
    """What one adapter read: records in output order, rows it skipped, protocol notes."""

    records: list[Record] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    videos_dir: Path | None = None  # where the videos are, when the adapter knows


@dataclass
class PrepareReport:
    dataset: str
    path: Path  # the captions JSONL written
    splits: dict[str, dict[str, int]]  # split -> {"videos": n, "captions": n}
    videos: int  # distinct videos over all splits
    captions: int
    skipped: list[Skipped]
    notes: list[str]  # protocol conventions applied and anything unusual in the counts
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["options"] = {k: str(v) if isinstance(v, Path) else v for k, v in self.options.items()}
        return out


# ---------------------------------------------------------------------------------------------
# prepare


def prepare(
    dataset: str, annotations: list[Path] | Path, out: Path, **options: Any
) -> PrepareReport:
    """Read `dataset`'s annotations and write the captions JSONL atomically.

    annotations: a folder holding the files under their published names, explicit file
    paths (matched by file name), or both. out: a `.jsonl` file, or a folder that receives
    `captions.jsonl`. Options: `videos_dir` (any dataset: keep only captions whose video is
    there, and write paths relative to it) and the adapter's own (msrvtt: `train_split`).
    A `<name>.prepare.json` with the report is written beside the JSONL.
    """
    reader = _reader(dataset)
    videos_dir = options.pop("videos_dir", None)
    _check_options(dataset, reader, options)
    collected = reader(annotations, **options)
    if videos_dir is not None or collected.videos_dir is not None:
        _keep_present_videos(collected, Path(videos_dir or collected.videos_dir))
    if not collected.records:
        raise AnnotationError(f"{dataset}: no usable captions; {_first_reasons(collected.skipped)}")
    path = _output_path(Path(out))
    _refuse_to_overwrite_input(path, collected)
    _write_jsonl(path, collected.records)
    report = _report(dataset, path, collected, {**options, "videos_dir": videos_dir})
    _write_text_atomic(path.with_suffix(".prepare.json"), json.dumps(report.to_dict(), indent=2))
    return report


def _reader(dataset: str) -> Callable[..., Collected]:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}") from None


def _check_options(dataset: str, reader: Callable[..., Collected], options: dict) -> None:
    params = set(inspect.signature(reader).parameters) - {"annotations"}
    unknown = sorted(set(options) - params)
    if unknown:
        accepted = sorted(params | {"videos_dir"})
        raise ValueError(f"{dataset}: unknown option(s) {unknown}; accepted: {accepted}")


def _output_path(out: Path) -> Path:
    return out if out.suffix == ".jsonl" else out / "captions.jsonl"


def _refuse_to_overwrite_input(path: Path, c: Collected) -> None:
    sources = {Path(r.file).resolve() for r in c.records}
    if path.resolve() in sources:
        raise ValueError(f"output {path} is one of the annotation files; choose another out")


def _first_reasons(skipped: list[Skipped], limit: int = 5) -> str:
    if not skipped:
        return "the annotations hold no captions"
    shown = "; ".join(_describe(s) for s in skipped[:limit])
    return f"{len(skipped)} row(s) skipped, e.g. {shown}"


def _describe(s: Skipped) -> str:
    return f"{s.file} line {s.line}: {s.reason}" if s.line else f"{s.file}: {s.reason}"


def _report(dataset: str, path: Path, c: Collected, options: dict) -> PrepareReport:
    splits = {}
    for split in SPLITS:
        rows = [r for r in c.records if r.split == split]
        splits[split] = {"videos": len({r.video for r in rows}), "captions": len(rows)}
    notes = c.notes + _leak_notes(c.records)
    return PrepareReport(
        dataset=dataset,
        path=path,
        splits=splits,
        videos=len({r.video for r in c.records}),
        captions=len(c.records),
        skipped=c.skipped,
        notes=notes,
        options=options,
    )


def _leak_notes(records: list[Record]) -> list[str]:
    seen: dict[str, set[str]] = {}
    for r in records:
        seen.setdefault(r.video, set()).add(r.split)
    shared = sorted(v for v, splits in seen.items() if len(splits) > 1)
    if not shared:
        return []
    return [f"WARNING: {len(shared)} video(s) appear in more than one split, e.g. {shared[:5]}"]


def _write_jsonl(path: Path, records: list[Record]) -> None:
    lines = (
        json.dumps({"video": r.video, "caption": r.caption, "split": r.split}, ensure_ascii=False)
        for r in records
    )
    _write_text_atomic(path, "".join(line + "\n" for line in lines))


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp file sits beside the target so that os.replace stays on one filesystem.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Finding the published files


def _as_paths(annotations: list[Path] | Path) -> list[Path]:
    many = isinstance(annotations, (list, tuple))
    return [Path(p) for p in (annotations if many else [annotations])]


def locate(
    annotations: list[Path] | Path, required: Iterable[str], optional: Iterable[str] = ()
) -> dict[str, Path]:
    """Map each published file name to a path: explicit files first, then the folders given."""
    paths = _as_paths(annotations)
    files = {p.name: p for p in paths if not p.is_dir()}
    folders = [p for p in paths if p.is_dir()]
    found: dict[str, Path] = {}
    for name in [*required, *optional]:
        hit = files.get(name) or next((d / name for d in folders if (d / name).is_file()), None)
        if hit is not None:
            found[name] = hit
    missing = [n for n in required if n not in found or not found[n].is_file()]
    if missing:
        where = ", ".join(str(p) for p in paths) or "(nothing given)"
        raise AnnotationError(
            f"missing annotation file(s) {missing}; looked in {where}; "
            f"expected the published names {list(required)}"
            + (f" (optional: {list(optional)})" if optional else "")
        )
    return found


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {e.start})") from None


def load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise AnnotationError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None


def _need(item: Any, key: str, path: Path, where: str) -> Any:
    if not isinstance(item, dict):
        raise AnnotationError(f"{path}: {where}: expected an object, got {type(item).__name__}")
    if key not in item:
        raise AnnotationError(f"{path}: {where}: missing field {key!r}")
    return item[key]


def _need_list(value: Any, path: Path, where: str) -> list:
    if not isinstance(value, list):
        raise AnnotationError(f"{path}: {where}: expected a list, got {type(value).__name__}")
    return value


def _need_list_field(item: Any, key: str, path: Path, where: str) -> list:
    return _need_list(_need(item, key, path, where), path, f"{where} field {key!r}")


def _read_csv_columns(path: Path, columns: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a headed CSV as (line number, row); a missing column raises, naming it."""
    reader = csv.DictReader(_read_text(path).splitlines())
    header = reader.fieldnames or []
    absent = [c for c in columns if c not in header]
    if absent:
        raise AnnotationError(f"{path}: missing column(s) {absent}; header is {header}")
    # The header is line 1; DictReader skips blank lines, so count them through line_num.
    return [(reader.line_num, row) for row in reader]


def _strip_video_suffix(video: str) -> str:
    # Only known video extensions: LSMDC and VATEX ids contain dots and must stay whole.
    suffix = Path(video).suffix.lower()
    return video[: -len(suffix)] if suffix in VIDEO_EXTENSIONS else video


def _clean(text: Any) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------
# MSR-VTT


MSRVTT_DATA = "MSRVTT_data.json"
MSRVTT_TEST = "MSRVTT_JSFUSION_test.csv"
MSRVTT_TRAIN = {"9k": "MSRVTT_train.9k.csv", "7k": "MSRVTT_train.7k.csv"}


def read_msrvtt(annotations: list[Path] | Path, train_split: str = "9k") -> Collected:
    """Train: every caption of the 9k (or 7k) videos; test: the 1k-A captions; no val.

    With `MSRVTT_JSFUSION_test.csv` alone (no `MSRVTT_data.json`, no training list: the usual
    zero-shot download), only the 1k-A test split is written, and a note says so.
    """
    if train_split not in MSRVTT_TRAIN:
        choices = list(MSRVTT_TRAIN)
        raise ValueError(f"msrvtt: train_split must be one of {choices}, got {train_split!r}")
    train_name = MSRVTT_TRAIN[train_split]
    files = locate(annotations, [MSRVTT_TEST], [MSRVTT_DATA, *MSRVTT_TRAIN.values()])
    out = Collected()
    training_files = [n for n in (MSRVTT_DATA, *MSRVTT_TRAIN.values()) if n in files]
    if not training_files:
        _msrvtt_test(files[MSRVTT_TEST], out)
        out.notes.append(
            f"only {MSRVTT_TEST} was given (no {MSRVTT_DATA}, no MSRVTT_train.*.csv): the 1k-A "
            "test split alone; there is no training split, so only zero-shot evaluation applies "
            "(`eval` without `--run`); `train-heads` has nothing to train on"
        )
        out.notes.append("test is the 1k-A split (JSFusion), one caption per video")
        out.notes.append("val is empty: the standard MSR-VTT protocol has no validation split")
        out.notes.extend(_count_notes(out.records, {"test": 1000}))
        return out
    if MSRVTT_DATA not in files or train_name not in files:
        _msrvtt_incomplete(annotations, files, train_split)
    captions = _msrvtt_captions(files[MSRVTT_DATA])
    train_file = files[train_name]
    for line, row in _read_csv_columns(train_file, ["video_id"]):
        video = row["video_id"].strip()
        if video not in captions:
            why = f"video {video!r} has no sentences in {MSRVTT_DATA}"
            out.skipped.append(Skipped(str(train_file), line, why))
            continue
        out.records.extend(
            Record(video, c, "train", str(train_file), line) for c in captions[video]
        )
    _msrvtt_test(files[MSRVTT_TEST], out)
    out.notes.append(f"MSR-VTT {train_split} training list, all captions per video")
    out.notes.append("test is the 1k-A split (JSFusion), one caption per video")
    out.notes.append("val is empty: the standard MSR-VTT protocol has no validation split")
    expected = {"train": 9000, "test": 1000} if train_split == "9k" else {"test": 1000}
    out.notes.extend(_count_notes(out.records, expected))
    return out


def _msrvtt_incomplete(
    annotations: list[Path] | Path, files: dict[str, Path], train_split: str
) -> None:
    """Some training files but not the pair a training split needs: say which one is missing."""
    train_name = MSRVTT_TRAIN[train_split]
    missing = [n for n in (MSRVTT_DATA, train_name) if n not in files]
    found = sorted(n for n in files if n != MSRVTT_TEST)
    where = ", ".join(str(p) for p in _as_paths(annotations))
    hint = ""
    other = next((s for s, n in MSRVTT_TRAIN.items() if s != train_split and n in files), None)
    if train_name in missing and other is not None:
        hint = f"; {MSRVTT_TRAIN[other]} is there: use train_split='{other}' "
        hint += f"(--train-split {other})"
    raise AnnotationError(
        f"msrvtt: missing annotation file(s) {missing}; looked in {where}; found {found}. "
        f"A training split needs {MSRVTT_DATA} and {train_name}; for the 1k-A test split alone "
        f"give only {MSRVTT_TEST}{hint}"
    )


def _msrvtt_captions(path: Path) -> dict[str, list[str]]:
    data = load_json(path)
    sentences = _need_list(_need(data, "sentences", path, "top level"), path, "'sentences'")
    captions: dict[str, list[str]] = {}
    for i, item in enumerate(sentences):
        video = _need(item, "video_id", path, f"sentences[{i}]")
        text = _clean(_need(item, "caption", path, f"sentences[{i}]"))
        if text:
            captions.setdefault(str(video), []).append(text)
    return captions


def _msrvtt_test(path: Path, out: Collected) -> None:
    for line, row in _read_csv_columns(path, ["video_id", "sentence"]):
        video, text = (row["video_id"] or "").strip(), _clean(row["sentence"] or "")
        if not video or not text:
            out.skipped.append(Skipped(str(path), line, "empty video_id or sentence"))
            continue
        out.records.append(Record(video, text, "test", str(path), line))


def _count_notes(records: list[Record], expected: dict[str, int]) -> list[str]:
    notes = []
    for split, n in expected.items():
        got = len({r.video for r in records if r.split == split})
        if got != n:
            notes.append(f"WARNING: {split} has {got} videos; the standard split has {n}")
    return notes


# ---------------------------------------------------------------------------------------------
# MSVD


MSVD_XPOOL = "captions_msvd.json"  # X-Pool: {video id: [caption, ...]}
MSVD_PICKLE = "raw-captions.pkl"  # CLIP4Clip: {video id: [[token, ...], ...]}
MSVD_TEXT = "AllVideoDescriptions.txt"  # the text release: lines "videoid caption"
MSVD_CAPTION_FILES = (MSVD_XPOOL, MSVD_PICKLE, MSVD_TEXT)  # the first found is read
MSVD_LISTS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
MSVD_STANDARD = {"train": 1200, "val": 100, "test": 670}
MSVD_PUBLISHER = {MSVD_XPOOL: "X-Pool", MSVD_PICKLE: "CLIP4Clip", MSVD_TEXT: "text release"}


def read_msvd(annotations: list[Path] | Path) -> Collected:
    """Every caption of every video in the 1200/100/670 lists (multi-caption protocol).

    Captions from X-Pool's `captions_msvd.json`, CLIP4Clip's `raw-captions.pkl` (token lists,
    joined with spaces; read without running code) or `AllVideoDescriptions.txt`, whichever
    is there; `train_list.txt` and `test_list.txt` are required, `val_list.txt` optional.
    """
    required = [MSVD_LISTS["train"], MSVD_LISTS["test"]]
    files = locate(annotations, required, [MSVD_LISTS["val"], *MSVD_CAPTION_FILES])
    caption_file = _msvd_caption_file(annotations, files)
    out = Collected()
    readers = {MSVD_XPOOL: _msvd_json_captions, MSVD_PICKLE: _msvd_pickle_captions}
    captions = readers.get(caption_file.name, _msvd_captions)(caption_file, out)
    out.notes.append(f"captions from {caption_file.name} ({MSVD_PUBLISHER[caption_file.name]})")
    if caption_file.name == MSVD_PICKLE:
        out.notes.append("token lists joined with spaces, as CLIP4Clip does")
    ignored = [n for n in MSVD_CAPTION_FILES if n in files and files[n] != caption_file]
    if ignored:
        out.notes.append(
            f"also found {ignored}, not read; pass the caption file you want explicitly"
        )
    for split, name in MSVD_LISTS.items():
        if name not in files:
            out.notes.append(f"WARNING: no {name}, so val is empty (X-Pool reads no val list)")
            continue
        _msvd_split(files[name], split, captions, caption_file.name, out)
    out.notes.append("every caption is a query (multi-caption protocol)")
    sizes = [len({r.video for r in out.records if r.split == s}) for s in MSVD_LISTS]
    standard = "/".join(str(n) for n in MSVD_STANDARD.values())
    out.notes.append(
        "split sizes (videos) train/val/test: " + "/".join(map(str, sizes))
        + f" (the standard split is {standard})"
    )
    present = {s: n for s, n in MSVD_STANDARD.items() if MSVD_LISTS[s] in files}
    out.notes.extend(_count_notes(out.records, present))
    return out


def _msvd_caption_file(annotations: list[Path] | Path, files: dict[str, Path]) -> Path:
    """The caption file given explicitly, else the first of MSVD_CAPTION_FILES found."""
    explicit = [p for p in _as_paths(annotations) if p.name in MSVD_CAPTION_FILES]
    if len(explicit) > 1:
        names = [p.name for p in explicit]
        raise AnnotationError(f"msvd: several caption files given {names}; give one")
    if explicit:
        return explicit[0]
    for name in MSVD_CAPTION_FILES:
        if name in files:
            return files[name]
    where = ", ".join(str(p) for p in _as_paths(annotations))
    raise AnnotationError(
        f"msvd: no caption file in {where}; expected one of {list(MSVD_CAPTION_FILES)} "
        "(X-Pool, CLIP4Clip, text release) beside the list files"
    )


def _msvd_split(
    path: Path, split: str, captions: dict[str, list[str]], source: str, out: Collected
) -> None:
    unknown = []
    for line, video in _id_lines(path):
        if video not in captions:
            unknown.append(video)
            why = f"video {video!r} has no captions in {source}"
            out.skipped.append(Skipped(str(path), line, why))
            continue
        out.records.extend(Record(video, c, split, str(path), line) for c in captions[video])
    if unknown:
        out.notes.append(
            f"WARNING: {len(unknown)} video(s) listed in {path.name} have no captions in "
            f"{source} and were skipped, e.g. {unknown[:5]}"
        )


def _msvd_captions(path: Path, out: Collected) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    for line, raw in enumerate(_read_text(path).splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split(maxsplit=1)
        if len(parts) < 2:
            out.skipped.append(Skipped(str(path), line, "a video id without a caption"))
            continue
        captions.setdefault(parts[0], []).append(_clean(parts[1]))
    return captions


def _msvd_json_captions(path: Path, out: Collected) -> dict[str, list[str]]:
    """X-Pool's captions_msvd.json: an object mapping each video id to a list of captions."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(
            f"{path}: top level: expected an object mapping video id to a list of captions, "
            f"got {type(data).__name__}"
        )
    captions: dict[str, list[str]] = {}
    for video, items in data.items():
        where = f"video {video!r}"
        for k, text in enumerate(_need_list(items, path, where)):
            if not isinstance(text, str):
                raise AnnotationError(
                    f"{path}: {where} caption {k}: expected a string, got {type(text).__name__}"
                )
            _add_caption(captions, str(video), _clean(text), path, f"{where} caption {k}", out)
    return captions


def _msvd_pickle_captions(path: Path, out: Collected) -> dict[str, list[str]]:
    """CLIP4Clip's raw-captions.pkl: {video id: [[token, ...], ...]}, tokens joined by spaces."""
    data = load_plain_pickle(path)
    if not isinstance(data, dict):
        raise AnnotationError(
            f"{path}: top level: expected a dict of video id -> list of token lists, "
            f"got {type(data).__name__}"
        )
    captions: dict[str, list[str]] = {}
    for video, items in data.items():
        if not isinstance(video, str):
            raise AnnotationError(f"{path}: key {video!r}: expected a video id string")
        where = f"video {video!r}"
        if not isinstance(items, (list, tuple)):
            raise AnnotationError(
                f"{path}: {where}: expected a list of captions, got {type(items).__name__}"
            )
        for k, cap in enumerate(items):
            text = _joined_tokens(cap, path, f"{where} caption {k}")
            _add_caption(captions, video, text, path, f"{where} caption {k}", out)
    return captions


def _joined_tokens(cap: Any, path: Path, where: str) -> str:
    # CLIP4Clip: " ".join(cap). A caption already joined into one string is taken as it is.
    if isinstance(cap, str):
        return _clean(cap)
    if not isinstance(cap, (list, tuple)):
        raise AnnotationError(
            f"{path}: {where}: expected a list of tokens, got {type(cap).__name__}"
        )
    bad = next((t for t in cap if not _is_plain_token(t)), None)
    if bad is not None:
        raise AnnotationError(
            f"{path}: {where}: expected string tokens, got {type(bad).__name__}"
        )
    return _clean(" ".join(str(t) for t in cap))


def _is_plain_token(token: Any) -> bool:
    return isinstance(token, str) or (
        isinstance(token, (int, float)) and not isinstance(token, bool)
    )


def _add_caption(
    captions: dict[str, list[str]], video: str, text: str, path: Path, where: str, out: Collected
) -> None:
    if text:
        captions.setdefault(video, []).append(text)
    else:
        out.skipped.append(Skipped(str(path), None, f"{where}: empty caption"))


def _id_lines(path: Path) -> list[tuple[int, str]]:
    lines = enumerate(_read_text(path).splitlines(), start=1)
    kept = [(n, t.strip()) for n, t in lines if t.strip() and not t.startswith("#")]
    return [(n, _strip_video_suffix(t)) for n, t in kept]


# ---------------------------------------------------------------------------------------------
# Pickles without code


class _GlobalRefused(pickle.UnpicklingError):
    pass


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: every global (class, function) is refused, so nothing runs.

    Dicts, lists, tuples, strings, bytes, numbers, booleans and None have their own opcodes;
    anything else (an object, a function call via REDUCE) needs a global and stops here.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise _GlobalRefused(f"it names the global {module}.{name} (a class or function)")

    def persistent_load(self, pid: Any) -> Any:
        raise _GlobalRefused(f"it holds the persistent id {pid!r}")


def load_plain_pickle(path: Path) -> Any:
    """Read a pickle that may hold only plain data; anything that would run code is refused."""
    try:
        with path.open("rb") as f:
            # encoding: Python 2 `str` objects, if the file was written by Python 2.
            return _PlainUnpickler(f, encoding="utf-8").load()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except _GlobalRefused as e:
        raise AnnotationError(
            f"{path}: refused to unpickle: {e}, and loading that could run code; "
            f"{path.name} may hold only dicts, lists, tuples, strings and numbers"
        ) from None
    except Exception as e:  # a truncated or foreign file: UnpicklingError, EOFError, ...
        raise AnnotationError(
            f"{path}: not a readable pickle ({type(e).__name__}: {e})"
        ) from None


# ---------------------------------------------------------------------------------------------
# DiDeMo


DIDEMO_FILES = {"train": "train_data.json", "val": "val_data.json", "test": "test_data.json"}


def read_didemo(annotations: list[Path] | Path) -> Collected:
    """Paragraph-to-video: a video's descriptions, ordered by their first time span, joined."""
    files = locate(annotations, list(DIDEMO_FILES.values()))
    out = Collected()
    for split, name in DIDEMO_FILES.items():
        for video, paragraph in _didemo_paragraphs(files[name], out):
            out.records.append(Record(video, paragraph, split, str(files[name])))
    out.notes.append("paragraph-to-video: one caption per video, descriptions joined by start time")
    return out


def _didemo_paragraphs(path: Path, out: Collected) -> list[tuple[str, str]]:
    items = _need_list(load_json(path), path, "top level")
    moments: dict[str, list[tuple[tuple[float, float], int, str]]] = {}
    for i, item in enumerate(items):
        where = f"item {i}"
        video = _strip_video_suffix(str(_need(item, "video", path, where)))
        text = _clean(_need(item, "description", path, where))
        times = _need_list_field(item, "times", path, where)
        if not times or not isinstance(times[0], list) or len(times[0]) < 2:
            raise AnnotationError(f"{path}: {where}: field 'times' must hold [start, end] pairs")
        if not text:
            why = f"{where} (video {video}): empty description"
            out.skipped.append(Skipped(str(path), None, why))
            continue
        # Annotators disagree on spans; the first listed span orders the moments, and the
        # file order breaks ties so the result does not depend on a sort's whims.
        moments.setdefault(video, []).append(((times[0][0], times[0][1]), i, text))
    return [(v, " ".join(t for _, _, t in sorted(m))) for v, m in moments.items()]


# ---------------------------------------------------------------------------------------------
# ActivityNet Captions


ACTIVITYNET_FILES = {"train": "train.json", "test": "val_1.json"}


def read_activitynet(annotations: list[Path] | Path) -> Collected:
    """Paragraph-to-video on train / val_1 (val_1 is the test split, as in CLIP4Clip)."""
    files = locate(annotations, list(ACTIVITYNET_FILES.values()))
    out = Collected()
    for split, name in ACTIVITYNET_FILES.items():
        for video, paragraph in _activitynet_paragraphs(files[name], out):
            out.records.append(Record(video, paragraph, split, str(files[name])))
    out.notes.append("paragraph-to-video: a video's sentences joined in time order")
    out.notes.append("val_1.json is the test split (CLIP4Clip convention); val is empty")
    return out


def _activitynet_paragraphs(path: Path, out: Collected) -> list[tuple[str, str]]:
    data = load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: top level: expected an object keyed by video id")
    paragraphs = []
    for video, item in data.items():
        sentences = _need_list_field(item, "sentences", path, f"video {video}")
        order = _activitynet_order(item, len(sentences), path, video)
        text = " ".join(_clean(sentences[k]) for k in order if _clean(sentences[k]))
        if not text:
            out.skipped.append(Skipped(str(path), None, f"video {video}: no non-empty sentence"))
            continue
        paragraphs.append((video, text))
    return paragraphs


def _activitynet_order(item: dict, n: int, path: Path, video: str) -> list[int]:
    stamps = item.get("timestamps")
    if stamps is None:
        return list(range(n))
    well_formed = isinstance(stamps, list) and all(isinstance(t, list) and t for t in stamps)
    if not well_formed or len(stamps) != n:
        raise AnnotationError(
            f"{path}: video {video}: field 'timestamps' must hold one [start, end] per sentence"
        )
    # The published files are already in time order; sorting only guards against edits.
    return sorted(range(n), key=lambda k: (stamps[k][0], k))


# ---------------------------------------------------------------------------------------------
# LSMDC


LSMDC_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",  # sic: the published name
}


def read_lsmdc(annotations: list[Path] | Path) -> Collected:
    """Tab-separated clip lists: column 0 the clip id, the last column the sentence."""
    files = locate(annotations, list(LSMDC_FILES.values()))
    out = Collected()
    for split, name in LSMDC_FILES.items():
        _lsmdc_rows(files[name], split, out)
    out.notes.append("LSMDC: training / val / the 1000-clip public test, one sentence per clip")
    return out


def _lsmdc_rows(path: Path, split: str, out: Collected) -> None:
    for line, raw in enumerate(_read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        fields = raw.split("\t")
        # Sentences contain quotes and commas, so the lines are split on tabs alone.
        if len(fields) < 2 or not fields[0].strip() or not _clean(fields[-1]):
            why = "expected a clip id and a sentence separated by tabs"
            out.skipped.append(Skipped(str(path), line, why))
            continue
        out.records.append(Record(fields[0].strip(), _clean(fields[-1]), split, str(path), line))


# ---------------------------------------------------------------------------------------------
# VATEX


VATEX_TRAIN = "vatex_training_v1.0.json"
VATEX_VAL = "vatex_validation_v1.0.json"
VATEX_TESTS = ("vatex_public_test_english_v1.1.json", "vatex_public_test_english_v1.0.json")


def read_vatex(annotations: list[Path] | Path) -> Collected:
    """English captions; validation is the test split unless a public test with enCap is given."""
    files = locate(annotations, [VATEX_TRAIN, VATEX_VAL], VATEX_TESTS)
    out = Collected()
    test_file = next((files[n] for n in VATEX_TESTS if n in files), None)
    test_items = _vatex_items(test_file) if test_file else []
    has_test = bool(test_items) and any("enCap" in item for item in test_items)
    _vatex_split(files[VATEX_TRAIN], "train", out)
    _vatex_split(files[VATEX_VAL], "val" if has_test else "test", out)
    if has_test:
        _vatex_split(test_file, "test", out)
        out.notes.append(f"test is {test_file.name}; validation is val")
    else:
        out.notes.append("validation is the test split (no public test file with enCap); val empty")
    out.notes.append("English captions only (enCap); every caption is a query")
    return out


def _vatex_items(path: Path) -> list:
    return _need_list(load_json(path), path, "top level")


def _vatex_split(path: Path, split: str, out: Collected) -> None:
    for i, item in enumerate(_vatex_items(path)):
        video = str(_need(item, "videoID", path, f"item {i}"))
        captions = _need_list_field(item, "enCap", path, f"item {i}")
        texts = [_clean(c) for c in captions if _clean(c)]
        if not texts:
            why = f"item {i} (video {video}): no English caption"
            out.skipped.append(Skipped(str(path), None, why))
        out.records.extend(Record(video, t, split, str(path)) for t in texts)


# ---------------------------------------------------------------------------------------------
# Generic: a folder of videos plus captions.csv or captions.jsonl


GENERIC_NAMES = ("captions.jsonl", "captions.csv")


def read_generic(annotations: list[Path] | Path, videos_dir: Path | None = None) -> Collected:
    """Rows {video, caption, split?}; bad rows are skipped and reported with their line."""
    path = _generic_file(annotations)
    out = Collected(videos_dir=Path(videos_dir) if videos_dir else path.parent)
    for line, row in _generic_rows(path, out):
        record = _generic_record(row, path, line, out)
        if record is not None:
            out.records.append(record)
    out.notes.append("rows without a split are training rows")
    return out


def _generic_file(annotations: list[Path] | Path) -> Path:
    paths = _as_paths(annotations)
    files = [p for p in paths if p.is_file()]
    if len(files) == 1 and files[0].suffix in (".csv", ".jsonl"):
        return files[0]
    found = [d / n for d in paths if d.is_dir() for n in GENERIC_NAMES if (d / n).is_file()]
    if len(found) == 1:
        return found[0]
    what = "several caption files" if found else "no caption file"
    raise AnnotationError(
        f"generic: {what} in {[str(p) for p in paths]}; give one .csv or .jsonl file, "
        f"or a folder holding exactly one of {list(GENERIC_NAMES)}"
    )


def _generic_rows(path: Path, out: Collected) -> list[tuple[int, dict]]:
    """The rows `extract` would read from this file (pipeline.captions.read_rows); bad ones are skipped."""
    rows = []
    for line, row in read_rows(path):
        if isinstance(row, str):  # read_rows reports a bad row (or CSV header) as text
            if row.startswith("header lacks"):  # no row can be read: the file as a whole is wrong
                raise AnnotationError(f"{path}: {row}")
            out.skipped.append(Skipped(str(path), line, row))
        else:
            rows.append((line, row))
    return rows


def _generic_record(row: dict, path: Path, line: int, out: Collected) -> Record | None:
    missing = [k for k in ("video", "caption") if row.get(k) is None]
    video, caption = str(row.get("video") or "").strip(), _clean(row.get("caption") or "")
    split = str(row.get("split") or "train").strip().lower()
    reason = (
        f"missing field(s) {missing}" if missing
        else "empty video" if not video
        else "empty caption" if not caption
        else f"unknown split {split!r} (expected one of {list(SPLITS)})" if split not in SPLITS
        else None
    )  # fmt: skip
    if reason:
        out.skipped.append(Skipped(str(path), line, reason))
        return None
    return Record(video, caption, split, str(path), line)


# ---------------------------------------------------------------------------------------------
# Matching captions to video files


def _keep_present_videos(c: Collected, videos_dir: Path) -> None:
    if not videos_dir.is_dir():
        raise AnnotationError(f"videos folder {videos_dir} does not exist")
    # the index `extract` matches captions with: the same extensions, paths, stems and bare ids
    index = VideoIndex(videos_dir, find_videos(videos_dir))
    kept, missing = [], {}
    for r in c.records:
        rel, why = index.resolve(r.video)
        if rel is None:
            # One entry per source row: a missing video with 20 captions is one problem.
            missing.setdefault(Skipped(r.file, r.line, why), None)
        else:
            kept.append(Record(rel, r.caption, r.split, r.file, r.line))
    c.records = kept
    c.skipped.extend(missing)


# ---------------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[..., Collected]] = {
    "msrvtt": read_msrvtt,
    "msvd": read_msvd,
    "didemo": read_didemo,
    "activitynet": read_activitynet,
    "lsmdc": read_lsmdc,
    "vatex": read_vatex,
    "generic": read_generic,
}
