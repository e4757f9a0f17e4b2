"""`python cli.py extract` end to end, read back with h5py and pyarrow alone."""
from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from tests.conftest import make_video, run_cli, tiny_extract_args, write_jsonl


def read_shards(out):
    """Every shard's arrays and tables, with nothing but h5py and pyarrow."""
    shards = {}
    for d in sorted((out / S.SHARDS_DIR).iterdir()):
        with h5py.File(d / S.FEATURES_FILE, "r") as h5:
            arrays = {k: h5[k][()] for k in h5.keys()}
            attrs = dict(h5.attrs)
        shards[d.name] = (arrays, attrs, pq.read_table(d / S.VIDEOS_FILE), pq.read_table(d / S.CAPTIONS_FILE))
    return shards


@pytest.fixture(scope="module")
def extracted(clip_collection, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    res = run_cli(*tiny_extract_args(clip_collection, out, "--cluster", "none", "--shard-size", "2"))
    assert res.returncode == 0, res.stderr
    return out, res


def test_outputs_and_schema_round_trip(extracted):
    out, res = extracted
    assert "done: 4 videos ok, 0 failed" in res.stdout
    assert "WARNING: random weights" in res.stderr
    for name in (S.CONFIG_FILE, S.PLAN_FILE, S.MANIFEST_FILE, S.ALL_CAPTIONS_FILE, S.FAILURES_FILE, S.SUMMARY_FILE):
        assert (out / name).exists(), name
    config = json.loads((out / S.CONFIG_FILE).read_text())
    assert config["config"]["clip"]["model"] == "ViT-Tiny-16" and "torch" in config["versions"]
    shards = read_shards(out)
    assert list(shards) == ["shard-00000", "shard-00001"]
    n_frames = {}
    for arrays, attrs, videos, captions in shards.values():
        assert attrs["schema_version"] == S.SCHEMA_VERSION and attrs["model"] == "ViT-Tiny-16"
        for key, dtype in S.H5_DTYPES.items():
            assert arrays[key].dtype == np.dtype(dtype), key
        assert videos.schema.equals(S.VIDEO_SCHEMA) and captions.schema.equals(S.CAPTION_SCHEMA)
        dv, d = arrays[S.H5_IMAGE_PROJ].shape
        assert arrays[S.H5_FRAMES].shape == (sum(videos.column("num_frames").to_pylist()), dv)
        assert len(arrays[S.H5_FRAME_TIMES]) == len(arrays[S.H5_FRAMES])
        assert arrays[S.H5_TOKENS].shape[0] == sum(captions.column("num_tokens").to_pylist())
        assert arrays[S.H5_KEYWORD_INDEX].shape == (captions.num_rows, 3)
        assert arrays[S.H5_KEYWORD_INDEX].max() < len(arrays[S.H5_KEYWORDS])
        for row in videos.to_pylist():
            n_frames[row["video_id"]] = row["num_frames"]
            frames = arrays[S.H5_FRAMES][row["frame_start"]:row["frame_start"] + row["num_frames"]]
            assert np.isfinite(frames).all() and np.abs(frames).sum() > 0
    # 1 FPS at the centre of each second: 2 s -> 2, 3 s -> 3, 1.4 s -> 1, 4 s -> 4 frames.
    assert n_frames == {"a.mp4": 2, "b.mp4": 3, "c.mp4": 1, "sub/d.mp4": 4}
    captions = pq.read_table(out / S.ALL_CAPTIONS_FILE).to_pylist()
    assert sorted(c["split"] for c in captions) == ["test", "train", "train", "train", "val"]
    dog = next(c for c in captions if c["caption"].startswith("the dog is running"))
    assert "dog" in dog["keywords"] and "run" in dog["keywords"]  # lemmatised


def test_rerun_skips_complete_shards_and_redoes_a_deleted_one(extracted, clip_collection):
    out, _ = extracted
    before = read_shards(out)
    untouched = (out / S.SHARDS_DIR / "shard-00000" / S.FEATURES_FILE).stat().st_mtime_ns
    shutil.rmtree(out / S.SHARDS_DIR / "shard-00001")
    res = run_cli(*tiny_extract_args(clip_collection, out, "--cluster", "none", "--shard-size", "2"))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / S.SUMMARY_FILE).read_text())
    assert summary["shards_done_now"] == 1 and summary["videos_skipped_complete"] == 2
    assert [t["shard"] for t in summary["shard_timings"]] == [1]
    assert (out / S.SHARDS_DIR / "shard-00000" / S.FEATURES_FILE).stat().st_mtime_ns == untouched
    after = read_shards(out)
    for key in (S.H5_FRAMES, S.H5_TOKENS, S.H5_KEYWORDS):
        np.testing.assert_array_equal(before["shard-00001"][0][key], after["shard-00001"][0][key])


