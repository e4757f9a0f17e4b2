"""Adapters: tiny annotation files in each published format -> the captions JSONL."""
from __future__ import annotations

import csv
import json
import os
import pickle
import shlex
from pathlib import Path

import pytest

from corpora.adapters import DATASETS, AnnotationError, prepare

from tests.conftest import run_cli


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def counts(report, split: str) -> tuple[int, int]:
    return report.splits[split]["videos"], report.splits[split]["captions"]


# --- MSR-VTT ---------------------------------------------------------------------------------


@pytest.fixture
def msrvtt_dir(tmp_path: Path) -> Path:
    d = tmp_path / "msrvtt"
    d.mkdir()
    videos = [f"video{i}" for i in range(6)]
    sentences = [
        {"video_id": v, "caption": f"caption {k} of {v}", "sen_id": 20 * i + k}
        for i, v in enumerate(videos)
        for k in range(20)
    ]
    data = {"videos": [{"video_id": v} for v in videos], "sentences": sentences}
    write_json(d / "MSRVTT_data.json", data)
    write_csv(d / "MSRVTT_train.9k.csv", ["video_id"], [[v] for v in videos[:4]])
    write_csv(d / "MSRVTT_train.7k.csv", ["video_id"], [["video0"], ["video1"]])
    write_csv(
        d / "MSRVTT_JSFUSION_test.csv",
        ["key", "vid_key", "video_id", "sentence"],
        [["ret0", "msr4", "video4", "a man sings"], ["ret1", "msr5", "video5", "a dog runs"]],
    )
    return d


def test_msrvtt_9k_and_1k_a(msrvtt_dir: Path, tmp_path: Path) -> None:
    report = prepare("msrvtt", msrvtt_dir, tmp_path / "out")
    assert counts(report, "train") == (4, 80)
    assert counts(report, "test") == (2, 2)
    assert counts(report, "val") == (0, 0)
    rows = read_jsonl(tmp_path / "out" / "captions.jsonl")
    assert {"video": "video4", "caption": "a man sings", "split": "test"} in rows
    assert any("val is empty" in n for n in report.notes)
    assert (tmp_path / "out" / "captions.prepare.json").is_file()


def test_msrvtt_7k_with_explicit_files(msrvtt_dir: Path, tmp_path: Path) -> None:
    names = ("MSRVTT_data.json", "MSRVTT_train.7k.csv", "MSRVTT_JSFUSION_test.csv")
    files = [msrvtt_dir / n for n in names]
    report = prepare("msrvtt", files, tmp_path / "x.jsonl", train_split="7k")
    assert counts(report, "train") == (2, 40)
    assert report.path == tmp_path / "x.jsonl"


def test_missing_file_names_the_file(msrvtt_dir: Path, tmp_path: Path) -> None:
    (msrvtt_dir / "MSRVTT_JSFUSION_test.csv").unlink()
    with pytest.raises(AnnotationError, match="MSRVTT_JSFUSION_test.csv"):
        prepare("msrvtt", msrvtt_dir, tmp_path / "out")
    assert not (tmp_path / "out" / "captions.jsonl").exists()


def test_malformed_json_names_the_file(msrvtt_dir: Path, tmp_path: Path) -> None:
    (msrvtt_dir / "MSRVTT_data.json").write_text('{"sentences": [')
    with pytest.raises(AnnotationError, match=r"MSRVTT_data\.json.*not valid JSON"):
        prepare("msrvtt", msrvtt_dir, tmp_path / "out")


def test_missing_field_names_file_and_field(msrvtt_dir: Path, tmp_path: Path) -> None:
    write_json(msrvtt_dir / "MSRVTT_data.json", {"sentences": [{"video_id": "video0"}]})
    with pytest.raises(AnnotationError, match=r"MSRVTT_data\.json.*sentences\[0\].*'caption'"):
        prepare("msrvtt", msrvtt_dir, tmp_path / "out")


def test_missing_csv_column_names_it(msrvtt_dir: Path, tmp_path: Path) -> None:
    write_csv(msrvtt_dir / "MSRVTT_JSFUSION_test.csv", ["key", "video_id"], [["ret0", "video4"]])
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test\.csv.*'sentence'"):
        prepare("msrvtt", msrvtt_dir, tmp_path / "out")


