"""Text tower: truncated encoding vs the plain 77-token pass, and the keyword stage.

    python bench/text.py                          # 128 captions, ViT-B-32 random weights
    python bench/text.py --captions 1024 --scale 1000,4000

Measures:
  - pipeline.encode.text_features (runs the tower only up to the batch's longest EOT) against
    open_clip's model.encode_text (all 77 positions) on the same token ids, batched as the runner
    batches captions (sorted by length): max abs difference of the projected global feature
    (and of the per-token features against a full 77-position pass), and the speed ratio (target >= 3x);
  - captions/s of pipeline.keywords.KeywordExtractor with its default model;
  - pipeline.runner.encode_captions on two caption counts drawn from one fixed vocabulary, each with a
    fresh Stages object: caption texts vs distinct keywords encoded, showing the keyword-feature cost
    follows the vocabulary, not the caption count; plus a second shard on the same Stages (warm cache).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, resolve, sync, write_result  # noqa: E402
from captions import make_captions  # noqa: E402

TARGET_SPEEDUP = 3.0


class CountingClip:
    """Wraps a ClipEncoder: counts and times encode_texts calls, tagged caption or keyword."""

    def __init__(self, clip, caption_texts: set[str]):
        self.clip, self.caption_texts = clip, caption_texts
        self.calls = {"caption": [0, 0, 0.0], "keyword": [0, 0, 0.0]}  # calls, texts, seconds

    def __getattr__(self, name):
        return getattr(self.clip, name)

    def encode_texts(self, texts):
        kind = "caption" if texts and texts[0] in self.caption_texts else "keyword"
        t0 = time.perf_counter()
        out = self.clip.encode_texts(texts)
        c = self.calls[kind]
        c[0], c[1], c[2] = c[0] + 1, c[1] + len(texts), c[2] + time.perf_counter() - t0
        return out


def time_batches(fn, batches, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for ids in batches:
        fn(ids)
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--captions", type=int, default=128, help="captions for the truncated-vs-plain comparison")
    p.add_argument("--batch-size", type=int, default=64, help="captions per text-tower call")
    p.add_argument("--keyword-captions", type=int, default=128, help="captions for the keyword captions/s figure")
    p.add_argument("--scale", default="200,800",
                   help="two caption counts for the distinct-keyword demonstration (e.g. 1000,4000)")
    p.add_argument("--keyword-model", default="auto", help="KeywordSpec.model (auto = the pipeline's default)")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch
    from pipeline.encode import ClipEncoder, ModelSpec, _text_tower, text_features
    from pipeline.keywords import KeywordExtractor, KeywordSpec
    from pipeline.runner import Stages, encode_captions
    from pipeline.captions import Caption

    device = resolve(args.device)
    info = machine(device)
    enc = ClipEncoder(ModelSpec(args.model, args.pretrained, device))
    model, tower = enc.model, _text_tower(enc.model)
    text_proj = enc.text_proj.to(device)

    # ---- truncated vs plain --------------------------------------------------------------------------
    caps = sorted(make_captions(args.captions, seed=1), key=len)  # the runner batches by length too
    ids = enc.tokenize(caps).to(device)
    batches = [ids[i:i + args.batch_size] for i in range(0, len(ids), args.batch_size)]
    lengths = (ids.argmax(-1) + 1).float()
    with torch.inference_mode():
        # open_clip's encode_text projects with text_projection, which split_projections kept on the model
        plain_fn = lambda x: model.encode_text(x)  # noqa: E731
        trunc_fn = lambda x: text_features(model, x)  # noqa: E731
        plain_fn(batches[0][:8]), trunc_fn(batches[0][:8])  # warm-up
        # alternate, twice each, to share the machine's drift between both
        t_plain = t_trunc = 0.0
        for _ in range(2):
            t_trunc += time_batches(trunc_fn, batches, device)
            t_plain += time_batches(plain_fn, batches, device)
        diff_global = diff_tokens = 0.0
        for x in batches:
            pooled, toks, n = text_features(model, x)
            ref = model.encode_text(x).float()
            diff_global = max(diff_global, (pooled.float() @ text_proj - ref).abs().max().item())
            # every token against a full 77-position pass of the same tower
            cast = tower.transformer.get_cast_dtype()
            full = tower.transformer(tower.token_embedding(x).to(cast) + tower.positional_embedding.to(cast),
                                     attn_mask=tower.attn_mask)
            full = tower.ln_final(full)[:, :toks.shape[1]]
            valid = torch.arange(toks.shape[1], device=device)[None, :] < n[:, None]
            diff_tokens = max(diff_tokens, (full - toks).abs()[valid].max().item())
    speedup = t_plain / t_trunc
    ref_scale = ref.abs().max().item()

    # ---- keywords: captions/s --------------------------------------------------------------------------
    kw_spec = KeywordSpec(model=args.keyword_model, device="cpu" if device == "cpu" else device)
    t0 = time.perf_counter()
    kw = KeywordExtractor(kw_spec)
    kw_load = time.perf_counter() - t0
    kw(make_captions(16, seed=99))  # warm-up
    kw_caps = make_captions(args.keyword_captions, seed=2)
    t0 = time.perf_counter()
    kw_out = kw(kw_caps)
    kw_seconds = time.perf_counter() - t0
    kw_rate = len(kw_caps) / kw_seconds

    # ---- distinct-keyword encoding: cost grows with the vocabulary ------------------------------------
    scale_rows = []
    n_small, n_large = (int(s) for s in args.scale.split(","))
    for n in (n_small, n_large):
        texts = make_captions(n, seed=3)
        counting = CountingClip(enc, set(texts))
        stages = Stages(counting, kw)
        captions = [Caption(caption_id=i, video_id=f"v{i // 20}", split="train", text=t) for i, t in enumerate(texts)]
        t0 = time.perf_counter()
        _, keywords, table, index = encode_captions(captions, stages, args.batch_size)
        seconds = time.perf_counter() - t0
        first = {k: list(v) for k, v in counting.calls.items()}
        # a second shard of the same size on the same worker: its keywords are already cached
        more = make_captions(n, seed=4)
        counting.caption_texts = set(more)
        encode_captions([Caption(caption_id=i, video_id=f"w{i // 20}", split="train", text=t)
                         for i, t in enumerate(more)], stages, args.batch_size)
        scale_rows.append({
            "captions": n, "seconds": round(seconds, 2), "keyword_slots": int((index >= 0).sum()),
            "distinct_keywords": len(table),
            "caption_texts_encoded": first["caption"][1], "caption_encode_calls": first["caption"][0],
            "keyword_texts_encoded": first["keyword"][1], "keyword_encode_calls": first["keyword"][0],
            "keyword_encode_s": round(first["keyword"][2], 3), "caption_encode_s": round(first["caption"][2], 3),
            "second_shard_new_keywords_encoded": counting.calls["keyword"][1] - first["keyword"][1],
        })

    result = {
        "machine": info, "model": args.model, "pretrained": args.pretrained, "batch_size": args.batch_size,
        "truncated_vs_plain": {
            "captions": len(caps), "mean_words": round(sum(len(c.split()) for c in caps) / len(caps), 1),
            "mean_tokens_incl_sot_eot": round(lengths.mean().item(), 1), "max_tokens": int(lengths.max()),
            "plain_s": round(t_plain / 2, 3), "truncated_s": round(t_trunc / 2, 3),
            "plain_captions_per_s": round(2 * len(caps) / t_plain, 1),
            "truncated_captions_per_s": round(2 * len(caps) / t_trunc, 1),
            "speedup": round(speedup, 2), "target_speedup": TARGET_SPEEDUP,
            "max_abs_diff_global_projected": diff_global, "max_abs_value_global": ref_scale,
            "max_abs_diff_tokens": diff_tokens},
        "keywords": {"model": kw.model_name, "load_s": round(kw_load, 2), "captions": len(kw_caps),
                     "seconds": round(kw_seconds, 2), "captions_per_s": round(kw_rate, 1),
                     "example": [kw_caps[0], kw_out[0]]},
        "distinct_keywords": scale_rows,
    }
    tv = result["truncated_vs_plain"]
    rows = [
        ("captions", len(caps), f"mean {tv['mean_words']} words, {tv['mean_tokens_incl_sot_eot']} tokens "
                                f"(max {tv['max_tokens']}) of 77; batch {args.batch_size}, sorted by length"),
        ("plain encode_text", tv["plain_captions_per_s"], "captions/s (77 positions)"),
        ("text_features", tv["truncated_captions_per_s"], "captions/s (up to the batch's longest EOT)"),
        ("speed-up", speedup, f"target >= {TARGET_SPEEDUP}" + ("  MISS" if speedup < TARGET_SPEEDUP else "")),
        ("max |diff| global", diff_global, f"projected EOT feature vs encode_text (values up to {ref_scale:.3g})"),
        ("max |diff| tokens", diff_tokens, "per-token features vs a full 77-position pass"),
        ("keywords captions/s", kw_rate, f"KeywordExtractor ({Path(kw.model_name).name}), "
                                         f"{len(kw_caps)} captions in one call"),
    ]
    for r in scale_rows:
        rows.append((f"encode_captions n={r['captions']}", r["keyword_texts_encoded"],
                     f"keyword texts encoded ({r['keyword_encode_calls']} calls, {r['keyword_encode_s']} s) for "
                     f"{r['keyword_slots']} keyword slots; {r['caption_texts_encoded']} caption texts "
                     f"({r['caption_encode_s']} s); next shard: {r['second_shard_new_keywords_encoded']} new"))
    print_table("text tower and keywords", info, rows)
    write_result("text", result)


if __name__ == "__main__":
    main()
