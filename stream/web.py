"""The HTTP side of a running service: /metrics, /healthz, /readyz, /recommend, /similar, / (status page).

Served by the standard library's ThreadingHTTPServer in a daemon thread. The
endpoints are few, small and synchronous, and each answer is a read of the
live model under its lock, so an asyncio server (aiohttp, uvicorn) would add
a dependency and an event loop in a second thread without making any answer
faster; a thread per connection is fine for probes, a scraper and a modest
query load. The consumer never waits for the HTTP side except for the model
lock, which a query holds for one recommendation (measured in bench/http.py).
"""

from __future__ import annotations

import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import orjson
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from recstream.index.query import Recommender
from recstream.index.refresh import BuiltIndex
from recstream.stream.config import HttpConfig
from recstream.stream.metrics import ServiceMetrics
from recstream.stream.status_page import PAGE, StatusHistory

if TYPE_CHECKING:
    from recstream.stream.service import RecStreamService

log = logging.getLogger(__name__)

# /similar: candidates fetched from the index per wanted item, then re-scored on the live vectors.
SIMILAR_FETCH_FACTOR = 3


def recommendation_message(recommender: Recommender, model_lock: threading.Lock, index: BuiltIndex | None,
                           user_id: str, k: int, now_ms: int) -> dict | None:
    """The user's top ``k`` now, in the output topic's message shape; None for a user never seen.

    ``now_ms`` is the event time short-term interest is faded to (the newest event applied).
    """
    model = recommender.model
    with model_lock:
        row = model.users.ids.get(user_id)
        if row is None:
            return None
        recs = recommender.recommend(np.array([row], dtype=np.int64), index, now_ms)
        model_version = model.model_version
        rows, scores = recs.of(0)
        item_rows, scores = rows[:k].tolist(), scores[:k].tolist()
        item_ids = model.items.ids.ids_of(item_rows)
    return {"user_id": user_id, "items": [{"item_id": i, "score": s} for i, s in zip(item_ids, scores)],
            "index_version": index.version if index else 0, "model_version": model_version,
            "generated_at": int(time.time() * 1000), "last_event_ts": now_ms}


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.status, self.body = status, {"error": message, **fields}


def _k(query: dict[str, list[str]], limit: int) -> int:
    raw = query.get("k", [str(limit)])[-1]
    try:
        k = int(raw)
    except ValueError:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"k must be an integer, got {raw!r}") from None
    if not 1 <= k <= limit:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"k must be from 1 to {limit}", k=k)
    return k