def test_bad_inputs_become_rows_not_crashes(tmp_path):
    videos = tmp_path / "videos"
    make_video(videos / "good.mp4", 2.0)
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "noise.mp4").write_bytes(np.random.default_rng(1).bytes(5000))
    (videos / "dir.mp4").mkdir()
    make_video(videos / "name with spaces 'q' ü.mp4", 1.0)
    make_video(videos / "-dash.mp4", 1.0)
    captions = write_jsonl(tmp_path / "caps.jsonl", [
        {"video": "good", "caption": "a test pattern", "split": "train"},
        "{not json",
        {"video": "good"},
        {"video": "missing", "caption": "no such video"},
        {"video": "good", "caption": "   "},
        {"video": "../../etc/passwd", "caption": "escape"},
        {"video": "name with spaces 'q' ü", "caption": "odd names work", "split": "test"},
        {"video": "-dash", "caption": "a leading dash", "split": "test"},
        {"video": "good", "caption": "x" * 10000, "split": "train"},
    ])
    out = tmp_path / "out"
    res = run_cli(*tiny_extract_args(videos, out, "--captions", str(captions), "--cluster", "none"))
    assert res.returncode == 0, res.stderr
    assert "3 failed" in res.stdout
    manifest = {r["video_id"]: r for r in pq.read_table(out / S.MANIFEST_FILE).to_pylist()}
    assert manifest["good.mp4"]["status"] == "ok"
    assert manifest["name with spaces 'q' ü.mp4"]["status"] == "ok" and manifest["-dash.mp4"]["status"] == "ok"
    assert "empty file" in manifest["empty.mp4"]["error"] and "empty.mp4" in manifest["empty.mp4"]["error"]
    assert "is a directory" in manifest["dir.mp4"]["error"]
    assert manifest["noise.mp4"]["status"] == "failed"
    with open(out / S.FAILURES_FILE) as f:
        failures = list(csv.DictReader(f))
    errors = " | ".join(f"{r['path']} {r['stage']} {r['error']}" for r in failures)
    for needle in ("caps.jsonl:2 captions invalid JSON", "caps.jsonl:3 captions missing", "unknown video 'missing'",
                   "caps.jsonl:5 captions empty caption", "escapes the videos folder", "empty.mp4 decode"):
        assert needle in errors, needle
    assert pq.read_table(out / S.ALL_CAPTIONS_FILE).num_rows == 4
    strict = run_cli(*tiny_extract_args(videos, out, "--captions", str(captions), "--cluster", "none", "--strict"))
    assert strict.returncode == 1  # nothing left to do, but failures are on record


def test_nothing_decodable_exits_non_zero(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"")
    res = run_cli(*tiny_extract_args(videos, tmp_path / "out", "--cluster", "none"))
    assert res.returncode == 1 and "0 videos ok, 1 failed" in res.stdout


def test_unloadable_weights_stop_before_any_work(clip_collection, tmp_path):
    res = run_cli("extract", str(clip_collection), "--out", str(tmp_path / "out"), "--model", "ViT-Tiny-16",
                  "--pretrained", str(tmp_path / "nowhere" / "w.pt"))
    assert res.returncode == 2
    assert "ViT-Tiny-16" in res.stderr and "--pretrained none" in res.stderr
    assert not (tmp_path / "out").exists()


def test_second_run_on_a_locked_folder_stops(clip_collection, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / S.LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("12345")
        held.flush()
        res = run_cli(*tiny_extract_args(clip_collection, out, "--cluster", "none"))
    assert res.returncode == 2 and "another extract is already writing" in res.stderr
    assert not (out / S.SHARDS_DIR).exists()


def test_dask_local_cluster_equals_in_process(extracted, clip_collection, tmp_path):
    out_local, _ = extracted
    out = tmp_path / "dask"
    res = run_cli(*tiny_extract_args(clip_collection, out, "--workers", "2", "--shard-size", "2"))
    assert res.returncode == 0, res.stderr
    a, b = read_shards(out_local), read_shards(out)
    assert list(a) == list(b)
    for name in a:
        for key in (S.H5_FRAMES, S.H5_TOKENS, S.H5_KEYWORD_INDEX):
            np.testing.assert_allclose(a[name][0][key], b[name][0][key], atol=2e-3)
        assert a[name][3].column("keywords").to_pylist() == b[name][3].column("keywords").to_pylist()


def test_changed_model_is_refused_without_overwrite(extracted, clip_collection):
    out, _ = extracted
    res = run_cli(*tiny_extract_args(clip_collection, out, "--cluster", "none", "--keywords", "2"))
    assert res.returncode == 2 and "--overwrite" in res.stderr


def test_csv_captions_with_a_byte_order_mark(clip_collection, tmp_path):
    # Spreadsheets often save CSV with a BOM; the header must still read "video".
    captions = tmp_path / "caps.csv"
    captions.write_text("video,caption,split\na,a dog runs,train\nb.mp4,a man cooks,test\n", encoding="utf-8-sig")
    out = tmp_path / "out"
    res = run_cli(*tiny_extract_args(clip_collection, out, "--captions", str(captions), "--cluster", "none",
                                     "--keywords", "0"))
    assert res.returncode == 0, res.stderr
    rows = pq.read_table(out / S.ALL_CAPTIONS_FILE).to_pylist()
    assert sorted((r["video_id"], r["split"]) for r in rows) == [("a.mp4", "train"), ("b.mp4", "test")]


# --- resume: a shard is redone exactly when what it is made from changed -------------------------------

FAST = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]


