"""Render the last minutes of a Prometheus server's view of the cluster to a PNG.

    python -m monitoring.tools.snapshot --prometheus http://127.0.0.1:9090 --minutes 10 --out docs/monitoring.png

Four panels, each a PromQL range query that the Grafana dashboard also uses:
request rate by route and status, p99 latency by route, mean confidence by
model, and drift scores against their thresholds. Needs matplotlib (the
``bench`` extra).
"""

import argparse
import time
from datetime import datetime

import httpx

MODEL_ROUTES = 'route=~"/v1/(vision|text|multimodal)/.+"'
PANELS = [
    (
        "Requests per second by route and status",
        "req/s",
        f"sum by (route, status) (rate(ray_maas_http_requests_total{{{MODEL_ROUTES}}}[2m]))",
        "{route} {status}",
    ),
    (
        "p99 latency by route",
        "seconds",
        "histogram_quantile(0.99, sum by (route, le) "
        f"(rate(ray_maas_http_request_duration_seconds_bucket{{{MODEL_ROUTES}}}[2m])))",
        "{route}",
    ),
    (
        "Mean top-class confidence by model",
        "probability",
        "sum by (model) (rate(ray_maas_model_confidence_ratio_sum[2m]))"
        " / sum by (model) (rate(ray_maas_model_confidence_ratio_count[2m]))",
        "{model}",
    ),
    (
        "Drift score by measure (max over replicas) and threshold",
        "score",
        "max by (model, measure) (ray_maas_model_drift_score)",
        "{model} {measure}",
    ),
]
THRESHOLDS = "max by (model, measure) (ray_maas_model_drift_threshold_score)"


def query_range(client: httpx.Client, expr: str, start: float, end: float, step: float) -> list[dict]:
    response = client.get("/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step})
    response.raise_for_status()
    return response.json()["data"]["result"]


def render(prometheus: str, minutes: float, out: str, step: float = 5.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = time.time()
    start = end - minutes * 60
    with httpx.Client(base_url=prometheus, timeout=30) as client:
        fig, axes = plt.subplots(2, 2, figsize=(14, 8.5), sharex=True)
        for ax, (title, unit, expr, legend) in zip(axes.flat, PANELS):
            for series in query_range(client, expr, start, end, step):
                times = [datetime.fromtimestamp(float(t)) for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                ax.plot(times, values, label=legend.format(**series["metric"]), linewidth=1.4)
            if "Drift" in title:
                thresholds: dict[float, list[str]] = {}
                for series in query_range(client, THRESHOLDS, start, end, step):
                    thresholds.setdefault(float(series["values"][-1][1]), []).append(series["metric"]["measure"])
                for value, measures in thresholds.items():
                    ax.axhline(value, linestyle="--", linewidth=0.8, color="grey")
                    label = f"threshold {value:g}: {', '.join(sorted(measures))}"
                    ax.annotate(label, (0.99, value), xycoords=("axes fraction", "data"), fontsize=7,
                                color="grey", ha="right", va="bottom")  # fmt: skip
                ax.set_yscale("symlog", linthresh=0.1)
                ax.set_ylim(bottom=0)
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, loc="upper left")
        fig.autofmt_xdate()
        fig.suptitle(f"maas-cluster, from Prometheus ({prometheus}), {datetime.fromtimestamp(end):%Y-%m-%d %H:%M}")
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m monitoring.tools.snapshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--out", default="docs/monitoring.png")
    args = parser.parse_args()
    render(args.prometheus, args.minutes, args.out)


if __name__ == "__main__":
    main()
