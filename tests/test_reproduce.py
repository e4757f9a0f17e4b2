"""README "Reproducing the published rows", end to end through the CLI on a few short videos.

Every command run here is a command of that README section, read from README.md itself: the
test changes only the model (the tiny random CLIP of `tiny_extract_args` instead of ViT-B/32
`openai`, which cannot be downloaded here), sizes (1 epoch, batch 4, extract batch 16) and where
it runs (`--device cpu`, `extract --cluster none`, `--quiet`); see `adapt`. The paths are the
README's own, relative to a temporary folder the commands run in, which the test fills with
annotation files in the peers' formats under the published names and real short videos named as
the datasets name them. Edit a command in the README and this test runs the edited command.
"""
from __future__ import annotations

import csv
import json
import pickle
import re
import shlex
from pathlib import Path

from tests.conftest import ROOT, TINY_MODEL, make_video, run_cli, tiny_extract_args

SECTION = "### Reproducing the published rows"
VARIANTS = ("meanp", "seqtransf", "full")


# ---------------------------------------------------------------------------------------------
# The README's commands


def readme_blocks() -> dict[str, list[list[str]]]:
    """The section's code blocks, keyed by the features folder their `extract` writes; each
    command as argv after `python cli.py`."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION) + len(SECTION)
    end = re.search(r"^#{2,3} ", text[start:], re.M)
    body = text[start:start + end.start()] if end else text[start:]
    blocks = {}
    for code in re.findall(r"^```[^\n]*\n(.*?)^```", body, re.S | re.M):
        lines = code.replace("\\\n", " ").splitlines()
        commands = [shlex.split(line)[2:] for line in lines if line.strip().startswith("python cli.py")]
        if commands:
            extract = next(c for c in commands if c[0] == "extract")
            blocks[option(extract, "--out")] = commands
    return blocks


def option(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def without(cmd: list[str], *names: str) -> list[str]:
    """cmd without the options `names` and their values."""
    out, skip = [], False
    for arg in cmd:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        else:
            out.append(arg)
    return out


def adapt(cmd: list[str]) -> list[str]:
    """The README command with only the model, sizes and device changed (paths unchanged)."""
    if cmd[0] == "extract":
        # The README spells out the weights the published rows need; here: the tiny random CLIP.
        assert (option(cmd, "--model"), option(cmd, "--pretrained")) == ("ViT-B-32", "openai"), cmd
        rest = without(cmd[2:], "--model", "--pretrained", "--out")
        return tiny_extract_args(Path(cmd[1]), Path(option(cmd, "--out")), *rest,
                                 "--cluster", "none", "--device", "cpu")
    if cmd[0] == "train-heads":
        return [*cmd, "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
    if cmd[0] == "eval":
        return [*cmd, "--device", "cpu"]
    assert cmd[0] == "prepare", cmd
    return cmd


def run_block(commands: list[list[str]], cwd: Path) -> None:
    for cmd in commands:
        res = run_cli(*adapt(cmd), cwd=cwd)
        assert res.returncode == 0, f"{shlex.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"


def prepare_paths(commands: list[list[str]], cwd: Path) -> tuple[Path, Path, Path]:
    """(annotations given to prepare, --videos-dir, captions written) of a block, under cwd."""
    prep = commands[0]
    assert prep[0] == "prepare", prep
    videos = cwd / option(prep, "--videos-dir")
    extract = next(c for c in commands if c[0] == "extract")
    assert cwd / extract[1] == videos and option(extract, "--captions") == option(prep, "--out"), extract
    return cwd / prep[2], videos, cwd / option(prep, "--out")


def report(captions: Path) -> dict:
    return json.loads(captions.with_suffix(".prepare.json").read_text())


def eval_json(cmd: list[str], cwd: Path) -> dict:
    """The metrics JSON an `eval` command of the README wrote."""
    assert cmd[0] == "eval"
    path = option(cmd, "--json") or f"{option(cmd, '--run')}/eval_{option(cmd, '--split') or 'test'}.json"
    return json.loads((cwd / path).read_text())


def check_eval(metrics: dict, t2v_queries: int, videos: int) -> None:
    assert metrics["split"] == "test" and metrics["model"] == TINY_MODEL
    assert metrics["v2t_protocol"] == "group"
    assert metrics["queries"] == {"t2v": t2v_queries, "v2t": videos}
    assert metrics["candidates"] == {"t2v": videos, "v2t": videos}
    for side in ("t2v", "v2t"):
        assert set(metrics[side]) == {"R1", "R5", "R10", "MdR", "MnR"}
        assert 0 <= metrics[side]["R1"] <= metrics[side]["R5"] <= metrics[side]["R10"] <= 100


def test_readme_section_has_the_four_chains():
    blocks = readme_blocks()
    assert set(blocks) == {"features/msrvtt", "features/msrvtt-1k", "features/msvd", "features/msvd-clip4clip"}
    msrvtt = blocks["features/msrvtt"]
    assert [c[0] for c in msrvtt] == ["prepare", "extract", "eval"] + ["train-heads", "eval"] * 3
    assert "--run" not in msrvtt[2] and option(msrvtt[0], "--train-split") == "9k"
    assert [option(c, "--variant") for c in msrvtt[3::2]] == list(VARIANTS)
    for train, ev in zip(msrvtt[3::2], msrvtt[4::2]):
        assert option(ev, "--run") == option(train, "--out") and option(ev, "--split") == "test"
    for key in ("features/msrvtt-1k", "features/msvd", "features/msvd-clip4clip"):
        assert [c[0] for c in blocks[key]] == ["prepare", "extract", "eval"]
        assert "--run" not in blocks[key][2] and option(blocks[key][2], "--split") == "test"


# ---------------------------------------------------------------------------------------------
# Annotation files in the peers' formats, and videos named as the datasets name them

MSRVTT_TRAIN = [f"video{i}" for i in range(4)]
MSRVTT_TEST = ["video7010", "video7020", "video7030", "video7040"]  # 1k-A ids look like these
THINGS = ["a dog runs in a park", "a man is cooking pasta", "children play football on a beach",
          "a woman sings on stage", "two cars race on a wet road", "a cat sleeps on a sofa",
          "a chef slices onions", "people dance at a wedding", "a boy rides a bicycle",
          "a news anchor talks about the weather"]
SOURCES = ["testsrc2", "testsrc", "smptebars", "rgbtestsrc", "yuvtestsrc", "pal75bars"]


def videos(folder: Path, names: list[str], suffix: str, extra: list[str] | None = None) -> None:
    for k, name in enumerate(names):
        make_video(folder / f"{name}{suffix}", seconds=1.5 + k % 2, size="96x72", rate=10,
                   source=SOURCES[k % len(SOURCES)], extra=extra)


def msrvtt_captions(video: str) -> list[str]:
    k = int(video[5:]) % len(THINGS)
    return [f"{THINGS[k]}", f"{THINGS[k]} while it rains", f"in this clip {THINGS[k]}"]


def write_jsfusion(path: Path) -> None:
    """MSRVTT_JSFUSION_test.csv: key, vid_key, video_id, sentence; one sentence per video."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        for i, video in enumerate(MSRVTT_TEST):
            w.writerow([f"ret{i}", f"msr{video[5:]}", video, msrvtt_captions(video)[0]])


