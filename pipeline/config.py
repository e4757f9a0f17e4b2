"""The extraction config: filled by the CLI, sent to every worker, saved beside the shards."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from . import schema as S
from .encode import ModelSpec
from .keywords import KeywordSpec


@dataclass(frozen=True)
class ExtractConfig:
    videos: str                                   # the videos folder (absolute)
    out: str                                      # the output folder (absolute)
    captions: str | None = None                   # JSONL/CSV captions file, or None: video features only
    clip: ModelSpec = field(default_factory=ModelSpec)
    keywords: KeywordSpec = field(default_factory=KeywordSpec)
    batch_size: int = 256                         # frames (and captions) per model call
    shard_size: int = 64                          # videos per shard: the unit of work and of resume
    decode_threads: int = 3                       # ffmpeg processes per worker feeding the model
    decode_timeout: float = 120.0                 # seconds without a frame before ffmpeg is killed
    workers: int = 1                              # local Dask workers (one per GPU on CUDA)
    scheduler: str | None = None                  # address of a running Dask scheduler
    cluster: str = "local"                        # local | slurm | none (in-process, no Dask)
    cluster_config: str | None = None             # YAML/JSON options for --cluster slurm
    strict: bool = False                          # any failure -> non-zero exit code
    cache_blocks: int = 0                         # K > 0: also cache the tokens entering each tower's last K blocks
    cache_frames: int = S.DEFAULT_CACHE_FRAMES    # at most this many frames per video get cached tokens (uniform)

    # Settings that change the features: a change means the shards must be redone.
    def feature_settings(self) -> dict:
        return {"clip": {"model": self.clip.model, "pretrained": self.clip.pretrained},
                "keywords": {"model": self.keywords.model, "top_k": self.keywords.top_k,
                             "max_words": self.keywords.max_words, "lang": self.keywords.lang}}

    # What the token caches depend on; None without caches, so that a folder extracted before they existed
    # keeps its fingerprints (and is not redone) when K stays 0.
    def cache_settings(self) -> dict | None:
        return {"blocks": self.cache_blocks, "frames": self.cache_frames} if self.cache_blocks > 0 else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExtractConfig":
        d = dict(d)
        d["clip"] = ModelSpec(**d.get("clip", {}))
        d["keywords"] = KeywordSpec(**d.get("keywords", {}))
        return cls(**d)

    @property
    def out_path(self) -> Path:
        return Path(self.out)
