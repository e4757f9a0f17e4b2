"""The shard format: names, dtypes, shapes and version, shared by the writer and every reader.

An output folder of `extract` looks like this::

    OUT/config.json              the extraction config, model, weights tag, package versions
    OUT/plan.json                which video went to which shard (kept across reruns)
    OUT/clip_text_blocks.safetensors  CLIP's first text blocks + positional embedding, from which the
                                 heads' temporal encoder starts (CLIP4Clip's seqTransf initialisation)
    OUT/shards/shard-00000/      one complete shard (written under a temporary name, then renamed)
        features.h5              dense arrays, see H5_* below
        videos.parquet           one row per video of the shard (VIDEO_SCHEMA)
        captions.parquet         one row per caption of those videos (CAPTION_SCHEMA)
        meta.json                counts, timings and the fingerprint of the shard's inputs
    OUT/manifest.parquet         every video of every shard (rebuilt at the end of each run)
    OUT/captions.parquet         every caption of every shard
    OUT/failures.csv             path, stage, error for everything that failed
    OUT/summary.json             counts and timings of the last run

Features are stored *before* CLIP's projections (image tower CLS, text tower tokens after
ln_final); the projections are stored beside them, so plain CLIP embeddings are one matmul
away and the trainer may fine-tune the projections without touching a video again.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

SHARDS_DIR = "shards"
SHARD_PREFIX = "shard-"
TMP_PREFIX = ".tmp-"
FEATURES_FILE = "features.h5"
VIDEOS_FILE = "videos.parquet"
CAPTIONS_FILE = "captions.parquet"
META_FILE = "meta.json"

CONFIG_FILE = "config.json"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.parquet"
ALL_CAPTIONS_FILE = "captions.parquet"
FAILURES_FILE = "failures.csv"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".extract.lock"
CLIP_BLOCKS_FILE = "clip_text_blocks.safetensors"  # tensors "positional_embedding" (77, Dt) and
# "resblocks.{i}.{open_clip parameter name}" for i < 4, fp32; metadata "info": JSON with blocks, width,
# heads, activation ("gelu" | "quick_gelu"), model, pretrained

# HDF5 datasets of features.h5. Shapes use: T total frames of the shard, Dv image width
# before projection, C captions, W total text tokens, Dt text width, V distinct keywords,
# K keywords per caption, D joint embedding width.
H5_FRAMES = "frames"                  # (T, Dv) float16, videos concatenated in videos.parquet order
H5_FRAME_TIMES = "frame_times"        # (T,) float32, seconds from the start of the video
H5_TOKENS = "tokens"                  # (W, Dt) float16, captions concatenated, SOT..EOT each
H5_KEYWORDS = "keywords"              # (V, Dt) float16, EOT feature of each distinct keyword
H5_KEYWORD_INDEX = "keyword_index"    # (C, K) int32, rows into H5_KEYWORDS, -1 = no keyword
H5_IMAGE_PROJ = "image_proj"          # (Dv, D) float32, CLIP's visual projection
H5_TEXT_PROJ = "text_proj"            # (Dt, D) float32, CLIP's text projection
H5_DTYPES = {
    H5_FRAMES: "float16",
    H5_FRAME_TIMES: "float32",
    H5_TOKENS: "float16",
    H5_KEYWORDS: "float16",
    H5_KEYWORD_INDEX: "int32",
    H5_IMAGE_PROJ: "float32",
    H5_TEXT_PROJ: "float32",
}
# HDF5 root attributes.
H5_ATTRS = ("schema_version", "model", "pretrained", "image_dim", "text_dim", "embed_dim")

STATUS_OK = "ok"
STATUS_FAILED = "failed"

VIDEO_SCHEMA = pa.schema([
    ("video_id", pa.string()),       # path relative to the videos folder, with extension
    ("path", pa.string()),           # absolute path at extraction time
    ("duration", pa.float64()),      # seconds, from the container (NaN when unknown)
    ("num_frames", pa.int32()),      # 1 FPS frames stored (0 when failed)
    ("frame_start", pa.int64()),     # first row in H5_FRAMES
    ("status", pa.string()),         # STATUS_OK or STATUS_FAILED
    ("error", pa.string()),          # why it failed, or a warning for a partial decode
    ("shard", pa.int32()),
])

CAPTION_SCHEMA = pa.schema([
    ("caption_id", pa.int64()),      # line number in the captions file (stable across reruns)
    ("video_id", pa.string()),
    ("split", pa.string()),          # train | val | test (or whatever the captions file says)
    ("caption", pa.string()),
    ("keywords", pa.list_(pa.string())),  # lemmatised KeyBERT keywords, in score order
    ("token_start", pa.int64()),     # first row in H5_TOKENS
    ("num_tokens", pa.int32()),      # SOT..EOT, at most the context length
    ("shard", pa.int32()),
])

FAILURE_COLUMNS = ("path", "stage", "error")


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}"
