"""Disk cost of `extract --cache-blocks K`: bytes per frame and per caption from the architecture, checked
against the bytes of a real shard, and the projection for MSR-VTT.

    python bench/cache_size.py                    # ViT-B-32 (random weights: sizes do not depend on them)

Measures:
  - per cached frame and per text token, from the open_clip config (pipeline.tokens.cache_bytes), and the
    tail file (K blocks of each tower + ln/proj, fp32) from the model itself, for K = 1 and 2;
  - a real shard: 3 short videos and 12 MSR-VTT-style captions extracted with ViT-B-32 and
    --cache-blocks 2; the HDF5 storage size of every cache dataset against the formula (must be equal),
    and the measured tokens per caption and per keyword;
  - the projection for MSR-VTT: 10,000 videos x ~15 s at 1 FPS (150,000 frames, all cached under the
    default --cache-frames 32) and 200,000 captions of ~9.3 words (an assumption: the commonly reported mean;
    tokens per word measured on bench/captions.py's captions), keywords at their upper bound
    (3 distinct rows per caption: each shard keeps its own keyword table).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_result  # noqa: E402
from captions import make_captions  # noqa: E402

MSRVTT = {"videos": 10_000, "seconds": 15, "captions": 200_000, "words_per_caption": 9.3, "keywords": 3}


def _video(path: Path, seconds: float) -> None:
    from pipeline.decode import ffmpeg_exe

    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=320x240:rate=30:duration={seconds}", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(path)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import json

    import h5py
    import numpy as np
    import open_clip

    from pipeline import schema as S
    from pipeline.clip_init import tail_state
    from pipeline.config import ExtractConfig
    from pipeline.encode import ModelSpec, load_clip
    from pipeline.extract import extract
    from pipeline.tokens import cache_bytes

    cfg = open_clip.get_model_config(args.model)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    n_tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    per = cache_bytes(n_tokens, vision["width"], text["width"])
    model = load_clip(ModelSpec(args.model, "none"))
    tail = {k: sum(t.numel() * 4 for t in tail_state(model, k)[0].values()) for k in (1, 2)}

    with tempfile.TemporaryDirectory() as tmp:
        videos, out = Path(tmp) / "videos", Path(tmp) / "features"
        for name, seconds in (("a", 3.0), ("b", 2.0), ("c", 4.0)):
            _video(videos / f"{name}.mp4", seconds)
        captions = make_captions(12, seed=3, min_words=6, max_words=14)
        with open(videos / "captions.jsonl", "w") as f:
            for i, c in enumerate(captions):
                f.write(json.dumps({"video": "abc"[i % 3], "caption": c}) + "\n")
        extract(ExtractConfig(videos=str(videos), out=str(out), captions=str(videos / "captions.jsonl"),
                              clip=ModelSpec(args.model, "none"), cluster="none", cache_blocks=2), progress=False)
        with h5py.File(out / S.SHARDS_DIR / S.shard_name(0) / S.FEATURES_FILE, "r") as h5:
            size = {n: h5[n].id.get_storage_size() for n in list(S.H5_DTYPES) + list(S.H5_CACHE_DTYPES)}
            frames, cached = len(h5[S.H5_FRAMES]), len(h5[S.H5_FRAME_BLOCK_ROWS])
            tokens, kw_tokens, kw_rows = len(h5[S.H5_TEXT_BLOCK_TOKENS]), len(h5[S.H5_KEYWORD_BLOCK_TOKENS]), \
                len(h5[S.H5_KEYWORDS])
        tail_file = (out / S.CLIP_TAIL_FILE).stat().st_size
    frame_real = (size[S.H5_FRAME_BLOCK_TOKENS] + size[S.H5_FRAME_BLOCK_ROWS]) / cached
    token_real = size[S.H5_TEXT_BLOCK_TOKENS] / tokens
    assert frame_real == per["frame"] and token_real == per["text_token"], (frame_real, token_real, per)
    kw_real = size[S.H5_KEYWORD_BLOCK_TOKENS] / kw_tokens
    assert kw_real == per["text_token"]

    # tokens per word of CLIP's BPE on MSR-VTT-style captions, for the projection
    tok = open_clip.get_tokenizer(args.model)
    sample = make_captions(2000, seed=0, min_words=5, max_words=20)
    ids = tok(sample)
    bpe_per_word = float(((ids.argmax(-1) - 1).sum() / sum(len(c.split()) for c in sample)).item())
    per_caption = MSRVTT["words_per_caption"] * bpe_per_word + 2  # + SOT, EOT
    per_keyword = kw_tokens / kw_rows
    m_frames = MSRVTT["videos"] * MSRVTT["seconds"]
    gb = 1e9
    proj = {
        "frame_tokens_GB": m_frames * per["frame"] / gb,
        "caption_tokens_GB": MSRVTT["captions"] * per_caption * per["text_token"] / gb,
        "keyword_tokens_GB_upper_bound": MSRVTT["captions"] * MSRVTT["keywords"] * per_keyword * per["text_token"] / gb,
        "plain_shards_GB": (m_frames * (vision["width"] * 2 + 4) + MSRVTT["captions"] * per_caption * per["text_token"]
                            + MSRVTT["captions"] * MSRVTT["keywords"] * (text["width"] * 2 + 4)) / gb,
    }
    for k in (1, 2):
        proj[f"total_cache_GB_K{k}"] = (proj["frame_tokens_GB"] + proj["caption_tokens_GB"]
                                        + proj["keyword_tokens_GB_upper_bound"] + tail[k] / gb)
    rows = [
        ("tokens per frame", n_tokens, f"{args.model}: ({vision['image_size']}/{vision['patch_size']})^2 + CLS"),
        ("bytes per cached frame", per["frame"], f"{n_tokens} x {vision['width']} fp16 + int64 row; real shard: "
                                                 f"{frame_real:.0f} ({cached} of {frames} frames)"),
        ("bytes per text token", per["text_token"], f"{text['width']} fp16; real shard: {token_real:.0f} (captions), "
                                                    f"{kw_real:.0f} (keywords)"),
        ("tokens per caption (real)", tokens / len(captions), "12 captions of 6-14 words, SOT..EOT"),
        ("tokens per keyword (real)", per_keyword, f"{kw_rows} keyword rows"),
        ("BPE tokens per word", bpe_per_word, "2,000 bench/captions.py captions"),
        ("bytes per MSR-VTT caption", per_caption * per["text_token"], f"{per_caption:.1f} tokens (9.3 words)"),
        ("tail file K=1 (MB)", tail[1] / 1e6, "fp32, both towers' last block + ln + proj"),
        ("tail file K=2 (MB)", tail[2] / 1e6, f"real file of the shard above: {tail_file / 1e6:.1f} MB"),
        *[(name, value, "MSR-VTT projection") for name, value in proj.items()],
    ]
    info = machine()
    print_table("extract --cache-blocks: disk", info, rows)
    write_result("cache_size", {"machine": info, "model": args.model, "per_frame": per["frame"],
                                "per_text_token": per["text_token"], "tokens_per_frame": n_tokens,
                                "bpe_per_word": bpe_per_word, "tail_bytes": tail, "tail_file_bytes_K2": tail_file,
                                "msrvtt": MSRVTT, "projection": proj})


if __name__ == "__main__":
    main()