class ServiceHttp:
    """Answers HTTP requests from a :class:`RecStreamService`'s live state.

    Use as a context manager around ``service.run()``; ``address`` is where it
    listens (port 0 in the config means no server; tests pass a free port).
    """

    def __init__(self, service: RecStreamService, config: HttpConfig | None = None,
                 sample_interval_s: float = 2.0) -> None:
        self.service = service
        self.config = config or service.config.http
        self.metrics = ServiceMetrics(service)
        service.metrics = self.metrics
        self.history = StatusHistory(self, sample_interval_s)
        self.started_at = time.monotonic()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ServiceHttp:
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a scraper or a client reuses its connection

            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                app.handle(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("%s " + format, self.address_string(), *args)

        self._server = ThreadingHTTPServer((self.config.host, self.config.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()
        self.history.start()
        log.info("HTTP on %s (/metrics /healthz /readyz /recommend/USER /similar/ITEM /)", self.address)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self.history.stop()
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> ServiceHttp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- routing -----------------------------------------------------------------------------------

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        url = urlsplit(request.path)
        path, query = url.path, parse_qs(url.query)
        try:
            if path == "/metrics":
                status, ctype, body = HTTPStatus.OK, CONTENT_TYPE_LATEST, self.metrics.exposition()
            elif path == "/healthz":
                status, payload = self.health()
                ctype, body = "application/json", orjson.dumps(payload)
            elif path == "/readyz":
                status, payload = self.readiness()
                ctype, body = "application/json", orjson.dumps(payload)
            elif path == "/":
                status, ctype, body = HTTPStatus.OK, "text/html; charset=utf-8", PAGE.encode()
            elif path == "/status.json":
                status, ctype, body = HTTPStatus.OK, "application/json", orjson.dumps(self.history.status())
            elif path.startswith("/recommend/") and len(path) > len("/recommend/"):
                payload = self.recommend(unquote(path[len("/recommend/"):]), query)
                status, ctype, body = HTTPStatus.OK, "application/json", orjson.dumps(payload)
            elif path.startswith("/similar/") and len(path) > len("/similar/"):
                payload = self.similar(unquote(path[len("/similar/"):]), query)
                status, ctype, body = HTTPStatus.OK, "application/json", orjson.dumps(payload)
            else:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no such path: {path}",
                                paths=["/metrics", "/healthz", "/readyz", "/recommend/{user_id}?k=",
                                       "/similar/{item_id}?k=", "/", "/status.json"])
        except HttpError as exc:
            status, ctype, body = exc.status, "application/json", orjson.dumps(exc.body)
        except Exception as exc:  # an answer must never take the server (or the service) down
            log.exception("HTTP %s failed", path)
            status, ctype, body = (HTTPStatus.INTERNAL_SERVER_ERROR, "application/json",
                                   orjson.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        request.send_response(status)
        request.send_header("Content-Type", ctype)
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Cache-Control", "no-store")
        request.end_headers()
        request.wfile.write(body)

    # -- probes ------------------------------------------------------------------------------------

    def health(self) -> tuple[HTTPStatus, dict]:
        """Alive while the poll loop turns: a loop stuck longer than ``liveness_timeout_s`` fails."""
        age = time.monotonic() - self.service.last_loop_turn
        ok = age <= self.config.liveness_timeout_s
        return (HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                {"status": "ok" if ok else "stuck", "loop_turn_age_s": round(age, 3),
                 "liveness_timeout_s": self.config.liveness_timeout_s})

    def readiness(self) -> tuple[HTTPStatus, dict]:
        """Ready to answer queries: partitions assigned, state restored, an index loaded.

        State is restored before the service object exists (and so before this
        server starts); an index is not needed when nothing is published
        (``output.publish = false`` builds none).
        """
        service = self.service
        index = service.refresher.current
        checks = {
            "partitions_assigned": len(service.stats.assigned) > 0,
            "state_restored": True,
            "index_loaded": index is not None or not service.config.output.publish,
        }
        ok = all(checks.values())
        return (HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                {"status": "ready" if ok else "not ready", **checks,
                 "assigned": [f"{t}/{p}" for t, p in service.stats.assigned],
                 "index_version": index.version if index else 0,
                 "events_restored_or_applied": service.model.events_applied})

    # -- queries -----------------------------------------------------------------------------------

    def recommend(self, user_id: str, query: dict[str, list[str]]) -> dict:
        """The user's top k now, in the output topic's message shape; 404 for a user never seen."""
        service = self.service
        k = _k(query, service.recommender.k)
        message = recommendation_message(service.recommender, service.model_lock, service.refresher.current,
                                         user_id, k, service.stats.last_event_ts)
        if message is None:
            raise HttpError(HTTPStatus.NOT_FOUND, "unknown user: no event of theirs has been applied",
                            user_id=user_id)
        return message

    def similar(self, item_id: str, query: dict[str, list[str]]) -> dict:
        """Items whose live vectors are closest to this one's (cosine), candidates from the index.

        The index's neighbours of the item (angular distance between the
        items' index points: vector and ranking bias) are re-scored by the
        cosine of the live item vectors, so a stale index can change which
        candidates are looked at, never their scores. An item newer than the
        index is compared with every item exactly (one product over the
        catalogue, under the model lock).
        """
        service = self.service
        k = _k(query, max(service.recommender.k, 100))
        model = service.model
        index = service.refresher.current
        with service.model_lock:
            row = model.items.ids.get(item_id)
            n_items = len(model.items)
            eligible = service.recommender.eligible()  # (index.min_item_events, forgotten items)
            # A row whose item was forgotten since the build: the index holds the old item there.
            reused = row is not None and index is not None and bool(
                model.items_forgotten_after(index.model_version)[row])
        if row is None:
            raise HttpError(HTTPStatus.NOT_FOUND, "unknown item: no event or metadata of it has been applied",
                            item_id=item_id)
        candidates = None
        # The index is immutable: no lock needed. An item it does not hold (newer, or below
        # index.min_item_events at the build) has the zero vector there; index points never do.
        if (index is not None and not reused and row < index.annoy.get_n_items()
                and any(index.annoy.get_item_vector(row))):
            candidates = np.asarray(index.annoy.get_nns_by_item(row, SIMILAR_FETCH_FACTOR * k + 1,
                                                                 service.config.index.search_k), dtype=np.int64)
        with service.model_lock:
            vectors = model.items.vectors
            if candidates is None:
                candidates = np.arange(n_items, dtype=np.int64)
                found = vectors[:n_items]  # a view: the whole catalogue is not copied
            else:
                found = vectors[candidates]
            q = vectors[row]
            # Cosine of the live vectors (float32 products: one pass over the catalogue when exact).
            scores = (found @ q) / np.maximum(np.sqrt(np.einsum("ij,ij->i", found, found)) * np.linalg.norm(q), 1e-12)
            model_version = model.model_version
        keep = candidates != row
        if eligible is not None:
            keep &= eligible[candidates]
        candidates, scores = candidates[keep], scores[keep]
        top = np.argsort(-scores, kind="stable")[:k]
        with service.model_lock:
            ids = model.items.ids.ids_of(candidates[top].tolist())
        return {"item_id": item_id,
                "items": [{"item_id": i, "score": round(float(s), 6)} for i, s in zip(ids, scores[top].tolist())],
                "index_version": index.version if index else 0, "model_version": model_version,
                "generated_at": int(time.time() * 1000)}
