"""The live status page (``GET /``) and the history it charts (``GET /status.json``).

A sampler thread of the HTTP side records, every few seconds, the rates over
the last interval and the freshness quantiles from the metrics' histogram
(the difference of two snapshots, so the consumer does nothing extra). The
page is one self-contained HTML document: inline CSS, inline JavaScript that
polls /status.json and draws SVG polylines; it loads nothing else, so it works
where the service has no way out to the internet.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from recstream.stream.web import ServiceHttp

HISTORY_SAMPLES = 300  # at the default 2 s: the last 10 minutes
WATCHED_USERS = 3
WATCH_REFRESH_S = 60.0  # how often other users are picked to show


class StatusHistory:
    """Samples of throughput and freshness over the last minutes, taken by a thread of its own."""

    def __init__(self, http: ServiceHttp, interval_s: float = 2.0) -> None:
        self.http = http
        self.interval_s = interval_s
        self.samples: deque[dict] = deque(maxlen=HISTORY_SAMPLES)
        self.watched: list[str] = []
        self._watched_at = -WATCH_REFRESH_S
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[float, int, int, np.ndarray] | None = None
        self._rng = np.random.default_rng(0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http-status-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        service = self.http.service
        stats = service.stats
        freshness = self.http.metrics.freshness
        now, events, updates, counts = time.monotonic(), stats.events_applied, stats.updates_published, \
            freshness.snapshot()
        if self._last is not None:
            then, events_before, updates_before, counts_before = self._last
            elapsed = max(now - then, 1e-9)
            recent = counts - counts_before
            self.samples.append({
                "t": int(time.time() * 1000),
                "events_per_s": (events - events_before) / elapsed,
                "updates_per_s": (updates - updates_before) / elapsed,
                "freshness_p50_s": _finite(freshness.quantile(recent, 0.5)),
                "freshness_p99_s": _finite(freshness.quantile(recent, 0.99)),
                "lag": sum(self.http.metrics.lag.values()) if self.http.metrics.lag else None,
            })
        self._last = (now, events, updates, counts)
        if now - self._watched_at >= WATCH_REFRESH_S or len(self.watched) < WATCHED_USERS:
            self._watched_at = now
            self.watched = self._pick_users()

    def _pick_users(self) -> list[str]:
        service = self.http.service
        with service.model_lock:
            held = np.setdiff1d(np.arange(len(service.model.users)), service.model.users.ids.free)  # not forgotten
            rows = self._rng.choice(held, size=min(WATCHED_USERS, len(held)), replace=False).tolist()
            return service.model.users.ids.ids_of(rows)

    def status(self) -> dict:
        """What the page shows: counters now, the sampled history, the watched users' recommendations."""
        service = self.http.service
        s = service.stats
        index = service.refresher.current
        store = service.store
        recommendations = []
        for user in list(self.watched):
            try:
                recommendations.append(self.http.recommend(user, {"k": ["5"]}))
            except Exception:  # a user can vanish from the watch list between sampling and now
                continue
        return {
            "now": int(time.time() * 1000),
            "events_applied": s.events_applied, "messages": s.messages, "dead_letters": s.dead_letters,
            "updates_published": s.updates_published, "users": len(service.model.users),
            "items": service.model.items.ids.live, "model_version": service.model.model_version,
            "assigned": [f"{t}/{p}" for t, p in s.assigned],
            "index": {"version": index.version, "items": index.n_items, "age_s": time.monotonic() - index.built_at,
                      "build_s": index.build_seconds} if index else None,
            "checkpoint": {"count": s.checkpoints, "age_s": _finite(self.http.metrics.checkpoint_age()),
                           "snapshot_s": s.last_checkpoint_s} if store is not None else None,
            "loss_mean": s.loss_mean, "loss_drifts": s.loss_drifts, "item_drift": s.item_drift,
            "interval_s": self.interval_s, "history": list(self.samples), "recommendations": recommendations,
        }