def jsfusion_rows(n: int) -> list[list[str]]:
    # As published: key, vid_key, video_id, sentence (e.g. "ret0,msr9770,video9770,a person ...").
    return [[f"ret{i}", f"msr{7010 + i}", f"video{7010 + i}", f"a person does thing {i}"]
            for i in range(n)]


def test_msrvtt_jsfusion_csv_alone_is_test_only(tmp_path: Path) -> None:
    d = tmp_path / "msrvtt_data"
    d.mkdir()
    rows = jsfusion_rows(1000)
    rows[1][3] = "a man, smiling, sings"  # quoted by the csv writer, as pandas reads it
    write_csv(d / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"], rows)
    report = prepare("msrvtt", d, tmp_path / "zs.jsonl")
    assert counts(report, "test") == (1000, 1000)
    assert counts(report, "train") == (0, 0) and counts(report, "val") == (0, 0)
    assert any("no training split" in n and "zero-shot" in n for n in report.notes)
    assert not any(n.startswith("WARNING") for n in report.notes)
    out = read_jsonl(report.path)
    assert out[1] == {"video": "video7011", "caption": "a man, smiling, sings", "split": "test"}


def test_msrvtt_json_without_training_list_names_it(msrvtt_dir: Path, tmp_path: Path) -> None:
    (msrvtt_dir / "MSRVTT_train.9k.csv").unlink()
    with pytest.raises(AnnotationError, match=r"MSRVTT_train\.9k\.csv.*train_split='7k'"):
        prepare("msrvtt", msrvtt_dir, tmp_path / "out")
    (msrvtt_dir / "MSRVTT_data.json").unlink()  # a training list without the captions
    with pytest.raises(AnnotationError, match=r"missing.*MSRVTT_data\.json"):
        prepare("msrvtt", msrvtt_dir, tmp_path / "out", train_split="7k")


def test_unknown_option_and_dataset(msrvtt_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train_split"):
        prepare("msrvtt", msrvtt_dir, tmp_path / "out", split="9k")
    with pytest.raises(ValueError, match="msrvtt"):
        prepare("youtube", msrvtt_dir, tmp_path / "out")


# --- MSVD ------------------------------------------------------------------------------------


def test_msvd_all_captions_per_split(tmp_path: Path) -> None:
    lines = [
        "# MSVD descriptions",
        "vidA_1_5 a cat plays",
        "vidA_1_5 a kitten plays",
        "vidB_2_9 a man cooks",
        "vidC_0_4 a car drives",
        "vidC_0_4 a red car",
        "vidC_0_4 traffic",
        "vidD_3_8",
    ]
    (tmp_path / "AllVideoDescriptions.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "train_list.txt").write_text("vidA_1_5\nvidD_3_8\n")
    (tmp_path / "val_list.txt").write_text("vidB_2_9\n")
    (tmp_path / "test_list.txt").write_text("vidC_0_4\n")
    report = prepare("msvd", tmp_path, tmp_path / "out")
    assert counts(report, "train") == (1, 2)
    assert counts(report, "val") == (1, 1)
    assert counts(report, "test") == (1, 3)
    reasons = [(Path(s.file).name, s.line) for s in report.skipped]
    assert ("AllVideoDescriptions.txt", 8) in reasons  # the id without a caption
    assert ("train_list.txt", 2) in reasons  # the listed video with no caption


MSVD_LIST_NAMES = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}


def write_msvd_lists(d: Path, splits: dict[str, list[str]]) -> None:
    # One video id per line, as CLIP4Clip and X-Pool publish them.
    for split, videos in splits.items():
        (d / MSVD_LIST_NAMES[split]).write_text("".join(v + "\n" for v in videos))


MSVD_SMALL = {
    "train": ["-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208"],
    "val": ["bQJQGoJF7_k_145_153"],
    "test": ["zv2RIbUsnSw_159_167"],
}


def xpool_captions() -> dict[str, list[str]]:
    # X-Pool's captions_msvd.json: video id -> list of caption strings.
    return {
        "-4wsuPCjDBc_5_15": ["a squirrel is eating a peanut in it s shell", "a chipmunk is eating"],
        "-7KMZQEsJW4_205_208": ["a man rubs a sunflower"],
        "bQJQGoJF7_k_145_153": ["a  woman   is slicing"],  # spacing as in the file
        "zv2RIbUsnSw_159_167": ["a dog runs", "a puppy runs", "a dog is running"],
        "not_in_any_list_0_1": ["ignored"],
    }


def clip4clip_captions() -> dict[str, list[list[str]]]:
    # CLIP4Clip's raw-captions.pkl: video id -> list of captions, each a list of tokens.
    return {v: [c.split() for c in caps] for v, caps in xpool_captions().items()}


def evil_payload(marker: Path) -> bytes:
    """A raw-captions.pkl look-alike whose unpickling runs a shell command that creates marker."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(marker))}",))

    return pickle.dumps({"-4wsuPCjDBc_5_15": [Payload()]}, protocol=2)


def test_msvd_xpool_json_and_lists(tmp_path: Path) -> None:
    write_json(tmp_path / "captions_msvd.json", xpool_captions())
    write_msvd_lists(tmp_path, MSVD_SMALL)
    report = prepare("msvd", tmp_path, tmp_path / "out")
    assert counts(report, "train") == (2, 3)
    assert counts(report, "val") == (1, 1) and counts(report, "test") == (1, 3)
    rows = read_jsonl(report.path)
    assert {"video": "bQJQGoJF7_k_145_153", "caption": "a woman is slicing", "split": "val"} in rows
    assert any("captions_msvd.json (X-Pool)" in n for n in report.notes)
    assert any("train/val/test: 2/1/1 (the standard split is 1200/100/670)" in n
               for n in report.notes)
    assert report.skipped == []


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_msvd_clip4clip_pickle_and_lists(tmp_path: Path, protocol: int) -> None:
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps(clip4clip_captions(), protocol))
    write_msvd_lists(tmp_path, MSVD_SMALL)
    report = prepare("msvd", tmp_path, tmp_path / "out")
    assert counts(report, "train") == (2, 3)
    assert counts(report, "val") == (1, 1) and counts(report, "test") == (1, 3)
    rows = read_jsonl(report.path)
    caption = "a squirrel is eating a peanut in it s shell"  # tokens joined with spaces
    assert rows[0] == {"video": "-4wsuPCjDBc_5_15", "caption": caption, "split": "train"}
    assert any("raw-captions.pkl (CLIP4Clip)" in n for n in report.notes)


def test_msvd_pickle_written_by_python2(tmp_path: Path) -> None:
    # Protocol 2 as Python 2 writes str (SHORT_BINSTRING, UTF-8 bytes): {'vid': [['\xe9', 'cat']]}
    data = b"\x80\x02}q\x00U\x03vidq\x01]q\x02]q\x03(U\x02\xc3\xa9q\x04U\x03catq\x05eas."
    (tmp_path / "raw-captions.pkl").write_bytes(data)
    write_msvd_lists(tmp_path, {"train": ["vid"], "val": [], "test": ["vid"]})
    report = prepare("msvd", tmp_path, tmp_path / "out")
    assert read_jsonl(report.path)[0] == {"video": "vid", "caption": "\u00e9 cat", "split": "train"}


def test_msvd_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    control = tmp_path / "CONTROL_PWNED"
    pickle.loads(evil_payload(control))  # the payload is live: a plain pickle.load runs it
    assert control.exists()
    marker = tmp_path / "PWNED"
    (tmp_path / "raw-captions.pkl").write_bytes(evil_payload(marker))
    write_msvd_lists(tmp_path, MSVD_SMALL)
    with pytest.raises(AnnotationError, match=r"raw-captions\.pkl: refused to unpickle.*system"):
        prepare("msvd", tmp_path, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out" / "captions.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (pickle.dumps({"v": [{"a", "set"}]}, protocol=4), "expected a list of tokens, got set"),
        (pickle.dumps({"v": [[b"bytes"]]}, protocol=3), "expected string tokens, got bytes"),
        (pickle.dumps([["a", "list"]]), "expected a dict of video id"),
        (pickle.dumps({"v": "a caption"}), "expected a list of captions, got str"),
        (b"not a pickle", "not a readable pickle"),
        (pickle.dumps({"v": [["a"]]})[:-5], "not a readable pickle"),  # truncated
    ],
)
def test_msvd_pickle_not_plain_captions(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "raw-captions.pkl").write_bytes(content)
    write_msvd_lists(tmp_path, {"train": ["v"], "val": [], "test": ["v"]})
    with pytest.raises(AnnotationError, match=r"raw-captions\.pkl.*" + message):
        prepare("msvd", tmp_path, tmp_path / "out")


def test_msvd_standard_split_sizes(tmp_path: Path) -> None:
    sizes = {"train": 1200, "val": 100, "test": 670}
    splits = {s: [f"vid{s}{i}_0_{i}" for i in range(n)] for s, n in sizes.items()}
    captions = {v: [f"caption of {v}", f"another of {v}"] for vs in splits.values() for v in vs}
    write_json(tmp_path / "captions_msvd.json", captions)
    write_msvd_lists(tmp_path, splits)
    report = prepare("msvd", tmp_path, tmp_path / "out")
    assert [counts(report, s) for s in sizes] == [(1200, 2400), (100, 200), (670, 1340)]
    assert any("train/val/test: 1200/100/670" in n for n in report.notes)
    assert not any(n.startswith("WARNING") for n in report.notes)


def test_msvd_missing_list_file_names_it(tmp_path: Path) -> None:
    write_json(tmp_path / "captions_msvd.json", xpool_captions())
    write_msvd_lists(tmp_path, {"train": MSVD_SMALL["train"], "val": MSVD_SMALL["val"]})
    with pytest.raises(AnnotationError, match=r"missing annotation file\(s\) \['test_list\.txt'\]"):
        prepare("msvd", tmp_path, tmp_path / "out")


def test_msvd_without_val_list_has_empty_val(tmp_path: Path) -> None:
    write_json(tmp_path / "captions_msvd.json", xpool_captions())
    write_msvd_lists(tmp_path, {"train": MSVD_SMALL["train"], "test": MSVD_SMALL["test"]})
    report = prepare("msvd", tmp_path, tmp_path / "out")
    assert counts(report, "val") == (0, 0) and counts(report, "test") == (1, 3)
    assert any("no val_list.txt" in n for n in report.notes)


def test_msvd_no_caption_file_lists_accepted_names(tmp_path: Path) -> None:
    write_msvd_lists(tmp_path, MSVD_SMALL)
    with pytest.raises(AnnotationError, match=r"captions_msvd\.json.*raw-captions\.pkl"):
        prepare("msvd", tmp_path, tmp_path / "out")


def test_msvd_listed_video_without_captions(tmp_path: Path) -> None:
    write_json(tmp_path / "captions_msvd.json", xpool_captions())
    write_msvd_lists(tmp_path, {**MSVD_SMALL, "test": ["zv2RIbUsnSw_159_167", "missing_1_2"]})
    report = prepare("msvd", tmp_path, tmp_path / "out")
    assert counts(report, "test") == (1, 3)
    assert [(Path(s.file).name, s.line) for s in report.skipped] == [("test_list.txt", 2)]
    assert "no captions in captions_msvd.json" in report.skipped[0].reason
    assert any(n.startswith("WARNING: 1 video(s) listed in test_list.txt") for n in report.notes)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"-4wsuPCjDBc_5_15": ["a cat",', "not valid JSON at line 1"),
        ('[["-4wsuPCjDBc_5_15", "a cat"]]', "expected an object mapping video id"),
        ('{"-4wsuPCjDBc_5_15": "a cat"}', "video '-4wsuPCjDBc_5_15'.*expected a list"),
        ('{"-4wsuPCjDBc_5_15": ["a cat", 7]}', "caption 1: expected a string, got int"),
    ],
)
def test_msvd_malformed_xpool_json(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "captions_msvd.json").write_text(text)
    write_msvd_lists(tmp_path, MSVD_SMALL)
    with pytest.raises(AnnotationError, match=r"captions_msvd\.json.*" + message):
        prepare("msvd", tmp_path, tmp_path / "out")


def test_msvd_several_caption_files(tmp_path: Path) -> None:
    write_json(tmp_path / "captions_msvd.json", xpool_captions())
    captions = {"-4wsuPCjDBc_5_15": [["pickled", "caption"]], "zv2RIbUsnSw_159_167": [["x"]]}
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps(captions))
    write_msvd_lists(tmp_path, {"train": ["-4wsuPCjDBc_5_15"], "test": ["zv2RIbUsnSw_159_167"]})
    report = prepare("msvd", tmp_path, tmp_path / "a.jsonl")  # the folder: X-Pool's json first
    assert counts(report, "train") == (1, 2)
    assert any("also found ['raw-captions.pkl'], not read" in n for n in report.notes)
    chosen = [tmp_path / "raw-captions.pkl", tmp_path]  # an explicit file wins
    report = prepare("msvd", chosen, tmp_path / "b.jsonl")
    assert read_jsonl(report.path)[0]["caption"] == "pickled caption"


def test_msvd_cli_clip4clip_and_refused_pickle(tmp_path: Path) -> None:
    d = tmp_path / "msvd_data"
    d.mkdir()
    (d / "raw-captions.pkl").write_bytes(pickle.dumps(clip4clip_captions()))
    write_msvd_lists(d, MSVD_SMALL)
    out = tmp_path / "captions.jsonl"
    res = run_cli("prepare", "msvd", str(d), "--out", str(out), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "train/val/test: 2/1/1" in res.stdout and f"wrote {out}" in res.stdout
    assert len(read_jsonl(out)) == 7
    marker = tmp_path / "PWNED"
    (d / "raw-captions.pkl").write_bytes(evil_payload(marker))
    res = run_cli("prepare", "msvd", str(d), "--out", str(tmp_path / "evil.jsonl"), timeout=120)
    assert res.returncode == 2
    assert "raw-captions.pkl: refused to unpickle" in res.stderr
    assert not marker.exists() and not (tmp_path / "evil.jsonl").exists()


# --- DiDeMo ----------------------------------------------------------------------------------


def test_didemo_paragraph_in_time_order(tmp_path: Path) -> None:
    train = [
        {"video": "a@N0_1_x.mp4", "description": "the dog jumps", "times": [[3, 3], [2, 3]]},
        {"video": "a@N0_1_x.mp4", "description": "a dog appears", "times": [[0, 1], [0, 0]]},
        {"video": "b@N0_2_y.mp4", "description": "rain falls", "times": [[1, 2]]},
    ]
    write_json(tmp_path / "train_data.json", train)
    val = [{"video": "c.mov", "description": "x", "times": [[0, 0]]}]
    write_json(tmp_path / "val_data.json", val)
    write_json(tmp_path / "test_data.json", [{"video": "d", "description": "y", "times": [[0, 0]]}])
    report = prepare("didemo", tmp_path, tmp_path / "out")
    assert counts(report, "train") == (2, 2)
    assert counts(report, "val") == (1, 1) and counts(report, "test") == (1, 1)
    rows = read_jsonl(report.path)
    assert {"video": "a@N0_1_x", "caption": "a dog appears the dog jumps", "split": "train"} in rows


def test_didemo_missing_times_names_field(tmp_path: Path) -> None:
    write_json(tmp_path / "train_data.json", [{"video": "a", "description": "b"}])
    write_json(tmp_path / "val_data.json", [])
    write_json(tmp_path / "test_data.json", [])
    with pytest.raises(AnnotationError, match=r"train_data\.json.*item 0.*'times'"):
        prepare("didemo", tmp_path, tmp_path / "out")


# --- ActivityNet -----------------------------------------------------------------------------


def test_activitynet_paragraphs_and_val1_as_test(tmp_path: Path) -> None:
    train = {
        "v_aaa": {
            "duration": 30.0,
            "timestamps": [[10, 20], [0, 9]],
            "sentences": ["Then he sits.", " A man walks in."],
        },
        "v_bbb": {"duration": 12.0, "timestamps": [[0, 12]], "sentences": ["A woman sings."]},
    }
    val = {"v_ccc": {"duration": 5, "timestamps": [[0, 2], [2, 5]], "sentences": ["One.", "Two."]}}
    write_json(tmp_path / "train.json", train)
    write_json(tmp_path / "val_1.json", val)
    report = prepare("activitynet", tmp_path, tmp_path / "out")
    assert counts(report, "train") == (2, 2)
    assert counts(report, "test") == (1, 1) and counts(report, "val") == (0, 0)
    rows = read_jsonl(report.path)
    assert {"video": "v_aaa", "caption": "A man walks in. Then he sits.", "split": "train"} in rows
    assert any("val_1.json is the test split" in n for n in report.notes)


def test_activitynet_missing_sentences(tmp_path: Path) -> None:
    write_json(tmp_path / "train.json", {"v_a": {"duration": 3.0}})
    write_json(tmp_path / "val_1.json", {})
    with pytest.raises(AnnotationError, match=r"train\.json.*v_a.*'sentences'"):
        prepare("activitynet", tmp_path, tmp_path / "out")


# --- LSMDC -----------------------------------------------------------------------------------


def test_lsmdc_tab_separated(tmp_path: Path) -> None:
    def clip(i: int) -> str:
        return f"0001_Movie_00.00.{i:02d}.000-00.00.{i + 1:02d}.000"

    row = "{}\t00.00.01\t00.00.02\t00.00.01\t00.00.02\tSOMEONE says \"hi\", then leaves."
    def rows(*clips: int) -> str:
        return "".join(row.format(clip(i)) + "\n" for i in clips)

    (tmp_path / "LSMDC16_annos_training.csv").write_text(rows(0, 1, 2) + "broken line\n")
    (tmp_path / "LSMDC16_annos_val.csv").write_text(rows(10))
    (tmp_path / "LSMDC16_challenge_1000_publictect.csv").write_text(rows(20, 21))
    report = prepare("lsmdc", tmp_path, tmp_path / "out")
    assert counts(report, "train") == (3, 3)
    assert counts(report, "val") == (1, 1) and counts(report, "test") == (2, 2)
    skipped = [(Path(s.file).name, s.line) for s in report.skipped]
    assert skipped == [("LSMDC16_annos_training.csv", 4)]
    first = read_jsonl(report.path)[0]
    caption = 'SOMEONE says "hi", then leaves.'
    assert first == {"video": clip(0), "caption": caption, "split": "train"}


# --- VATEX -----------------------------------------------------------------------------------


def vatex_items(prefix: str, n: int) -> list[dict]:
    english = [f"en {k}" for k in range(10)]
    return [
        {"videoID": f"{prefix}{i}_000001_000011", "enCap": english, "chCap": ["zh"] * 10}
        for i in range(n)
    ]


def test_vatex_validation_is_test(tmp_path: Path) -> None:
    write_json(tmp_path / "vatex_training_v1.0.json", vatex_items("t", 3))
    write_json(tmp_path / "vatex_validation_v1.0.json", vatex_items("v", 2))
    report = prepare("vatex", tmp_path, tmp_path / "out")
    assert counts(report, "train") == (3, 30)
    assert counts(report, "test") == (2, 20) and counts(report, "val") == (0, 0)
    assert all(not r["caption"].startswith("zh") for r in read_jsonl(report.path))


def test_vatex_public_test_file(tmp_path: Path) -> None:
    write_json(tmp_path / "vatex_training_v1.0.json", vatex_items("t", 3))
    write_json(tmp_path / "vatex_validation_v1.0.json", vatex_items("v", 2))
    write_json(tmp_path / "vatex_public_test_english_v1.1.json", vatex_items("p", 1))
    report = prepare("vatex", tmp_path, tmp_path / "out")
    assert counts(report, "val") == (2, 20) and counts(report, "test") == (1, 10)


# --- generic ---------------------------------------------------------------------------------


@pytest.fixture
def video_folder(tmp_path: Path) -> Path:
    d = tmp_path / "videos"
    (d / "sub").mkdir(parents=True)
    for name in ("a.mp4", "b.mp4", "sub/c.avi"):
        (d / name).write_bytes(b"")
    return d


def test_generic_jsonl_bad_rows_are_reported(video_folder: Path, tmp_path: Path) -> None:
    lines = [
        json.dumps({"video": "a.mp4", "caption": "a cat", "split": "test"}),
        json.dumps({"video": "b", "caption": "a dog"}),  # stem, default split
        json.dumps({"video": "sub/c", "caption": "   "}),  # empty caption
        json.dumps({"caption": "no video"}),  # missing field
        json.dumps({"video": "zzz", "caption": "unknown"}),  # no such file
        "{not json",
        json.dumps({"video": "c", "caption": "by stem", "split": "val"}),
        json.dumps({"video": "a", "caption": "x", "split": "dev"}),  # unknown split
    ]
    (video_folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    report = prepare("generic", video_folder, tmp_path / "out")
    rows = read_jsonl(report.path)
    assert rows == [
        {"video": "a.mp4", "caption": "a cat", "split": "test"},
        {"video": "b.mp4", "caption": "a dog", "split": "train"},
        {"video": "sub/c.avi", "caption": "by stem", "split": "val"},
    ]
    skipped = {s.line: s.reason for s in report.skipped}
    assert sorted(skipped) == [3, 4, 5, 6, 8]
    assert "empty caption" in skipped[3] and "'video'" in skipped[4]
    assert "unknown video" in skipped[5] and "JSON" in skipped[6] and "dev" in skipped[8]


def test_generic_csv_with_separate_videos_dir(video_folder: Path, tmp_path: Path) -> None:
    rows = [["a", "one"], ["b.mp4", ""], ["q", "two"]]
    captions = write_csv(tmp_path / "caps.csv", ["video", "caption"], rows)
    report = prepare("generic", captions, tmp_path / "g.jsonl", videos_dir=video_folder)
    assert counts(report, "train") == (1, 1)
    assert sorted(s.line for s in report.skipped) == [3, 4]


def test_generic_refuses_to_overwrite_its_input(video_folder: Path) -> None:
    (video_folder / "captions.jsonl").write_text(json.dumps({"video": "a", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="annotation files"):
        prepare("generic", video_folder, video_folder)


def test_generic_all_rows_bad_raises_with_reasons(video_folder: Path, tmp_path: Path) -> None:
    row = {"video": "nope", "caption": "x"}
    (video_folder / "captions.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(AnnotationError, match="unknown video"):
        prepare("generic", video_folder, tmp_path / "out")


def test_benchmark_videos_dir_filters_missing_videos(msrvtt_dir: Path, tmp_path: Path) -> None:
    videos = tmp_path / "mv"
    videos.mkdir()
    for i in (0, 1, 4):
        (videos / f"video{i}.mp4").write_bytes(b"")
    report = prepare("msrvtt", msrvtt_dir, tmp_path / "out", videos_dir=videos)
    assert counts(report, "train") == (2, 40) and counts(report, "test") == (1, 1)
    # One entry per missing training video, not one per caption.
    assert len(report.skipped) == 3


def test_registry_lists_every_dataset() -> None:
    assert set(DATASETS) == {"msrvtt", "msvd", "didemo", "activitynet", "lsmdc", "vatex", "generic"}


def test_prepare_and_extract_match_videos_the_same_way(tmp_path: Path) -> None:
    """One video index for both: every extension extract accepts (here .ts and .ogv, which prepare used
    to drop), a path without its suffix, and a bare id of a video in a subfolder."""
    from pipeline.captions import VIDEO_EXTENSIONS, VideoIndex, find_videos
    videos = tmp_path / "videos"
    for rel in ("a.ts", "b.ogv", "sub/video7010.mp4", "c.mp4"):
        (videos / rel).parent.mkdir(parents=True, exist_ok=True)
        (videos / rel).write_bytes(b"")
    assert {".ts", ".ogv"} <= VIDEO_EXTENSIONS
    rows = [{"video": v, "caption": f"caption of {v}", "split": "test"}
            for v in ("a.ts", "b", "video7010", "sub/video7010", "missing")]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare("generic", captions, tmp_path / "out.jsonl", videos_dir=videos)
    kept = [r["video"] for r in read_jsonl(tmp_path / "out.jsonl")]
    assert kept == ["a.ts", "b.ogv", "sub/video7010.mp4", "sub/video7010.mp4"]
    assert len(report.skipped) == 1 and "missing" in str(report.skipped[0])
    index = VideoIndex(videos, find_videos(videos))
    assert [index.resolve(r["video"])[0] for r in rows[:4]] == kept


def test_generic_csv_without_the_caption_column_names_the_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "captions.csv", ["video", "text"], [["a", "b"]])
    with pytest.raises(AnnotationError, match="captions.csv.*caption"):
        prepare("generic", path, tmp_path / "out.jsonl")
