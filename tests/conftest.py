"""Shared fixtures: real video files made with ffmpeg, a tiny random-weight CLIP."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")

from pipeline.decode import ffmpeg_exe  # noqa: E402

TINY_MODEL = "ViT-Tiny-16"


def load_bench(script: str):
    """A bench/ script imported as a module (bench/ is not a package), a fresh copy each call."""
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", ROOT / "bench" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_video(path: Path, seconds: float = 3.0, size: str = "160x120", rate: int = 30,
               extra: list[str] | None = None, source: str = "testsrc2") -> Path:
    """A real H.264 file synthesised by ffmpeg (test pattern with a moving element)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    args = [ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi",
            "-i", f"{source}=size={size}:rate={rate}:duration={seconds}",
            *(extra or ["-c:v", "libx264", "-pix_fmt", "yuv420p"]), str(path)]
    subprocess.run(args, check=True)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture(scope="session")
def clip_collection(tmp_path_factory) -> Path:
    """Four good videos of different lengths and a captions file with train and test rows."""
    root = tmp_path_factory.mktemp("videos")
    for name, seconds in (("a", 2.0), ("b", 3.0), ("c", 1.4), ("sub/d", 4.0)):
        make_video(root / f"{name}.mp4", seconds)
    write_jsonl(root / "captions.jsonl", [
        {"video": "a", "caption": "a dog runs across the park", "split": "train"},
        {"video": "a.mp4", "caption": "the dog is running fast", "split": "train"},
        {"video": "b", "caption": "a man cooks pasta in a kitchen", "split": "test"},
        {"video": "c", "caption": "children play football on the beach", "split": "train"},
        {"video": "sub/d", "caption": "two cars race on a wet road", "split": "val"},
    ])
    return root


def run_cli(*args: str, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `python cli.py ...` as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def tiny_extract_args(videos: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", str(videos), "--out", str(out), "--model", TINY_MODEL, "--pretrained", "none",
            "--quiet", "--batch-size", "16", *extra]


@pytest.fixture(scope="session")
def synthetic_features(tmp_path_factory) -> Path:
    """A 30-video make-synthetic set (with time-reversed twins in test) extracted with the tiny CLIP."""
    root = tmp_path_factory.mktemp("synthetic")
    res = run_cli("make-synthetic", str(root / "videos"), "--videos", "30", "--seed", "0")
    assert res.returncode == 0, res.stderr
    res = run_cli(*tiny_extract_args(root / "videos", root / "features", "--cluster", "none"))
    assert res.returncode == 0, res.stderr
    return root / "features"
