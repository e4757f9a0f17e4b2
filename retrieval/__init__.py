"""Searching a collection: the parts that `search`, `serve` and the HTML report share.

    codes.py     what the head computes once per video or caption, without the query (and the stage-1 vectors)
    scorer.py    the full head on stored codes: the one scoring loop, with each hit's best frame
    index.py     the saved index beside the features: codes on disk, the stage-1 FAISS (or exact) index
    query.py     the query encoders (CLIP text and video, as extraction made the features)
    searcher.py  loaded once, answers text and video queries: stage 1, then the full head
    page.py      the printed table, thumbnails and the self-contained HTML report
    serve.py     the HTTP server (FastAPI and uvicorn, the optional [serve] extra) and its page in static/
"""


class SearchError(ValueError):
    """A query, collection, index or run that cannot be searched; the message says which and why."""
