"""A Faust app that learns recommendations from its click stream and serves them from a web view.

    pip install 'recstream[faust]'
    KAFKA_BROKER=kafka://localhost:9092 CLICKS_TOPIC=clicks \
        faust -A examples.faust_app worker -l info --web-port 6066
    curl localhost:6066/recommend/u17/?k=5

Events are recstream's input JSON (README "Contracts"). What this path does not give, compared
with `recstream run`, is said in recstream/stream/faust_bridge.py and docs/operations.md.
"""

from __future__ import annotations

import os

import faust
from recstream.stream.config import load_config
from recstream.stream.faust_bridge import FaustLearner

app = faust.App(
    os.environ.get("FAUST_APP_ID", "recstream-faust"),
    broker=os.environ.get("KAFKA_BROKER", "kafka://localhost:9092"),
    value_serializer="raw",  # recstream decodes and checks the JSON itself
    topic_disable_leader=True,
    # Faust's defaults (60 s / 3 s) are fine in production; tests shorten them to join quickly.
    broker_session_timeout=float(os.environ.get("FAUST_SESSION_TIMEOUT_S", "60")),
    broker_heartbeat_interval=float(os.environ.get("FAUST_HEARTBEAT_S", "3")),
)
clicks = app.topic(os.environ.get("CLICKS_TOPIC", "clicks"), value_serializer="raw")
learner = FaustLearner(load_config(os.environ.get("RECSTREAM_CONFIG")))


@app.agent(clicks)
async def learn(stream):
    # One model update per batch: the update is vectorised, a call per event would waste it.
    async for values in stream.take(1000, within=0.5):
        learner.learn(values)
        yield len(values)


@app.page("/recommend/{user_id}/")
async def recommend(web, request, user_id):
    k = request.query.get("k")
    message = learner.recommend(user_id, int(k) if k and k.isdigit() else None)
    if message is None:
        return web.json({"error": "unknown user", "user_id": user_id}, status=404)
    return web.json(message)


@app.page("/stats/")
async def stats(web, request):
    return web.json({"events_applied": learner.events_applied, "rejected": learner.rejected,
                     "users": len(learner.model.users), "items": len(learner.model.items)})
