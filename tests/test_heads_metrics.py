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
