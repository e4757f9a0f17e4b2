"""Searching a collection: the parts that `search`, `serve` and the HTML report share.

    codes.py     what the head computes once per video or caption, without the query (and the stage-1 vectors)
    scorer.py    the full head on stored codes: the one scoring loop, with each hit's best frame
    index.py     the saved index beside the features: codes on disk, the stage-1 FAISS (or exact) index
    query.py     the query encoders (CLIP text and video, as extraction made the features)
    searcher.py  loaded once, answers text and video queries: stage 1, then the full head
    page.py      the printed table, thumbnails and the self-contained HTML report
    serve.py     the HTTP server (FastAPI and uvicorn, the optional [serve] extra) and its page in static/
"""

# Defaults shared by `index`, `search`, `serve` and the library (kept here, free of torch, for the CLI).
# Measured on bench/search.py's 100,000-video collection with a trained full head (bench/stage1.py): stage 1
# keeps every query's exhaustive top 10 among its candidates for 90% of queries at 200 candidates and for 100%
# at 500 when it is exact (a matmul over 400,000 rows: 33 ms a query on a quiet 2-core CPU); no approximate
# index tried kept more than 92% at any candidate count (IVF, HNSW: the lost videos sit in lists far from the
# query), so stage 1 is exact up to EXACT_BELOW rows (videos x moments, 1.6 GiB of float32 at 1,024 wide).
CANDIDATES = 500  # stage-1 candidates the full head scores per query
EXACT_BELOW = 500_000  # stage-1 rows searched exactly below this; a FAISS inverted file (IVF-Flat) at and above


class SearchError(ValueError):
    """A query, collection, index or run that cannot be searched; the message says which and why."""
