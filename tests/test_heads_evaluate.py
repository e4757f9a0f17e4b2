"""Chunked rank_all agrees exactly with ranks on the full score matrix."""
import itertools

import pytest
import torch

from heads.evaluate import rank_all, rank_small, score_matrix
from heads.metrics import dual_softmax, ranks_from_scores
from heads.model import TEXT_KEYS
from tests.test_heads_model import make_batch, make_model, single_thread  # noqa: F401

N_VIDEOS, N_TEXTS = 11, 23


def make_set(seed=0):
    """23 captions of 11 videos (every video has one, some several) and a chunked video reader."""
    texts = {k: v for k, v in make_batch(b=N_TEXTS, seed=seed).items() if k in TEXT_KEYS}
    videos = make_batch(b=N_VIDEOS, frames=8, seed=seed + 1)
    g = torch.Generator().manual_seed(seed)
    text_to_video = torch.cat([torch.arange(N_VIDEOS), torch.randint(0, N_VIDEOS, (N_TEXTS - N_VIDEOS,), generator=g)])
    text_to_video = text_to_video[torch.randperm(N_TEXTS, generator=g)]

    def video_chunks(size):
        def chunks():
            for s in range(0, N_VIDEOS, size):
                mask = videos["frame_mask"][s:s + size]
                width = int(mask.sum(1).max())  # each chunk padded only to its own longest video
                yield s, {"frames": videos["frames"][s:s + size, :width], "frame_mask": mask[:, :width]}
        return chunks

    return texts, text_to_video, video_chunks


@pytest.mark.parametrize("protocol", ["group", "caption"])
@pytest.mark.parametrize("dsl", [False, True])
@pytest.mark.parametrize("variant", ["full", "meanp"])
def test_rank_all_matches_ranks_on_the_full_matrix(dsl, variant, protocol):
    model = make_model(variant=variant)
    texts, text_to_video, video_chunks = make_set()
    full = score_matrix(model, texts, video_chunks(N_VIDEOS), N_VIDEOS, text_chunk=N_TEXTS)
    expected = ranks_from_scores(full, text_to_video, dsl=dsl, dsl_temp=100.0, v2t_protocol=protocol)
    result = rank_all(model, texts, text_to_video, video_chunks(3), N_VIDEOS, text_chunk=5, dsl=dsl, top_k=4,
                      v2t_protocol=protocol)
    assert torch.equal(result.t2v_ranks, expected[0]) and torch.equal(result.v2t_ranks, expected[1])
    assert 1 < result.t2v["MnR"] < N_VIDEOS  # an untrained head ranks neither perfectly nor worst
    ranked = dual_softmax(full, 100.0)[0] if dsl else full
    top = ranked.topk(4, dim=1)
    assert torch.equal(result.top_k_indices, top.indices)
    torch.testing.assert_close(result.top_k_scores, top.values)
    small = rank_small(model, texts, text_to_video, video_chunks(4), N_VIDEOS, dsl=dsl, v2t_protocol=protocol)
    assert small.as_dict() == result.as_dict()


def test_a_head_with_nan_weights_ranks_every_query_last():
    """A dead model must not look perfect: before, every NaN tie ranked first and R@1 was 100."""
    model = make_model()
    texts, text_to_video, video_chunks = make_set()
    with torch.no_grad():
        model.pool.linear.weight.fill_(float("nan"))
    result = rank_all(model, texts, text_to_video, video_chunks(4), N_VIDEOS, text_chunk=7)
    assert result.t2v["R1"] == 0.0 and result.v2t["R1"] == 0.0
    assert result.t2v_ranks.tolist() == [N_VIDEOS] * N_TEXTS and result.v2t_ranks.tolist() == [N_VIDEOS] * N_VIDEOS
    assert result.non_finite == N_TEXTS


def test_rank_all_scores_only_chunk_sized_blocks_and_restores_train_mode():
    model = make_model()
    texts, text_to_video, video_chunks = make_set(seed=3)
    shapes, score = [], model.score
    model.score = lambda t, v: shapes.append((len(t), len(v))) or score(t, v)
    model.train()
    rank_all(model, texts, text_to_video, video_chunks(4), N_VIDEOS, text_chunk=6, dsl=True)
    assert shapes and max(s[0] for s in shapes) <= 6 and max(s[1] for s in shapes) <= 4
    assert model.training


def test_rank_all_rejects_a_reader_that_skips_videos():
    model = make_model()
    texts, text_to_video, video_chunks = make_set()
    first_two_chunks = lambda: itertools.islice(video_chunks(4)(), 2)  # noqa: E731
    with pytest.raises(ValueError, match="yielded 8 videos"):
        rank_all(model, texts, text_to_video, first_two_chunks, N_VIDEOS)


@pytest.mark.parametrize("dsl", [False, True])
def test_videos_are_encoded_once_when_they_fit_the_cache_and_per_pass_when_not(dsl):
    """Every pass needs every encoded video: kept from the first pass within video_cache_bytes, encoded again
    on each pass beyond it; the ranks are the same either way."""
    model = make_model()
    texts, text_to_video, video_chunks = make_set(seed=5)
    calls, encode = [], model.encode_video
    model.encode_video = lambda *a: calls.append(len(a[0])) or encode(*a)
    passes = 3 if dsl else 2
    results = {}
    for budget in (1 << 30, 1, 0):  # fits, too small for even one chunk, off
        calls.clear()
        results[budget] = rank_all(model, texts, text_to_video, video_chunks(4), N_VIDEOS, text_chunk=7, dsl=dsl,
                                   top_k=3, video_cache_bytes=budget)
        assert sum(calls) == N_VIDEOS * (1 if budget == 1 << 30 else passes), budget
    for r in results.values():
        assert torch.equal(r.t2v_ranks, results[0].t2v_ranks) and torch.equal(r.v2t_ranks, results[0].v2t_ranks)
        assert torch.equal(r.top_k_indices, results[0].top_k_indices)


def test_texts_are_scored_by_length_in_trimmed_chunks_and_returned_in_their_order():
    """score_matrix and rank_all sort texts by length and cut each chunk to its longest caption (by_length,
    _encode_texts); every row must still be its own text's, equal to scoring all texts at full width."""
    from heads.evaluate import _encode_texts, by_length
    model = make_model()
    texts, text_to_video, video_chunks = make_set()
    lengths = texts["token_mask"].sum(1)
    assert len(set(lengths.tolist())) > 3  # captions of several lengths
    model.eval()
    with torch.no_grad():
        video = model.encode_video(*(make_batch(b=N_VIDEOS, frames=8, seed=1)[k] for k in ("frames", "frame_mask")))
        direct = model.score(model.encode_text(*(texts[k] for k in TEXT_KEYS)), video)
        order = by_length(texts)
        chunks = _encode_texts(model, texts, 5, "cpu", order)
    assert [int(t.mask.shape[1]) for _, t in chunks] == [int(lengths[order[s:s + 5]].max()) for s, _ in chunks]
    torch.testing.assert_close(score_matrix(model, texts, video_chunks(4), N_VIDEOS, text_chunk=5), direct,
                               rtol=1e-5, atol=1e-5)
