"""Metrics and ranks, worked out by hand on small matrices."""
import pytest
import torch

from heads.metrics import dual_softmax, metrics_from_ranks, ranks_from_scores


def test_metrics_from_ranks_by_hand():
    m = metrics_from_ranks(torch.tensor([1, 3, 12, 7, 2]))
    assert m == {"R1": 20.0, "R5": 60.0, "R10": 80.0, "MdR": 3.0, "MnR": 5.0, "n": 5}


def test_median_of_an_even_count_is_the_midpoint():
    assert metrics_from_ranks(torch.tensor([1, 2, 4, 9]))["MdR"] == 3.0


def test_perfect_ranking():
    t2v, v2t = ranks_from_scores(torch.eye(4), torch.arange(4))
    assert t2v.tolist() == v2t.tolist() == [1, 1, 1, 1]
    assert metrics_from_ranks(t2v)["R1"] == 100.0


def test_worst_ranking():
    t2v, v2t = ranks_from_scores(-torch.eye(3), torch.arange(3))
    assert t2v.tolist() == v2t.tolist() == [3, 3, 3]
    m = metrics_from_ranks(t2v)
    assert (m["R1"], m["R5"], m["MdR"], m["MnR"]) == (0.0, 100.0, 3.0, 3.0)


def test_ties_count_in_the_query_favour():
    scores = torch.tensor([[0.5, 0.5, 0.2],
                           [0.3, 0.3, 0.3],
                           [0.9, 0.1, 0.4]])
    t2v, v2t = ranks_from_scores(scores, torch.arange(3))
    assert t2v.tolist() == [1, 1, 2]  # text 2: only video 0 is strictly higher
    # columns: video 0 [0.5, 0.3, 0.9] (0.9 beats 0.5), video 1 [0.5, 0.3, 0.1], video 2 [0.2, 0.3, 0.4]
    assert v2t.tolist() == [2, 2, 1]


def test_multi_caption_v2t_uses_the_best_own_caption():
    scores = torch.tensor([[0.9, 0.1],   # captions 0, 1 describe video 0; captions 2, 3 video 1
                           [0.2, 0.8],
                           [0.3, 0.7],
                           [0.6, 0.4]])
    t2v, v2t = ranks_from_scores(scores, torch.tensor([0, 0, 1, 1]))
    assert t2v.tolist() == [1, 2, 1, 2]
    assert v2t.tolist() == [1, 2]  # video 1: best own caption 0.7, beaten by caption 1's 0.8
    m = metrics_from_ranks(t2v)
    assert (m["R1"], m["MdR"], m["MnR"]) == (50.0, 1.5, 1.5)


def test_a_video_without_captions_is_an_error():
    with pytest.raises(ValueError, match="no caption"):
        ranks_from_scores(torch.rand(2, 3), torch.tensor([0, 1]))


def test_dual_softmax_normalises_t2v_over_texts_and_v2t_over_videos():
    scores = torch.rand(5, 4)
    t2v, v2t = dual_softmax(scores, temp=10.0)
    torch.testing.assert_close(t2v, scores * torch.softmax(scores * 10, dim=0))
    torch.testing.assert_close(v2t, scores * torch.softmax(scores * 10, dim=1))


def test_dsl_lets_a_video_claimed_by_a_better_text_drop():
    scores = torch.tensor([[0.5, 0.6],   # text 0 prefers video 1, but text 1 matches video 1 far better
                           [0.1, 0.9]])
    assert ranks_from_scores(scores, torch.arange(2))[0].tolist() == [2, 1]
    assert ranks_from_scores(scores, torch.arange(2), dsl=True)[0].tolist() == [1, 1]


# ---- the peers' protocol, implemented a second time, naively --------------------------------------------
import math  # noqa: E402

import numpy as np  # noqa: E402


def sort_based_ranks(square: np.ndarray) -> np.ndarray:
    """CLIP4Clip's compute_metrics: sort each row, rank = first position of the row's diagonal entry + 1."""
    ordered = np.sort(-square, axis=1)
    own = -np.diag(square)[:, None]
    rows, cols = np.where(ordered == own)
    first = {}
    for r, c in zip(rows, cols):
        first.setdefault(r, c)
    return np.array([first[r] + 1 for r in range(len(square))])


def naive_ranks(scores: np.ndarray, text_to_video: np.ndarray):
    """t2v: each caption's row with its own video moved to the diagonal position; v2t: CLIP4Clip's
    tensor_video_to_text_sim (captions grouped per video, padded with -inf, max over the group, transposed)."""
    n_texts, n_videos = scores.shape
    t2v = []
    for t in range(n_texts):
        row = scores[t]
        own = text_to_video[t]
        order = [own] + [v for v in range(n_videos) if v != own]
        square = np.full((1, n_videos), -np.inf)
        square[0] = row[order]
        t2v.append(sort_based_ranks(np.vstack([square])))
    width = max(np.bincount(text_to_video, minlength=n_videos))
    grouped = np.full((n_videos, width, n_videos), -np.inf)
    filled = np.zeros(n_videos, int)
    for t in range(n_texts):
        v = text_to_video[t]
        grouped[v, filled[v]] = scores[t]
        filled[v] += 1
    v2t = sort_based_ranks(grouped.max(axis=1).T)
    return np.concatenate(t2v), v2t


