"""The README's Benchmarks table, rendered from the result files the bench scripts write (`bench/results/`).

    python bench/tables.py            # print the table
    python bench/tables.py --write    # replace the table in README.md (between the bench-table markers)
    python bench/tables.py --check    # exit 1 when README.md's table is not what the results give

Every figure in the table comes from a result file; a script that has not been run reads "not run", and
each target's verdict (met / missed) is computed here from the figures and the target stored beside
them, so a table cannot claim more than its files hold. A test runs `--check`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
START, END = "<!-- bench-table:start (bench/tables.py --write) -->", "<!-- bench-table:end -->"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def load_note(d: dict) -> str:
    m = d.get("machine", {})
    la = m.get("load_average_1m")
    return f"{m.get('cores', '?')} cores, load average {la:g}" if la is not None else f"{m.get('cores', '?')} cores"


def extract_row(d: dict) -> tuple[str, str]:
    v, load_s = d["videos"], d["model_load_s"]
    fig = (f"**ratio {d['ratio']:.2f}** ({d['extract_frames_per_s']:.2f} vs {d['bare_frames_per_s']:.2f} frames/s, "
           f"{v['count']} videos of {v['size']} {v['codec']} ~{v['mean_kbps']} kb/s, {load_note(d)}): "
           f"{verdict(d['ratio'] >= 0.9)}; text tower {d['text_tower_share']:.0%} and keyword stage "
           f"{d['keyword_stage_share']:.0%} of the run; models load in {sum(load_s.values()):.0f} s "
           f"(CLIP {load_s['clip']:.0f} s, KeyBERT {load_s['keywords']:.0f} s)")
    return fig, ">= 0.9"


def text_row(d: dict) -> tuple[str, str]:
    t = d["truncated_vs_plain"]
    grow = d.get("distinct_keywords", [])
    growth = ""
    if len(grow) >= 2:
        growth = (f"; {grow[0]['captions']} -> {grow[-1]['captions']} captions: {grow[0]['keyword_texts_encoded']} -> "
                  f"{grow[-1]['keyword_texts_encoded']} keyword texts encoded")
    fig = (f"{t['speedup']:.1f}x faster ({t['truncated_captions_per_s']:.1f} vs {t['plain_captions_per_s']:.1f} "
           f"captions/s), max abs diff {t['max_abs_diff_global_projected']:.1e}: {verdict(t['speedup'] >= t['target_speedup'])}"
           f"; keywords {d['keywords']['captions_per_s']:.0f} captions/s{growth}")
    return fig, f">= {t['target_speedup']:g}x"


def train_row(d: dict) -> tuple[str, str]:
    lo = d["loader"]
    mem, h5 = lo["memory"], lo["hdf5_by_index"]
    fig = (f"**{mem['batches_per_s']:.1f} batches/s from memory** after a {mem['preload_s']:.1f} s preload (keeps a "
           f"{lo['step_ms_kept_busy']['memory']:.1f} ms step busy); {h5['batches_per_s']:.1f} batches/s reading HDF5 "
           f"by index; {lo['shards']['videos']:,} videos x {lo['shards']['captions'] // lo['shards']['videos']} captions, "
           f"{lo['shards']['disk_bytes'] / 2**30:.1f} GiB ({load_note(d)}): "
           f"{verdict(mem['batches_per_s'] >= lo['target_batches_per_s'])}")
    if "data_wait_share" in d:
        fig += f"; data wait {d['data_wait_share']:.2%}"
    return fig, f">= {lo['target_batches_per_s']:g} batches/s"


def eval_row(d: dict, big: dict | None) -> tuple[str, str]:
    run = d["runs"][0]
    fig = (f"**1k x 1k: {d['seconds_1k_x_1k']:.0f} s** ({run.get('cpu_s', float('nan')):.0f} CPU s, "
           f"load average {run.get('load_average_1m', float('nan')):g}; reading {run.get('open_and_texts_s', 0):.1f} s "
           f"of it, from a store of {d.get('features', {}).get('shards', '?'):,} shards): "
           f"{verdict(d['seconds_1k_x_1k'] < d['target_seconds_1k_x_1k'])}")
    rss = d if d.get("ran_100k") else big or d  # this version's own 100k run when it has one
    if rss.get("ran_100k"):
        fig += (f"; 1k x 100k: {rss['seconds_1k_x_100k']:.0f} s, peak RSS {rss['peak_rss_mib_max']:,} MiB "
                f"({'this version' if rss is d else 'an earlier version, bench/results/eval_100k.json'}): "
                f"{verdict(rss['peak_rss_mib_max'] < rss['target_rss_gib'] * 1024)}")
    return fig, f"< {d['target_seconds_1k_x_1k']:g} s; < {d['target_rss_gib']:g} GiB at 1k x 100k"


def search_row(results: list[dict]) -> tuple[str, str]:
    parts = []
    t = results[0]["targets"]
    for d in results:
        lat, st = d["latency_ms"], d["latency_ms"].get("stages_p50", {})
        ok = (lat["p50"] <= t["p50_ms"], lat["p95"] <= t["p95_ms"], d["same_top_set"] >= t["same_top_set"])
        head = "trained run" if d["args"].get("run") not in (None, "None") else "untrained head"
        stages = ", ".join(f"{k} {v:.0f} ms" for k, v in st.items())
        parts.append(
            f"**{int(d['args']['videos']):,} videos** ({head}, {d['index_report'].get('moments', 1)} stage-1 "
            f"vector(s) a video, {d['args']['candidates']} candidates, "
            f"{load_note(d)}): index {d['build_seconds']:.0f} s, {d['disk_bytes'] / 2**30:.2f} GiB; p50 "
            f"{lat['p50']:,.0f} ms / p95 {lat['p95']:,.0f} ms (CLIP text tower {lat.get('clip_text_p50', 0):,.0f} ms, "
            f"KeyBERT {lat.get('keywords_p50', 0):,.0f} ms; {stages}); same top-10 for {d['same_top_set']:.1%} "
            f"of {d['args']['queries']} queries: p50 {verdict(ok[0])}, p95 {verdict(ok[1])}, recall {verdict(ok[2])}")
    return "; ".join(parts), (f"p50 <= {t['p50_ms']:g} ms, p95 <= {t['p95_ms']:g} ms, same top-10 >= "
                              f"{t['same_top_set']:.0%} (at 100,000 videos)")


def stage1_row(d: dict) -> tuple[str, str]:
    parts = []
    least = min(r["candidates"] for r in d["results"])  # search's default; exact stage 1 at every count
    for r in d["results"]:
        if r["candidates"] != least and not r["index"].startswith("exact"):
            continue
        build = f", build {r['build_s']:.0f} s" if r["build_s"] else ""
        parts.append(f"{r['index']}, {r['candidates']} candidates: {r['kept']:.0%} ({r['query_ms_p50']:.0f} ms{build})")
    return (f"{int(d['args']['videos']):,} videos x {d['moments']} moments, {len(d['worst_rank'])} queries "
            f"({load_note(d)}): " + "; ".join(parts)), "none: explains `bench/search.py`'s recall"


def train_blocks_row(d: dict) -> tuple[str, str]:
    one = d["loader"]["1"]
    steps = ", ".join(f"K={k} {v['seconds']:.1f} s" for k, v in d["steps"].items())
    fig = (f"token loader {one['warm_batches_per_s']:.1f} batches/s warm, {one['cold_batches_per_s']:.1f} cold "
           f"(keeps a {one['step_kept_busy_ms']:.0f} ms step busy); a CPU step of batch "
           f"{d['args']['step_batch']}: {steps} ({load_note(d)})")
    return fig, "keeps a GPU step busy (not measured on a GPU)"


def cache_size_row(d: dict) -> tuple[str, str]:
    p = d["projection"]
    fig = (f"{d['per_frame']:,} B a cached frame, {d['per_text_token']:,} B a text token; MSR-VTT "
           f"({d['msrvtt']['videos']:,} videos, {d['msrvtt']['captions']:,} captions): {p['total_cache_GB_K1']:.1f} GB "
           f"at K=1, {p['total_cache_GB_K2']:.1f} GB at K=2 (plain shards {p['plain_shards_GB']:.1f} GB)")
    return fig, "printed"


def synthetic_row(d: dict) -> tuple[str, str]:
    rows = d["rows"]
    fig = ", ".join(f"{name} {r['t2v']['R1']:.1f}" for name, r in rows.items())
    return (f"t2v R@1 on the demo's set ({len(d['args']['seeds'])} seeds; run before the heads changed, "
            f"not rerun): {fig}"), "full above every row"


def rows() -> list[tuple[str, str, str, str]]:
    """(script, what it measures, figure, target) per bench script, in the README's order."""
    out = []

    def add(script, what, name, render, *extra):
        d = load(name) if isinstance(name, str) else name
        fig, target = render(d, *extra) if d else ("not run", "")
        out.append((script, what, fig, target))

    add("`bench/extract.py`", "`extract` as this README runs it (20 captions per video, 3 keywords each) on videos "
        "with natural-looking content vs the bare ViT-B/32 image tower, same batch and machine; model loading apart",
        "extract.json", extract_row)
    add("`bench/text.py`", "truncated text tower vs 77-token `encode_text` on 10-20-word captions; keyword stage",
        "text.json", text_row)
    add("`bench/train.py`", "the loader alone (B=128, 12 frames, 32 words) on MSR-VTT-sized shards (ViT-B/32 "
        "widths), read cold (page cache dropped)", "train.json", train_row)
    add("`bench/eval.py`", "`eval`'s path on features read from shards on disk (cold), full head at ViT-B/32 "
        "widths, CPU", "eval.json", eval_row, load("eval_100k.json"))
    searches = sorted((json.loads(p.read_text()) for p in RESULTS.glob("search_*.json")),
                      key=lambda d: int(d["args"]["videos"]))
    add("`bench/search.py`", "saved index + two-stage search (`Searcher`, the `search`/`serve` code) vs "
        "exhaustive full head on every video's codes; synthetic videos of 2-3 events, queries describing one "
        "event (stage 1 and the head can differ); D=512, 12 frames",
        searches or None, lambda ds: search_row(ds))
    add("`bench/stage1.py`", "share of queries whose exhaustive top 10 the stage-1 candidates contain, per stage-1 "
        "index (exact, FAISS IVF-Flat, HNSW), on `bench/search.py`'s collection and head", "stage1_100000.json",
        stage1_row)
    add("`bench/train_blocks.py`", "`train-heads --unfreeze-blocks`: the token loader and one `TunedHead` step at "
        "K = 0, 1, 2", "train_blocks.json", train_blocks_row)
    add("`bench/cache_size.py`", "bytes of `extract --cache-blocks K`, from the architecture and checked on a real "
        "shard", "cache_size.json", cache_size_row)
    add("`bench/synthetic.py`", "ablation table on the demo's synthetic set through `ablate`", "synthetic.json",
        synthetic_row)
    out.append(("`bench/grid.py`", "the full head against its parts on a held-out synthetic benchmark, several "
                "seeds and budgets", "see \"Training the full head\" below (`bench/summarise_grid.py` on "
                "`bench/results/issue12-*.jsonl`)", "full above every part by more than the seed spread"))
    return out


def render() -> str:
    lines = ["| script | what | figure | target |", "|---|---|---|---|"]
    lines += [f"| {s} | {w} | {f} | {t} |" for s, w, f, t in rows()]
    return "\n".join(lines)


def splice(readme: str, table: str) -> str:
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise SystemExit(f"{README}: expected one '{START}' line followed by one '{END}' line around the table")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="replace the table in README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md's table is out of date")
    args = ap.parse_args(argv)
    table = render()
    if not (args.write or args.check):
        print(table)
        return 0
    readme = README.read_text()
    new = splice(readme, table)
    if args.check:
        if new != readme:
            print(f"{README}: the Benchmarks table differs from bench/results/; run python bench/tables.py --write",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(f"wrote the Benchmarks table into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
