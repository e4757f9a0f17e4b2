"""`python cli.py search` and workflows.search on shards extracted here from real video files."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from heads.evaluate import score_matrix
from heads.model import TEXT_KEYS
from pipeline.read import FeatureStore, uniform_indices
from tests.conftest import run_cli
from tests.search_fixtures import features, run  # noqa: F401 (fixtures)
from workflows import search as W
from workflows.evaluate import load_run

# Chromium from the system packages (Debian: `apt-get install chromium`) renders the report page.
CHROMIUM = shutil.which("chromium")
QUERY = "a dog runs in the park"


def _rows(stdout: str) -> list[tuple[int, float, float, str]]:
    """(rank, score, second, path) of each table row."""
    return [(int(m[1]), float(m[2]), float(m[3]), m[4])
            for m in re.finditer(r"^\s*(\d+)\s+(-?\d+\.\d+)\s+(\d+\.\d)\s+(\S.*)$", stdout, re.M)]


def test_text_search_with_run_and_html_page(features, run, tmp_path):
    page = tmp_path / "report.html"
    res = run_cli("search", QUERY, "--features", str(features), "--run", str(run), "--top", "3",
                  "--html", str(page), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    rows = _rows(res.stdout)
    assert [r[0] for r in rows] == [1, 2, 3] and rows[0][1] >= rows[1][1] >= rows[2][1]
    store = FeatureStore(features)
    for _, _, second, path in rows:  # every best second is a stored frame time of that video
        v = next(i for i, row in enumerate(store.videos) if row["path"] == path)
        assert np.isclose(store.frame_times(v), second, atol=0.051).any(), (path, second)
    for stage in ("load", "encode query", "stage 1", "stage 2: full head"):
        assert stage in res.stdout
    assert (W.default_folder(features, run) / "index.json").exists()
    text = page.read_text()
    assert text.count('data-rank="') == 3 and all(path in text for *_, path in rows)


@pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (Debian/Ubuntu: apt-get install chromium)")
def test_html_page_renders_in_headless_chromium(features, tmp_path):
    result = W.search_text(features, QUERY, top=4)
    page = W.write_html(result, tmp_path / "page & <report>.html")  # a name that needs escaping in a URL
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60).stdout
    assert 'data-ready="1"' in dom, dom[:2000]  # the page's script ran after every image had loaded
    assert dom.count('data-loaded="1"') == 4 and 'data-loaded="0"' not in dom  # every thumbnail decoded
    assert all(f"{h.score:.4f}" in dom and h.path in dom for h in result.hits)
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1000,800", page.as_uri()],
                   capture_output=True, timeout=60)
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # thumbnails drawn, not a blank page


def test_plain_clip_search_and_best_second(features):
    result = W.search_text(features, QUERY, top=4)
    assert result.scorer == "plain CLIP (meanP)" and len(result.hits) == 4
    store = FeatureStore(features)
    # plain CLIP: the best second is the frame with the largest cos(t, frame) among the sampled frames
    enc = W.load_encoder(store, "cpu")
    t = enc.encode_texts([QUERY])[0][0].astype(np.float32) @ store.text_proj
    for hit in result.hits:
        v = store.video_index[hit.video_id]
        frames, _ = store.frames([v], W.PLAIN_MAX_FRAMES)
        f = frames[0] @ store.image_proj
        best = int(np.argmax(f @ t / np.linalg.norm(f, axis=1)))
        stored = uniform_indices(store.videos[v]["num_frames"], W.PLAIN_MAX_FRAMES)[best]
        assert hit.best_second == pytest.approx(float(store.frame_times(v)[stored]))
        # plain CLIP is CLIP4Clip's meanP: each frame normalised, averaged, normalised, against t
        fn = f / np.linalg.norm(f, axis=1, keepdims=True)
        mean = fn.mean(0) / np.linalg.norm(fn.mean(0))
        assert hit.score == pytest.approx(float(mean @ t / np.linalg.norm(t)), abs=2e-3)
    again = W.search_text(features, QUERY, top=4)
    assert [h.video_id for h in again.hits] == [h.video_id for h in result.hits]


def test_exact_search_without_faiss(monkeypatch):
    from retrieval.index import VectorIndex
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    emb = np.eye(5, dtype=np.float32)[[3, 1, 4, 0, 2]]
    index = VectorIndex(emb, {"kind": "exact"})
    assert index.describe().startswith("exact")
    assert index.search(np.array([0, 0.5, 0.1, 1, 0.9], np.float32), 3).tolist() == [0, 2, 1]


def test_two_stage_equals_exhaustive_full_head(features, run):
    store = FeatureStore(features)
    n = len(store.videos)
    result = W.search_text(features, QUERY, run=run, top=n, candidates=n)
    model, cfg, _ = load_run(run, store)
    text = W.encode_text_query(W.load_encoder(store, "cpu"), store, QUERY, cfg.max_words)

    def chunks():
        frames, mask = store.frames(range(n), cfg.head.max_frames)
        yield 0, {"frames": torch.from_numpy(frames), "frame_mask": torch.from_numpy(mask)}
    scores = score_matrix(model, {k: text[k] for k in TEXT_KEYS}, chunks, n)[0]
    order = scores.argsort(descending=True).tolist()
    assert [h.video_id for h in result.hits] == [store.videos[i]["video_id"] for i in order]
    # the index stores float16 codes: scores agree to ~1e-3, the order exactly (these are far apart)
    assert [h.score for h in result.hits] == pytest.approx(scores[order].tolist(), abs=5e-3)
    few = W.search_text(features, QUERY, run=run, top=n, candidates=2)
    assert few.candidates == 2 and len(few.hits) == 2


def test_video_queries(features, run, clip_collection):
    query = clip_collection / "a.mp4"
    videos = W.search_video(features, query, top=2)
    assert videos.hits[0].video_id == "a.mp4" and videos.hits[0].score == pytest.approx(1.0, abs=1e-4)
    res = run_cli("search", "--video", str(query), "--target", "captions", "--run", str(run),
                  "--features", str(features), "--top", "5", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "captions for" in res.stdout and "a man cooks pasta in a kitchen" in res.stdout
    rows = re.findall(r"^\s*\d+\s+-?\d+\.\d+\s+(\d+\.\d)\s", res.stdout, re.M)
    assert len(rows) == 5 and set(rows) <= {"0.5", "1.5"}  # seconds of the 2 s query video


def test_bad_inputs_fail_clearly(features, run, tmp_path):
    res = run_cli("search", "   ", "--features", str(features))
    assert res.returncode == 2 and "empty query" in res.stderr
    res = run_cli("search", QUERY, "--features", str(tmp_path))
    assert res.returncode == 2 and "no shards found" in res.stderr
    other = tmp_path / "other-run"
    shutil.copytree(run, other)
    saved = json.loads((other / "config.json").read_text())
    saved["features_model"].update(model="ViT-B-32", image_dim=768, text_dim=512)
    (other / "config.json").write_text(json.dumps(saved))
    res = run_cli("search", QUERY, "--features", str(features), "--run", str(other))
    assert res.returncode == 2 and "trained on features of ViT-B-32" in res.stderr
    with pytest.raises(W.SearchError, match="target"):
        W.search_video(features, tmp_path / "x.mp4", target="frames")
    with pytest.raises(W.SearchError, match="query video"):
        W.search_video(features, tmp_path / "missing.mp4")
