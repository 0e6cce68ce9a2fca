"""Learning quality, measured as a stream is served: ``recstream eval`` and ``bench/quality.py``.

Above the service's packages, as the command line is: it learns through the service's own state
(``stream.state.RecState``) and ranks with its recommender (``index.query``), so what it measures
is what runs; nothing in ``embeddings``, ``index`` or ``stream`` imports it but the CLI's ``eval``.

- ``evaluation.prequential``: explicit and implicit feedback, prequential and held-out split,
  beside river's BiasedMF, popularity and ALS;
- ``evaluation.session``: next click in a session, beside popularity, SR and V-SKNN.
"""