@pytest.mark.parametrize("shape,seed", [((7, 7), 0), ((23, 11), 1), ((40, 9), 2), ((5, 5), 3), ((60, 13), 4)])
def test_group_protocol_agrees_with_a_naive_sort_based_implementation(shape, seed):
    g = torch.Generator().manual_seed(seed)
    n_texts, n_videos = shape
    text_to_video = torch.cat([torch.arange(n_videos), torch.randint(0, n_videos, (n_texts - n_videos,), generator=g)])
    text_to_video = text_to_video[torch.randperm(n_texts, generator=g)]
    scores = (torch.rand(n_texts, n_videos, generator=g, dtype=torch.float64) * 8).round() / 8  # many ties
    t2v, v2t = ranks_from_scores(scores, text_to_video)
    naive_t2v, naive_v2t = naive_ranks(scores.numpy(), text_to_video.numpy())
    assert t2v.tolist() == naive_t2v.tolist()
    assert v2t.tolist() == naive_v2t.tolist()


def test_group_protocol_by_hand_with_groups_of_unequal_size():
    # video 0 has captions 0, 1, 2; video 1 caption 3; video 2 captions 4, 5
    scores = torch.tensor([[0.2, 0.9, 0.1],
                           [0.6, 0.3, 0.0],
                           [0.1, 0.1, 0.7],
                           [0.5, 0.4, 0.3],
                           [0.0, 0.2, 0.35],
                           [0.3, 0.8, 0.1]])
    text_to_video = torch.tensor([0, 0, 0, 1, 2, 2])
    # groups against video 0: g0 = 0.6 (own), g1 = 0.5, g2 = 0.3 -> rank 1
    # against video 1: g0 = 0.9, g1 = 0.4 (own), g2 = 0.8 -> rank 3
    # against video 2: g0 = 0.7, g1 = 0.3, g2 = 0.35 (own) -> rank 2
    assert ranks_from_scores(scores, text_to_video)[1].tolist() == [1, 3, 2]
    # the stricter caption protocol ranks the best own caption among all other captions
    # video 1: 0.4 beaten by 0.9 and 0.8 -> 3; video 2: 0.35 beaten by caption 2's 0.7 -> 2
    assert ranks_from_scores(scores, text_to_video, v2t_protocol="caption")[1].tolist() == [1, 3, 2]
    scores[1, 2] = 0.36  # another caption of video 0 beats video 2's own: counts once per group, twice per caption
    assert ranks_from_scores(scores, text_to_video)[1].tolist() == [1, 3, 2]
    assert ranks_from_scores(scores, text_to_video, v2t_protocol="caption")[1].tolist() == [1, 3, 3]


def test_an_unknown_protocol_is_an_error():
    with pytest.raises(ValueError, match="protocol"):
        ranks_from_scores(torch.rand(3, 3), torch.arange(3), v2t_protocol="best")


def test_nan_scores_never_count_in_the_query_favour():
    nan = math.nan
    scores = torch.tensor([[nan, 0.1, 0.2],   # own NaN -> last
                           [0.3, 0.5, nan],   # a NaN competitor beats the own 0.5
                           [0.1, 0.2, 0.9]])
    t2v, v2t = ranks_from_scores(scores, torch.arange(3))
    assert t2v.tolist() == [3, 2, 1]
    assert v2t.tolist() == [3, 1, 2]  # video 2's column holds a NaN (text 1): it beats the own 0.9
    dead = torch.full((4, 4), nan)
    t2v, v2t = ranks_from_scores(dead, torch.arange(4))
    assert t2v.tolist() == v2t.tolist() == [4, 4, 4, 4]
    assert metrics_from_ranks(t2v)["R1"] == 0.0


def test_infinite_scores_rank_last_too():
    scores = torch.tensor([[math.inf, 0.1], [0.2, 0.3]])
    assert ranks_from_scores(scores, torch.arange(2))[0].tolist() == [2, 1]
    scores = torch.tensor([[0.5, math.inf], [0.2, 0.3]])  # a +inf competitor ranks above
    assert ranks_from_scores(scores, torch.arange(2))[0].tolist() == [2, 1]


def test_dsl_worked_example_as_camoe_defines_it():
    """CAMoE / CLIP4Clip DSL: sim * softmax(sim * temp) over the *query* axis of the other direction.
    t2v ranks videos for a text with priors normalised over texts (dim 0); worked by hand at temp 1."""
    scores = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    t2v, v2t = dual_softmax(scores, temp=1.0)
    e = math.e
    col0 = [e / (e + 1), 1 / (e + 1)]            # softmax over texts of column 0 (scores 1, 0)
    col1 = [e ** 2 / (e ** 2 + e ** 3), e ** 3 / (e ** 2 + e ** 3)]
    expected_t2v = torch.tensor([[1.0 * col0[0], 2.0 * col1[0]], [0.0 * col0[1], 3.0 * col1[1]]])
    torch.testing.assert_close(t2v, expected_t2v)
    row0 = [e / (e + e ** 2), e ** 2 / (e + e ** 2)]  # softmax over videos of row 0 (scores 1, 2)
    row1 = [1 / (1 + e ** 3), e ** 3 / (1 + e ** 3)]
    expected_v2t = torch.tensor([[1.0 * row0[0], 2.0 * row0[1]], [0.0 * row1[0], 3.0 * row1[1]]])
    torch.testing.assert_close(v2t, expected_v2t)
