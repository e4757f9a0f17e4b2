"""Features of a run that trained CLIP's last blocks (`train-heads --unfreeze-blocks K`): every video's, caption's
and keyword's features recomputed once from the cached tokens through the run's trained blocks, and kept in the
run folder as a features folder of its own (RUN/features-tuned/, shards as pipeline/write.py writes them, read
by FeatureStore), so `eval` (and later search) use it exactly as they use `extract`'s output.

The folder holds, per video, only its cached frames (`extract --cache-frames`): those are the frames the run was
trained on and the only ones the trained blocks can see. Its fingerprint (tuned.json: the features' shards and
tail, the checkpoint's path, size and time) says whether it is still the one of this run and these features;
when not, it is rebuilt. A plain run (K = 0) uses the features folder as it is.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import torch

from heads.clip_tail import ClipTail, pad_sequences
from heads.tuned import tail_state
from pipeline import schema as S
from pipeline.read import FeatureStore
from pipeline.tokens import TokensError
from pipeline.write import ShardData, write_shard

from .token_data import open_tokens

TUNED_DIR = "features-tuned"
FINGERPRINT = "tuned.json"
FORMAT = 1  # bump when what is written changes, so older folders are rebuilt
CHUNK = 256  # frames, captions or keywords per forward pass


def run_blocks(run: Path | str) -> int:
    """How many CLIP blocks a run trained (its config's unfreeze_blocks; 0 for a head-only run)."""
    path = Path(run) / "config.json"
    if not path.exists():
        return 0
    return int(json.loads(path.read_text()).get("run", {}).get("unfreeze_blocks", 0))


def run_checkpoint(run: Path | str) -> Path:
    """The checkpoint eval uses: best.pt when there is one, else last.pt."""
    run = Path(run)
    found = next((run / n for n in ("best.pt", "last.pt") if (run / n).exists()), None)
    if found is None:
        raise ValueError(f"{run}: not a trained run (no best.pt or last.pt); run train-heads first")
    return found


def features_for_run(run: Path | str, features: Path | str, checkpoint: Path | str | None = None,
                     device: str = "cpu") -> Path:
    """The features folder to score `run` on: `features` itself for a head-only run, else RUN/features-tuned/,
    (re)built from `features`' token caches through the run's trained blocks when its fingerprint differs.
    For eval and search alike; refuses features without (enough) token caches, naming the extract option."""
    blocks = run_blocks(run)
    if blocks == 0:
        return Path(features)
    checkpoint = Path(checkpoint) if checkpoint is not None else run_checkpoint(run)
    try:
        tokens = open_tokens(features, blocks)
    except TokensError as e:
        raise TokensError(f"{run} trained CLIP's last {blocks} block(s) (train-heads --unfreeze-blocks {blocks}), so "
                          f"its features are recomputed from token caches: {e}") from None
    out = Path(run) / TUNED_DIR
    try:
        fingerprint = _fingerprint(tokens, checkpoint)
        if _current(out, fingerprint):
            return out
        print(f"recomputing the features of {features} through the {blocks} trained block(s) of {checkpoint} "
              f"(once; kept in {out})", file=sys.stderr, flush=True)
        tail = _trained_tail(tokens, checkpoint).to(device).eval()
        _build(tokens, tail, out, fingerprint, device)
    finally:
        tokens.close()
    return out


def store_for_run(run: Path | str, store: FeatureStore, checkpoint: Path | str | None = None,
                  device: str = "cpu") -> FeatureStore:
    """features_for_run as an open FeatureStore: `store` itself for a head-only run (else it is closed)."""
    folder = features_for_run(run, store.root, checkpoint, device)
    if folder == store.root:
        return store
    store.close()
    return FeatureStore(folder)


def _fingerprint(tokens, checkpoint: Path) -> dict:
    def stat(p: Path) -> list:
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]

    return {"format": FORMAT, "features": str(tokens.root.resolve()),
            "shards": [[d.name, *stat(d / S.FEATURES_FILE)] for d in tokens.shard_dirs],
            "tail": stat(tokens.root / S.CLIP_TAIL_FILE),
            "checkpoint": [str(checkpoint.resolve()), *stat(checkpoint)]}


def _current(out: Path, fingerprint: dict) -> bool:
    try:
        return json.loads((out / FINGERPRINT).read_text()) == fingerprint
    except (OSError, ValueError):
        return False


def _trained_tail(tokens, checkpoint: Path) -> ClipTail:
    """The features' saved tail with the run's trained weights loaded into it."""
    tensors, info = tokens.tail()
    tail = ClipTail.from_state(tensors, info)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = tail_state(ckpt["model"])
    if not state:
        raise ValueError(f"{checkpoint}: holds no trained CLIP blocks, though the run's config says it trained some")
    try:
        tail.load_state_dict(state)
    except RuntimeError as e:  # another model's or another K's tail
        raise ValueError(f"{checkpoint}: its CLIP blocks do not fit the tail of {tokens.root} "
                         f"({str(e).splitlines()[0]}); evaluate it on the features it was trained on") from None
    return tail


