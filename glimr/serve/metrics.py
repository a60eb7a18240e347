"""Prometheus metrics of the service, written in the text exposition format (version 0.0.4) by hand: requests by
method, route and status, a latency histogram by route, and the index's size (gauges read when scraped)."""
from __future__ import annotations

import math
import threading
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    """Thread-safe counters; ``observe`` once per answered request; ``render`` the exposition text."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self._hist: dict[str, list[int]] = {}
        self._sum: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)
        self.disconnects = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(method, route, str(status))] += 1
            h = self._hist.setdefault(route, [0] * len(BUCKETS))
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    h[i] += 1
            self._sum[route] += seconds
            self._count[route] += 1

    def client_disconnected(self) -> None:
        with self._lock:
            self.disconnects += 1

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """gauges: name -> (help text, value)."""
        out = ["# HELP glimr_http_requests_total HTTP requests answered, by method, route template and status.",
               "# TYPE glimr_http_requests_total counter"]
        with self._lock:
            for (m, r, s), n in sorted(self._requests.items()):
                out.append(f'glimr_http_requests_total{{method="{_label(m)}",route="{_label(r)}",status="{s}"}} {n}')
            out += ["# HELP glimr_http_request_duration_seconds Time from request to the end of the answer.",
                    "# TYPE glimr_http_request_duration_seconds histogram"]
            for r in sorted(self._hist):
                lab = _label(r)
                for b, n in zip(BUCKETS, self._hist[r]):
                    out.append(f'glimr_http_request_duration_seconds_bucket{{route="{lab}",le="{_num(b)}"}} {n}')
                out.append(f'glimr_http_request_duration_seconds_bucket{{route="{lab}",le="+Inf"}} {self._count[r]}')
                out.append(f'glimr_http_request_duration_seconds_sum{{route="{lab}"}} {self._sum[r]!r}')
                out.append(f'glimr_http_request_duration_seconds_count{{route="{lab}"}} {self._count[r]}')
            out += ["# HELP glimr_client_disconnects_total Requests whose client left before the body was read.",
                    "# TYPE glimr_client_disconnects_total counter", f"glimr_client_disconnects_total {self.disconnects}"]
        for name, (text, value) in gauges.items():
            out += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {_num(value)}"]
        return "\n".join(out) + "\n"