def write_msrvtt(folder: Path) -> None:
    """CLIP4Clip's msrvtt_data.zip: MSRVTT_data.json (every video's sentences, 20 in the real
    file, 3 here), MSRVTT_train.9k.csv (column video_id), MSRVTT_JSFUSION_test.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    everything = MSRVTT_TRAIN + MSRVTT_TEST
    data = {
        "info": {"contributor": "Microsoft MSM group", "year": "2016"},
        "videos": [{"category": 0, "url": f"https://www.youtube.com/watch?v={v}", "video_id": v,
                    "start time": 0.0, "end time": 3.0, "split": "train" if v in MSRVTT_TRAIN else "test",
                    "id": int(v[5:])} for v in everything],
        "sentences": [{"caption": c, "video_id": v, "sen_id": n}
                      for n, (v, c) in enumerate((v, c) for v in everything for c in msrvtt_captions(v))],
    }
    (folder / "MSRVTT_data.json").write_text(json.dumps(data))
    (folder / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(v + "\n" for v in MSRVTT_TRAIN))
    write_jsfusion(folder / "MSRVTT_JSFUSION_test.csv")


# MSVD clip names: YouTube id, start and end second; many ids begin with '-' (the first is real).
MSVD_TRAIN = ["-4wsuPCjDBc_5_15", "0lh_UWF9ZP4_62_69", "1dfR0A_BXjw_590_600"]
MSVD_TEST = ["-8y1Q0rA3n8_108_115", "2fKFmWXLZNE_20_30", "-Cv5LsqKUXc_17_25"]
MSVD_CAPTIONS = {  # X-Pool's wording: lower case, no punctuation; several captions per video
    "-4wsuPCjDBc_5_15": ["a man is playing a guitar", "someone plays the guitar"],
    "0lh_UWF9ZP4_62_69": ["a woman is slicing a tomato", "a lady cuts a tomato", "tomatoes are cut"],
    "1dfR0A_BXjw_590_600": ["a cat is jumping", "a kitten jumps onto a box"],
    "-8y1Q0rA3n8_108_115": ["a monkey is eating", "a monkey eats a banana"],
    "2fKFmWXLZNE_20_30": ["a boy is swimming", "a child swims in a pool", "a kid swims"],
    "-Cv5LsqKUXc_17_25": ["a car is driving on a road", "a red car drives", "a car moves fast",
                          "someone drives a car"],
}


def write_msvd_xpool(folder: Path) -> None:
    """X-Pool's data/MSVD/: captions_msvd.json (id -> captions), train_list.txt, test_list.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "captions_msvd.json").write_text(json.dumps(MSVD_CAPTIONS))
    (folder / "train_list.txt").write_text("".join(v + "\n" for v in MSVD_TRAIN))
    (folder / "test_list.txt").write_text("".join(v + "\n" for v in MSVD_TEST))