@torch.no_grad()
def _build(tokens, tail: ClipTail, out: Path, fingerprint: dict, device) -> None:
    """Write every shard's features through `tail` into a temporary folder, then swap it in for `out`."""
    tmp = out.with_name(f".{out.name}-tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        config = tokens.root / S.CONFIG_FILE
        if config.exists():
            shutil.copy2(config, tmp / S.CONFIG_FILE)
        for pos, shard in enumerate(tokens.shard_dirs):
            print(f"  {shard.name} ({pos + 1}/{len(tokens.shard_dirs)})", file=sys.stderr, flush=True)
            _write_shard(tokens, pos, tail, tmp, device)
        (tmp / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2))
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(tmp: Path, out: Path) -> None:
    """Put `tmp` at `out`, replacing an older folder; a concurrent eval that finished first wins."""
    old = out.with_name(f".{out.name}-old-{uuid.uuid4().hex[:8]}")
    if out.exists():
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:  # another eval put its (identical) folder there in between
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _write_shard(tokens, pos: int, tail: ClipTail, out: Path, device) -> None:
    shard = tokens.shard_dirs[pos]
    videos = pq.read_table(shard / S.VIDEOS_FILE).to_pylist()
    captions = pq.read_table(shard / S.CAPTIONS_FILE).to_pylist()
    with h5py.File(shard / S.FEATURES_FILE, "r") as h5:
        attrs = {k: h5.attrs[k] for k in ("model", "pretrained")}
        image_proj, text_proj = h5[S.H5_IMAGE_PROJ][()], h5[S.H5_TEXT_PROJ][()]
        frame_times = h5[S.H5_FRAME_TIMES][()]
        keyword_index = h5[S.H5_KEYWORD_INDEX][()]
        n_tokens = h5[S.H5_TOKENS].shape[0]
    rows = tokens.frame_rows(pos)  # the cached frames' rows in `frames`
    frame_in = tokens.array(pos, S.H5_FRAME_BLOCK_TOKENS)
    frames = np.concatenate([_image(tail, frame_in[s:s + CHUNK], device) for s in range(0, len(rows), CHUNK)]) \
        if len(rows) else np.zeros((0, tail.image.spec.width), np.float16)
    # each ok video keeps its cached frames only: new frame_start / num_frames over the rows it owns
    at = 0
    for v in videos:
        lo, hi = np.searchsorted(rows, [v["frame_start"], v["frame_start"] + v["num_frames"]])
        if v["status"] == S.STATUS_OK and hi == lo:
            raise ValueError(f"{shard / S.FEATURES_FILE}: video {v['video_id']} has no cached frame")
        if v["status"] == S.STATUS_OK:
            if lo != at:  # rows are increasing and ok videos own consecutive frame ranges
                raise ValueError(f"{shard / S.FEATURES_FILE}: cached frames out of order at video {v['video_id']}")
            v["frame_start"], v["num_frames"], at = at, int(hi - lo), int(hi)
    text_in = tokens.array(pos, S.H5_TEXT_BLOCK_TOKENS)
    text = np.zeros((n_tokens, tail.text.spec.width), np.float16)
    for s in range(0, len(captions), CHUNK):
        part = captions[s:s + CHUNK]
        x, _ = _text(tail, [text_in[c["token_start"]:c["token_start"] + c["num_tokens"]] for c in part], device)
        for c, feats in zip(part, x):
            text[c["token_start"]:c["token_start"] + c["num_tokens"]] = feats[:c["num_tokens"]]
    starts, lengths = tokens.keyword_spans(pos)
    kw_in = tokens.array(pos, S.H5_KEYWORD_BLOCK_TOKENS)
    keywords = [_text(tail, [kw_in[a:a + n] for a, n in zip(starts[s:s + CHUNK], lengths[s:s + CHUNK])], device)[1]
                for s in range(0, len(starts), CHUNK)]
    keyword_features = np.concatenate(keywords) if keywords else np.zeros((0, text.shape[1]), np.float16)
    data = ShardData(index=int(shard.name[len(S.SHARD_PREFIX):]), videos=videos, frames=[frames],
                     frame_times=[frame_times[rows]], captions=captions, tokens=[text],
                     keyword_features=keyword_features, keyword_index=keyword_index, meta={"tuned_from": str(shard)})
    write_shard(out, data, image_proj, text_proj, attrs)


def _image(tail: ClipTail, block_in: np.ndarray, device) -> np.ndarray:
    return tail.image(torch.from_numpy(np.array(block_in)).to(device)).half().cpu().numpy()


def _text(tail: ClipTail, seqs: list[np.ndarray], device) -> tuple[np.ndarray, np.ndarray]:
    """Per-token features (B, L, Dt) and EOT features (B, Dt), float16, of zero-padded SOT..EOT sequences."""
    batch, lengths = pad_sequences([torch.from_numpy(np.array(q)) for q in seqs])
    x, eot = tail.text(batch.to(device), lengths.to(device))
    return x.half().cpu().numpy(), eot.half().cpu().numpy()