def _finite(x: float) -> float | None:
    return None if x != x else x  # NaN -> null in JSON


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>recstream</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
 h1{font-size:1.3em;margin:0 0 .6em} h2{font-size:1em;margin:1em 0 .3em}
 .grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:1em}
 .card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em .9em}
 table{border-collapse:collapse} td{padding:1px 10px 1px 0} td.n{text-align:right;font-variant-numeric:tabular-nums}
 svg{width:100%;height:140px;background:#fff} .axis{font-size:10px;fill:#777}
 #err{color:#b00} .recs li{margin:0} .muted{color:#777}
</style></head><body>
<h1>recstream <span class="muted" id="updated">connecting&hellip;</span> <span id="err"></span></h1>
<div class="grid">
 <div class="card"><h2>Events applied per second <span class="muted">(last 10 minutes at most)</span></h2><svg id="chart-throughput" viewBox="0 0 400 140"
   preserveAspectRatio="none"></svg></div>
 <div class="card"><h2>Freshness: event time to delivered update, s (<span style="color:#2a8a3a">p50</span>,
   <span style="color:#c0632a">p99</span>)</h2>
   <svg id="chart-freshness" viewBox="0 0 400 140" preserveAspectRatio="none"></svg></div>
 <div class="card"><h2>Now</h2><table id="numbers"></table></div>
 <div class="card"><h2>Index and checkpoint</h2><table id="state"></table></div>
</div>
<h2>Recommendations now for a few users (picked at random, every minute)</h2><div class="grid" id="recs"></div>
<script>
"use strict";
const fmt = (x, d) => x === null || x === undefined ? "&ndash;" :
  Number(x).toLocaleString("en", {maximumFractionDigits: d === undefined ? 0 : d});
function rows(id, pairs) {
  document.getElementById(id).innerHTML = pairs.map(([k, v, key]) =>
    `<tr><td>${k}</td><td class="n" data-key="${key || ""}">${v}</td></tr>`).join("");
}
function chart(id, series, colors) {
  const svg = document.getElementById(id), W = 400, H = 140, pad = 18;
  const all = series.flat().filter(v => v !== null);
  const max = Math.max(1e-9, ...all), n = Math.max(...series.map(s => s.length));
  let out = `<text class="axis" x="2" y="10">${fmt(max, max < 10 ? 2 : 0)}</text>` +
            `<text class="axis" x="2" y="${H - 2}">0</text>`;
  series.forEach((s, k) => {
    const pts = s.map((v, i) => v === null ? null :
      `${(pad + (W - pad) * (n < 2 ? 1 : i / (n - 1))).toFixed(1)},${(H - 4 - (H - 16) * v / max).toFixed(1)}`)
      .filter(p => p !== null).join(" ");
    out += `<polyline data-points="${s.filter(v => v !== null).length}" fill="none" stroke="${colors[k]}"
      stroke-width="1.5" points="${pts}"/>`;
  });
  svg.innerHTML = out;
}
async function refresh() {
  try {
    const r = await fetch("status.json", {cache: "no-store"});
    const s = await r.json();
    const h = s.history;
    chart("chart-throughput", [h.map(x => x.events_per_s)], ["#1f6fb2"]);
    chart("chart-freshness", [h.map(x => x.freshness_p50_s), h.map(x => x.freshness_p99_s)], ["#2a8a3a", "#c0632a"]);
    const last = h.length ? h[h.length - 1] : {};
    rows("numbers", [
      ["events applied", fmt(s.events_applied), "events_applied"],
      ["events/s (last interval)", fmt(last.events_per_s), "events_per_s"],
      ["updates published", fmt(s.updates_published), "updates_published"],
      ["dead letters", fmt(s.dead_letters), "dead_letters"],
      ["users / items", `${fmt(s.users)} / ${fmt(s.items)}`, "size"],
      ["consumer lag", fmt(last.lag), "lag"],
      ["assigned partitions", s.assigned.length, "assigned"],
      ["loss (ADWIN mean) / drifts", `${fmt(s.loss_mean, 4)} / ${s.loss_drifts}`, "loss"]]);
    const i = s.index, c = s.checkpoint;
    rows("state", [
      ["index version", i ? i.version : "none yet", "index_version"],
      ["index items", i ? fmt(i.items) : "&ndash;", "index_items"],
      ["index age / build", i ? `${fmt(i.age_s, 1)} s / ${fmt(i.build_s, 2)} s` : "&ndash;", "index_age"],
      ["model version", fmt(s.model_version), "model_version"],
      ["item drift", fmt(s.item_drift, 3), "item_drift"],
      ["checkpoints", c ? fmt(c.count) : "no state dir", "checkpoints"],
      ["checkpoint age / snapshot", c ? `${fmt(c.age_s, 1)} s / ${fmt(c.snapshot_s, 2)} s` : "&ndash;",
       "checkpoint_age"]]);
    document.getElementById("recs").innerHTML = s.recommendations.map(u =>
      `<div class="card"><b>${u.user_id}</b> <span class="muted">model v${u.model_version},
       index v${u.index_version}</span><ol class="recs">` +
      u.items.map(x => `<li>${x.item_id} <span class="muted">${fmt(x.score, 3)}</span></li>`).join("") +
      `</ol></div>`).join("");
    document.getElementById("updated").textContent = "updated " + new Date(s.now).toLocaleTimeString();
    document.getElementById("err").textContent = "";
  } catch (e) {
    document.getElementById("err").textContent = "status unavailable: " + e;
  }
}
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""
