"""Keyword stage: K keywords of at most L words, lemmatised, offline model."""
from __future__ import annotations

import pytest

from pipeline.keywords import KeywordExtractor, KeywordSpec, lemmatize


@pytest.fixture(scope="module")
def extractor():
    return KeywordExtractor(KeywordSpec(top_k=3, max_words=1))


def test_keywords_are_lemmatised(extractor):
    (kws,) = extractor(["the dogs are running across the parks"])
    assert 1 <= len(kws) <= 3
    assert "dogs" not in kws and "dog" in kws
    assert all(" " not in k for k in kws)
    assert lemmatize("running dogs", "en") == "run dog"


def test_batch_with_a_caption_without_keywords(extractor):
    out = extractor(["the the the", "a woman plays the violin", ""])
    assert out[0] == [] and out[2] == []
    assert "violin" in out[1]


def test_keyword_length_and_count():
    two = KeywordExtractor(KeywordSpec(top_k=2, max_words=2))
    (kws,) = two(["a red car drives quickly down a mountain road at night"])
    assert len(kws) == 2 and all(len(k.split()) <= 2 for k in kws)
