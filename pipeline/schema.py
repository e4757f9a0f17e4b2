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

Versions: SCHEMA_VERSION is the layout every reader needs (a shard of another one is refused);
SCHEMA_MINOR counts additions a reader of the same version may ignore. 1.0 is the plain shard;
1.1 adds the token caches of `extract --cache-blocks K` (H5_CACHE_* below, and OUT/clip_tail.safetensors):
per cached frame the tokens entering the image tower's last K blocks, per caption and per distinct
keyword the tokens entering the text tower's last K blocks (SOT..EOT: the causal mask makes the cut
exact), from which heads/clip_tail.py recomputes the stored features. A shard without caches is
written exactly as 1.0 (no schema_minor attribute), so shards of either kind read everywhere.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
SCHEMA_MINOR = 1  # written (H5 attribute "schema_minor") only by shards that hold token caches

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
CLIP_TAIL_FILE = "clip_tail.safetensors"  # with --cache-blocks K only: fp32 tensors "visual.resblocks.{j}.*"
# and "text.resblocks.{j}.*" (j < K: blocks L-K..L-1, open_clip parameter names), "visual.ln_post.*",
# "visual.proj" (Dv, D), "text.ln_final.*", "text.text_projection" (Dt, D); metadata "info": JSON with
# cache_blocks, model, pretrained and per tower layers, first_block, width, heads, activation, layer_scale,
# ln_eps (+ visual: pool_type tok|avg, final_ln_after_pool, tokens N, ln_post_eps; text: pool "eot",
# context_length, ln_final_eps). Read with pipeline/tokens.py, rebuilt by heads/clip_tail.py.

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

# Token caches (schema 1.1, `extract --cache-blocks K`; absent otherwise). Tc cached frames (per video a
# uniform subset of at most --cache-frames of its 1 FPS frames, see cached_frame_indices), N tokens per
# frame (patches + CLS: 50 for ViT-B/32), Wk total keyword tokens.
H5_FRAME_BLOCK_TOKENS = "frame_block_tokens"      # (Tc, N, Dv) float16, tokens entering the image tower's
#                                                   last K blocks, videos in videos.parquet order
H5_FRAME_BLOCK_ROWS = "frame_block_rows"          # (Tc,) int64, the row in H5_FRAMES (and H5_FRAME_TIMES) of
#                                                   each cached frame; increasing, so a video's cached frames
#                                                   are the rows in [frame_start, frame_start + num_frames)
H5_TEXT_BLOCK_TOKENS = "text_block_tokens"        # (W, Dt) float16, tokens entering the text tower's last K
#                                                   blocks, row for row with H5_TOKENS (captions.parquet
#                                                   token_start and num_tokens = SOT..EOT length index both)
H5_KEYWORD_BLOCK_TOKENS = "keyword_block_tokens"  # (Wk, Dt) float16, the same for each row of H5_KEYWORDS
H5_KEYWORD_BLOCK_START = "keyword_block_start"    # (V,) int64, first row in H5_KEYWORD_BLOCK_TOKENS
H5_KEYWORD_BLOCK_LENGTH = "keyword_block_length"  # (V,) int32, SOT..EOT length of each keyword
H5_CACHE_DTYPES = {
    H5_FRAME_BLOCK_TOKENS: "float16",
    H5_FRAME_BLOCK_ROWS: "int64",
    H5_TEXT_BLOCK_TOKENS: "float16",
    H5_KEYWORD_BLOCK_TOKENS: "float16",
    H5_KEYWORD_BLOCK_START: "int64",
    H5_KEYWORD_BLOCK_LENGTH: "int32",
}
# HDF5 root attributes of a shard with caches: schema_minor (= SCHEMA_MINOR), cache_blocks (K), cache_frames
# (the --cache-frames bound), image_layers and text_layers (blocks of each tower, so blocks L-K.. are cached).
H5_CACHE_ATTRS = ("schema_minor", "cache_blocks", "cache_frames", "image_layers", "text_layers")
DEFAULT_CACHE_FRAMES = 32


def cached_frame_indices(n_frames: int, limit: int) -> list[int]:
    """Which of a video's n 1 FPS frames get cached tokens: all when n <= limit, else `limit` spread
    uniformly (first and last included; the same rule as the trainer's frame sampling)."""
    import numpy as np

    if n_frames <= limit:
        return list(range(n_frames))
    return np.linspace(0, n_frames - 1, num=limit).round().astype(int).tolist()

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