def _rerun(videos, out, *extra) -> dict:
    res = run_cli(*tiny_extract_args(videos, out, "--cluster", "none", "--shard-size", "1", *extra))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / S.SUMMARY_FILE).read_text())
    return {"redone": sorted(t["shard"] for t in summary["shard_timings"]),
            "skipped": summary["videos_skipped_complete"]}


def _frames(out, shard: int) -> int:
    return pq.read_table(out / S.SHARDS_DIR / S.shard_name(shard) / S.VIDEOS_FILE).column("num_frames")[0].as_py()


def test_rerun_redoes_a_video_replaced_or_touched_under_the_same_name(tmp_path):
    videos, out = tmp_path / "videos", tmp_path / "out"
    for name in ("a", "b", "c"):
        make_video(videos / f"{name}.mp4", 1.0, size="64x48", extra=FAST)
    assert _rerun(videos, out) == {"redone": [0, 1, 2], "skipped": 0}
    assert _rerun(videos, out) == {"redone": [], "skipped": 3}  # nothing touched: every shard skipped

    a, b = videos / "a.mp4", videos / "b.mp4"
    st_a = a.stat()
    make_video(tmp_path / "other.mp4", 2.0, size="64x48", extra=FAST).replace(a)  # other bytes, same name
    os.utime(a, ns=(st_a.st_atime_ns, st_a.st_mtime_ns))  # and the old time: only the size tells
    st_b = b.stat()
    os.utime(b, ns=(st_b.st_atime_ns, st_b.st_mtime_ns + 10**9))  # same bytes, another time
    assert _rerun(videos, out) == {"redone": [0, 1], "skipped": 1}
    assert _frames(out, 0) == 2  # the new a.mp4 (2 s), not the old one (1 s)


def test_rerun_redoes_shards_when_the_local_checkpoint_changes(tmp_path):
    import torch

    from pipeline.encode import ModelSpec, load_clip

    videos, out, ckpt = tmp_path / "videos", tmp_path / "out", tmp_path / "tiny.pt"
    make_video(videos / "a.mp4", 1.0, size="64x48", extra=FAST)
    model = load_clip(ModelSpec(model="ViT-Tiny-16", pretrained="none"))
    torch.save(model.state_dict(), ckpt)  # open_clip loads a local state_dict as --pretrained PATH
    args = tiny_extract_args(videos, out, "--cluster", "none")
    args[args.index("--pretrained") + 1] = str(ckpt)
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    before = json.loads((out / S.SUMMARY_FILE).read_text())
    with torch.no_grad():
        model.logit_scale.add_(1.0)  # other weights under the same name
    torch.save(model.state_dict(), ckpt)
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    after = json.loads((out / S.SUMMARY_FILE).read_text())
    assert before["shards_done_now"] == after["shards_done_now"] == 1 and after["videos_skipped_complete"] == 0


def test_fingerprint_names_the_resolved_keyword_model(tmp_path, monkeypatch):
    """"auto" is resolved before the fingerprint: when what it stands for changes, shards with captions
    are redone; a shard without captions does not depend on it."""
    from pipeline import extract as E
    from pipeline.captions import Caption
    from pipeline.config import ExtractConfig
    from pipeline.encode import ModelSpec
    from pipeline.keywords import KeywordSpec, keyword_model_name

    assert keyword_model_name("auto") not in ("auto", "") and keyword_model_name("my/model") == "my/model"
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (videos / name).write_bytes(b"x")
    cfg = ExtractConfig(videos=str(videos), out=str(tmp_path / "out"), shard_size=1,
                        clip=ModelSpec(model="ViT-Tiny-16", pretrained="none"), keywords=KeywordSpec(model="auto"))
    (tmp_path / "out").mkdir()
    inputs = E.Inputs(["a.mp4", "b.mp4"], [Caption(0, "a.mp4", "train", "a dog")])

    def fingerprints(resolved: str) -> list[str]:
        monkeypatch.setattr(E, "keyword_model_name", lambda model: resolved)
        return [t.fingerprint for t in E._tasks(cfg, inputs)[0]]

    one, other = fingerprints("model-A@rev1"), fingerprints("model-A@rev2")
    assert one[0] != other[0] and one[1] == other[1]
    assert fingerprints("model-A@rev1") == one