def write_msvd_clip4clip(folder: Path) -> None:
    """CLIP4Clip's msvd_data.zip: raw-captions.pkl (id -> token lists), train/val/test lists."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = {v: [c.split() for c in caps] for v, caps in MSVD_CAPTIONS.items()}
    (folder / "raw-captions.pkl").write_bytes(pickle.dumps(tokens))
    (folder / "train_list.txt").write_text("".join(v + "\n" for v in MSVD_TRAIN[:2]))
    (folder / "val_list.txt").write_text(MSVD_TRAIN[2] + "\n")
    (folder / "test_list.txt").write_text("".join(v + "\n" for v in MSVD_TEST))


# ---------------------------------------------------------------------------------------------
# The chains


def test_msrvtt_9k_zero_shot_and_trained_heads(tmp_path):
    commands = readme_blocks()["features/msrvtt"]
    annotations, video_dir, captions = prepare_paths(commands, tmp_path)
    write_msrvtt(annotations)
    videos(video_dir, MSRVTT_TRAIN + MSRVTT_TEST, ".mp4")

    run_block(commands, tmp_path)

    splits = report(captions)["splits"]
    assert splits["train"] == {"videos": len(MSRVTT_TRAIN), "captions": 3 * len(MSRVTT_TRAIN)}
    assert splits["test"] == {"videos": len(MSRVTT_TEST), "captions": len(MSRVTT_TEST)}  # 1k-A: one a video
    assert splits["val"] == {"videos": 0, "captions": 0}
    n = len(MSRVTT_TEST)
    zero_shot = eval_json(commands[2], tmp_path)
    check_eval(zero_shot, n, n)
    assert zero_shot["run"] is None
    for train, ev in zip(commands[3::2], commands[4::2]):
        run = tmp_path / option(train, "--out")
        config = json.loads((run / "config.json").read_text())
        assert config["run"]["head"]["variant"] == option(train, "--variant")
        assert (run / "last.pt").exists() and not (run / "best.pt").exists()  # no val split on MSR-VTT
        metrics = eval_json(ev, tmp_path)
        check_eval(metrics, n, n)
        assert metrics["checkpoint"].endswith("last.pt")
        if option(train, "--variant") == "meanp":
            # The README's claim: on frozen features meanP trains only the temperature, so its
            # ranks are the zero-shot ranks.
            assert (metrics["t2v"], metrics["v2t"]) == (zero_shot["t2v"], zero_shot["v2t"])


def test_msrvtt_jsfusion_alone_zero_shot(tmp_path):
    commands = readme_blocks()["features/msrvtt-1k"]
    test_csv, video_dir, captions = prepare_paths(commands, tmp_path)
    assert test_csv.name == "MSRVTT_JSFUSION_test.csv"
    write_jsfusion(test_csv)
    videos(video_dir, MSRVTT_TEST, ".mp4")

    run_block(commands, tmp_path)

    prepared = report(captions)
    assert prepared["splits"]["test"] == {"videos": len(MSRVTT_TEST), "captions": len(MSRVTT_TEST)}
    assert prepared["splits"]["train"]["captions"] == 0
    assert any("zero-shot" in note for note in prepared["notes"])
    check_eval(eval_json(commands[2], tmp_path), len(MSRVTT_TEST), len(MSRVTT_TEST))


def test_msvd_xpool_and_clip4clip_zero_shot(tmp_path):
    blocks = readme_blocks()
    n_captions = sum(len(MSVD_CAPTIONS[v]) for v in MSVD_TEST)
    results = []
    for key, write in (("features/msvd", write_msvd_xpool), ("features/msvd-clip4clip", write_msvd_clip4clip)):
        commands = blocks[key]
        annotations, video_dir, captions = prepare_paths(commands, tmp_path)
        write(annotations)
        if not video_dir.exists():  # both blocks read the same clips; AVI, as MSVD's YouTubeClips
            videos(video_dir, MSVD_TRAIN + MSVD_TEST, ".avi", extra=["-c:v", "mpeg4", "-q:v", "5"])

        run_block(commands, tmp_path)

        assert report(captions)["splits"]["test"] == {"videos": len(MSVD_TEST), "captions": n_captions}
        metrics = eval_json(commands[2], tmp_path)
        # Every caption is a t2v query; v2t ranks each video's caption group among the groups.
        check_eval(metrics, n_captions, len(MSVD_TEST))
        results.append((metrics["t2v"], metrics["v2t"]))
    # The two publishers' files hold the same test captions here (the pickle's tokens joined are
    # X-Pool's strings), so the two chains must give the same numbers.
    assert results[0] == results[1]
