"""Load benchmark: a real ``labelloop serve`` process under sustained load and under overload, with
locust (headless, library API) as the load tool.

Scenarios (each against a fresh server process, the champion a fast-mode model trained on real Davidson
rows; request texts are held-out Davidson tweets):

- ``sustained 50×1``: 50 clients, each sending one text per ``/v1/predict`` request, back to back.
- ``sustained 8×100``: 8 clients, each sending 100 tasks per Label Studio ``/predict`` request (Label
  Studio's pre-labelling batches), back to back.
- ``overload``: clients offering 4× the capacity measured in the sustained runs (``/v1/predict``, 10 texts
  per request, each client at a constant request rate), while one Label Studio client asks ``/predict``
  for one task twice a second. Run three times in one invocation, side by side: with the default
  ``max_queued_texts``, with the bound sized to one second of the capacity just measured (what an operator
  would configure on this machine), and without a bound (``max_queued_texts = 0``, the behaviour before
  admission control; dropping the work of clients that hung up stays on).

Goals (issue 13): sustained runs have 0 errors; under overload every request is answered (a result or a
503) within 2 s, throughput stays at capacity, and Label Studio's ``/predict`` keeps working.

Locust monkey-patches the standard library with gevent, so it runs in a child process of this script
(``_locust`` mode); the parent trains the champion, starts and stops the servers, and reads their
Prometheus metrics.

Run: ``.venv/bin/python bench/load.py`` (≈ 8 min plus ≈ 1 min the first time for the champion); ``--quick``
(≈ 1.5 min) checks that everything runs and writes to ``var/bench/`` instead of ``bench/results/``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["_locust"]:
    from gevent import monkey  # noqa: I001  (gevent must patch the standard library before anything else)

    monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
ANSWER_GOAL_S = 2.0
OVERLOAD_FACTOR = 4.0
OVERLOAD_TEXTS = 10  # texts per /v1/predict request in the overload scenario
SIZED_BOUND_SECONDS = 1.0  # the third overload run bounds the queue at this much work at the measured capacity


# ------------------------------------------------------------------------------------------------
# the locust side (child process)
# ------------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    users: int
    texts_per_request: int
    route: str  # "/v1/predict" or "/predict"
    seconds: float
    rate_per_user: float | None = None  # requests per second per client; None: back to back
    label_studio_probe: bool = False  # one more client asking /predict for one task twice a second
    timeout_s: float = 30.0
    host: str = ""
    texts: list[str] = field(default_factory=list)


def _body(route: str, texts: list[str]) -> dict:
    if route == "/v1/predict":
        return {"texts": texts}
    from labelloop.taxonomy import get_taxonomy, label_config_xml

    tasks = [{"id": i + 1, "data": {"text": t}} for i, t in enumerate(texts)]
    return {"tasks": tasks, "project": "1.1700000000", "label_config": label_config_xml(get_taxonomy("hate_offensive"))}


def run_locust(spec_path: Path, out_path: Path) -> None:
    """Child process: run one scenario with locust's library API and write every request's outcome."""
    import random

    import gevent
    from locust import FastHttpUser, constant, constant_throughput, task
    from locust.env import Environment

    spec = Scenario(**json.loads(spec_path.read_text()))
    records: list[tuple[str, int, float, float]] = []  # (kind, status, ms, seconds since start)
    started = time.monotonic()
    flood_body = json.dumps(_body(spec.route, spec.texts[: spec.texts_per_request]))
    probe_body = json.dumps(_body("/predict", spec.texts[:1]))

    class Client(FastHttpUser):
        host = spec.host
        wait_time = constant_throughput(spec.rate_per_user) if spec.rate_per_user else constant(0)
        network_timeout = spec.timeout_s
        connection_timeout = spec.timeout_s

        def on_start(self) -> None:
            """Clients at a constant rate start at random points of their first period, not all at once
            (locust runs a task as soon as a client spawns), so the offered load is steady from the start."""
            if spec.rate_per_user:
                gevent.sleep(random.uniform(0, 1 / spec.rate_per_user))

        @task
        def predict(self) -> None:
            offset = random.randrange(max(1, len(spec.texts) - spec.texts_per_request))
            body = json.dumps(_body(spec.route, spec.texts[offset: offset + spec.texts_per_request])) \
                if spec.route == "/v1/predict" else flood_body
            self.client.post(spec.route, data=body, headers={"content-type": "application/json"},
                             name="flood")

    class LabelStudio(FastHttpUser):
        host = spec.host
        fixed_count = 1
        wait_time = constant_throughput(2.0)
        network_timeout = spec.timeout_s
        connection_timeout = spec.timeout_s

        @task
        def predict(self) -> None:
            self.client.post("/predict", data=probe_body, headers={"content-type": "application/json"},
                             name="label_studio")

    def record(request_type: str, name: str, response_time: float, response_length: int, response: Any = None,
               exception: Any = None, **_: Any) -> None:
        status = getattr(response, "status_code", 0) or 0
        records.append((name, int(status), float(response_time), time.monotonic() - started))

    classes = [Client, LabelStudio] if spec.label_studio_probe else [Client]
    env = Environment(user_classes=classes)
    env.events.request.add_listener(record)
    runner = env.create_local_runner()
    users = spec.users + (1 if spec.label_studio_probe else 0)
    runner.start(users, spawn_rate=max(users / 2.0, 1.0))
    gevent.spawn_later(spec.seconds, runner.quit)
    runner.greenlet.join()
    out_path.write_text(json.dumps({"records": records, "seconds": time.monotonic() - started}))


# ------------------------------------------------------------------------------------------------
# the parent: champion, server processes, scenarios, report
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_champion(store: Path, rows: int) -> str:
    """A fast-mode champion (frozen MiniLM + logistic regression) on real Davidson rows, trained once per store."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from labelloop import data
    from labelloop.config import Settings
    from labelloop.taxonomy import get_taxonomy
    from training.registry import Registry
    from training.train import train_and_register

    settings = Settings(mlruns_dir=store / "mlruns", state_dir=store / "var", taxonomy="hate_offensive")
    registry = Registry(settings)
    version = registry.alias_version("champion")
    if version is None:
        splits = data.split(data.load("davidson", settings=Settings()), seed=0)
        result = train_and_register(data.stratified_sample(splits.train, rows, seed=0), None,
                                    get_taxonomy("hate_offensive"), mode="fast", settings=settings,
                                    source="bench-load",
                                    eval_frame=data.stratified_sample(splits.validation, 300, seed=0))
        registry.promote(result.ref.version)
        version = result.ref.version
    return f"{registry.name}:v{version}"


def request_texts(n: int) -> list[str]:
    from labelloop import data
    from labelloop.config import Settings

    splits = data.split(data.load("davidson", settings=Settings()), seed=0)
    return splits.test["text"].sample(n, random_state=1).tolist()


class ServeProcess:
    """``labelloop serve`` in its own process, with only the settings given (nothing from the caller's
    environment or a labelloop.toml), on a free loopback port."""

    def __init__(self, store: Path, log_dir: Path, **settings: Any):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABELLOOP_")}
        env.update({"LABELLOOP_MLRUNS_DIR": str(store / "mlruns"), "LABELLOOP_STATE_DIR": str(store / "var"),
                    "LABELLOOP_TAXONOMY": "hate_offensive", "LABELLOOP_POLL_SECONDS": "0",
                    "LABELLOOP_RECONCILE_SECONDS": "0", "LABELLOOP_DRIFT_EVERY_SECONDS": "0",
                    "LABELLOOP_CONFIG": str(log_dir / "none.toml"), "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                    # fp32 as trained: the int8/ONNX choice re-checks agreement on every start, which on a
                    # contended 2-core box costs minutes per server, and admission control is what is measured
                    "LABELLOOP_QUANTIZE": "none"})
        env.update({f"LABELLOOP_{k.upper()}": str(v) for k, v in settings.items()})
        self.log_path = log_dir / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        executable = Path(sys.executable).with_name("labelloop")
        self.process = subprocess.Popen([str(executable), "serve", "--port", str(self.port)], env=env,
                                        cwd=log_dir, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> dict:
        import httpx

        deadline = time.monotonic() + timeout
        detail = "it did not answer /health"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"labelloop serve exited with {self.process.returncode}; see {self.log_path}")
            try:
                health = httpx.get(f"{self.url}/health", timeout=2).json()
                if health.get("model_loaded"):
                    return health
                detail = health.get("detail") or detail
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"labelloop serve did not load its champion in {timeout:.0f} s ({detail})")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics/prometheus", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 1)


def _metric_delta(before: dict, after: dict, name: str) -> float:
    return sum(v for (n, _), v in after.items() if n == name) - sum(v for (n, _), v in before.items() if n == name)


def run_scenario(scenario: Scenario, server: ServeProcess, work_dir: Path) -> dict:
    """Run one scenario in a locust child process and summarise what the clients and the server saw."""
    scenario.host = server.url
    spec, out = work_dir / f"{scenario.name}.spec.json", work_dir / f"{scenario.name}.out.json"
    spec.write_text(json.dumps(asdict(scenario)))
    before = server.metrics()
    load_before = os.getloadavg()
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_locust", str(spec), str(out)],
                           capture_output=True, text=True, timeout=scenario.seconds + 120)
    after = server.metrics()
    if child.returncode != 0 or not out.exists():
        return {"name": scenario.name, "failed": f"locust exited with {child.returncode}: {child.stderr[-2000:]}"}
    result = json.loads(out.read_text())
    seconds = result["seconds"]
    flood = [(s, ms) for kind, s, ms, _ in result["records"] if kind == "flood"]
    ls = [(s, ms) for kind, s, ms, _ in result["records"] if kind == "label_studio"]
    ok = [ms for s, ms in flood if s == 200]
    refused = [ms for s, ms in flood if s == 503]
    errors = [s for s, _ in flood if s not in (200, 503)]
    answered = ok + refused
    summary: dict[str, Any] = {
        "name": scenario.name, "route": scenario.route, "clients": scenario.users,
        "texts_per_request": scenario.texts_per_request, "rate_per_client": scenario.rate_per_user,
        "seconds": round(seconds, 1), "requests": len(flood), "ok": len(ok), "refused_503": len(refused),
        "errors": len(errors), "error_statuses": sorted(set(errors)),
        "refused_share": round(len(refused) / len(flood), 4) if flood else None,
        "ok_texts_per_s": round(len(ok) * scenario.texts_per_request / seconds, 1),
        "model_texts_per_s": round(_metric_delta(before, after, "labelloop_texts_predicted_total") / seconds, 1),
        "offered_texts_per_s": (round(scenario.users * scenario.rate_per_user * scenario.texts_per_request, 1)
                                if scenario.rate_per_user else None),
        "ok_p50_ms": _pct(ok, 0.5), "ok_p99_ms": _pct(ok, 0.99), "ok_max_ms": _pct(ok, 1.0),
        "refused_p99_ms": _pct(refused, 0.99),
        "answered_p99_ms": _pct(answered, 0.99), "answered_max_ms": _pct(answered, 1.0),
        "answered_within_goal": (round(sum(ms <= ANSWER_GOAL_S * 1000 for ms in answered) / len(flood), 4)
                                 if flood else None),
        "server_refusals": _metric_delta(before, after, "labelloop_admission_refusals_total"),
        "server_dropped_after_disconnect": _metric_delta(before, after, "labelloop_admission_dropped_total"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    if scenario.label_studio_probe:
        ls_ok = [ms for s, ms in ls if s == 200]
        summary["label_studio"] = {"requests": len(ls), "ok": len(ls_ok), "p50_ms": _pct(ls_ok, 0.5),
                                   "p99_ms": _pct(ls_ok, 0.99), "max_ms": _pct(ls_ok, 1.0)}
    return summary


def run(quick: bool, store: Path, out_dir: Path) -> dict:
    from labelloop.config import Settings

    seconds = 10.0 if quick else 60.0
    champion = ensure_champion(store, rows=600 if quick else 2000)
    texts = request_texts(500)
    default_bound = Settings.model_fields["max_queued_texts"].default
    report: dict[str, Any] = {
        "champion": champion, "quick": quick, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                           "load_average_start": list(os.getloadavg())},
        "settings": {"max_queued_texts": default_bound,
                     "max_queued_texts_label_studio": Settings.model_fields["max_queued_texts_label_studio"].default,
                     "batch_size": Settings.model_fields["batch_size"].default},
        "scenarios": [],
    }
    work = Path(tempfile.mkdtemp(prefix="labelloop-load-"))
    try:
        sustained = [Scenario("sustained 50x1", 10 if quick else 50, 1, "/v1/predict", seconds, texts=texts),
                     Scenario("sustained 8x100", 2 if quick else 8, 100, "/predict", seconds, texts=texts)]
        capacity = 0.0
        for scenario in sustained:
            report["scenarios"].append(one_server(scenario, store, work, report))
            capacity = max(capacity, report["scenarios"][-1].get("model_texts_per_s") or 0.0)
        report["capacity_texts_per_s"] = capacity
        # up to 100 clients, each at >= 1 request per 20 s (a client slower than that offers no steady load)
        offered_requests = OVERLOAD_FACTOR * max(capacity, 1.0) / OVERLOAD_TEXTS
        users = max(1, min(40 if quick else 100, math.floor(offered_requests / 0.05)))
        rate = offered_requests / users
        sized = max(1, round(capacity * SIZED_BOUND_SECONDS))
        for label, bound in ((f"overload 4x, default bound {default_bound}", default_bound),
                             (f"overload 4x, bound sized to capacity ({sized})", sized),
                             ("overload 4x, no bound", 0)):
            scenario = Scenario(label, users, OVERLOAD_TEXTS, "/v1/predict", seconds, rate_per_user=round(rate, 4),
                                label_studio_probe=True, timeout_s=10.0, texts=texts)
            report["scenarios"].append(one_server(scenario, store, work, report, max_queued_texts=bound))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "load.md").write_text(markdown(report))
    return report


def one_server(scenario: Scenario, store: Path, work: Path, report: dict, **settings: Any) -> dict:
    """A fresh server per scenario, so one scenario's backlog never spills into the next one's numbers."""
    print(f"[load] {scenario.name}: starting a server", flush=True)
    server = ServeProcess(store, work, **settings)
    try:
        health = server.wait_ready()
        report.setdefault("served", {"model_version": health.get("model_version"),
                                     "precision": health.get("precision"), "model_class": health.get("model_class")})
        print(f"[load] {scenario.name}: {scenario.users} clients for {scenario.seconds:.0f} s", flush=True)
        summary = run_scenario(scenario, server, work)
        summary["server_settings"] = settings
        print(f"[load] {json.dumps(summary)}", flush=True)
        return summary
    except Exception as e:  # a benchmark reports what happened rather than crash
        return {"name": scenario.name, "failed": f"{type(e).__name__}: {e}"}
    finally:
        server.stop()


def _loads(values: list[float] | None) -> str:
    return "–" if not values else " / ".join(f"{v:.1f}" for v in values)


def _v(value: Any, unit: str = "") -> str:
    return "–" if value is None else f"{value}{unit}"


def markdown(report: dict) -> str:
    served = report.get("served", {})
    lines = [
        "# Load: `labelloop serve` under sustained load and overload",
        "",
        f"Champion: {report['champion']} ({served.get('model_class')}, {served.get('precision')}), fast mode "
        "(frozen all-MiniLM-L6-v2 + logistic regression) trained on real Davidson rows; request texts are "
        "held-out Davidson tweets. Load tool: locust (headless, library API, FastHttpUser), in its own process "
        "on the same machine as the server. Every scenario runs against a fresh `labelloop serve` process.",
        "",
        f"Machine: {report['machine']['cpus']} CPUs (load average "
        f"{_loads(report['machine']['load_average_start'])} at the start, "
        f"{_loads(report['machine'].get('load_average_end'))} at the end; above about the CPU count means other "
        "work shared the cores), and locust runs on the same cores as the server, so the latencies are upper "
        "bounds and the throughputs lower bounds of what the server does on a machine of its own.",
        "",
        f"Settings: `max_queued_texts` = {report['settings']['max_queued_texts']} (/v1/predict), "
        f"`max_queued_texts_label_studio` = {report['settings']['max_queued_texts_label_studio']} (/predict), "
        f"`batch_size` = {report['settings']['batch_size']}. Capacity (the best model throughput of the "
        f"sustained runs): **{_v(report.get('capacity_texts_per_s'))} texts/s**.",
        "",
        "## Sustained (goal: 0 errors)",
        "",
        "| scenario | route | requests | errors: timeouts, 5xx other than 503 (goal 0) | 503s | texts/s answered "
        "| p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in report["scenarios"]:
        if s["name"].startswith("sustained"):
            if "failed" in s:
                lines.append(f"| {s['name']} | failed: {s['failed']} |||||||")
                continue
            verdict = "met" if s["errors"] == 0 and s["refused_503"] == 0 else "**missed**"
            lines.append(f"| {s['name']} | `{s['route']}` | {s['requests']} | {s['errors']} ({verdict}) | "
                         f"{s['refused_503']} | {s['ok_texts_per_s']} | {_v(s['ok_p50_ms'])} | {_v(s['ok_p99_ms'])} |")
    lines += [
        "",
        f"## Overload at {OVERLOAD_FACTOR:g}× capacity (goal: every request answered within {ANSWER_GOAL_S:g} s, "
        "a result or a 503; throughput stays at capacity)",
        "",
        "`/v1/predict` with 10 texts per request at a constant rate per client, plus one Label Studio client "
        "asking `/predict` for one task twice a second. Client timeout 10 s.",
        "",
        "| admission bound | offered texts/s | requests | answered ≤ 2 s (goal 100 %) | 503 share | p99 accepted ms "
        "| max answered ms | errors/timeouts | model texts/s (vs capacity) | dropped after disconnect | "
        "Label Studio /predict ok, p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    capacity = report.get("capacity_texts_per_s") or 0
    for s in report["scenarios"]:
        if not s["name"].startswith("overload"):
            continue
        if "failed" in s:
            lines.append(f"| {s['name']} | failed: {s['failed']} ||||||||||")
            continue
        bound = s["server_settings"].get("max_queued_texts", report["settings"]["max_queued_texts"])
        within = s["answered_within_goal"]
        share = s["refused_share"]
        ls = s.get("label_studio", {})
        ratio = f" ({s['model_texts_per_s'] / capacity:.0%})" if capacity else ""
        lines.append(
            f"| {'off' if bound == 0 else bound} | {_v(s['offered_texts_per_s'])} | {s['requests']} | "
            f"{_v(within if within is None else f'{within:.1%}')} ({'met' if within == 1 else '**missed**'}) | "
            f"{_v(share if share is None else f'{share:.1%}')} | "
            f"{_v(s['ok_p99_ms'])} | {_v(s['answered_max_ms'])} | {s['errors']} | {s['model_texts_per_s']}{ratio} | "
            f"{int(s['server_dropped_after_disconnect'])} | {ls.get('ok')}/{ls.get('requests')}, "
            f"{_v(ls.get('p99_ms'))} |")
    lines += ["", "Raw numbers: `load.json` next to this file. Run: `.venv/bin/python bench/load.py` "
              "(`--quick` for a short check).", ""]
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["_locust"]:
        run_locust(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short scenarios, fewer clients (a check that it runs)")
    parser.add_argument("--store", type=Path, default=REPO / "var" / "bench" / "load-store",
                        help="MLflow store with the champion (trained on first use, reused after)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where load.{json,md} go (default: bench/results, or var/bench with --quick)")
    parser.add_argument("--render", action="store_true", help="only rewrite load.md from the load.json in --out")
    args = parser.parse_args()
    if args.render:
        out = args.out or RESULTS
        (out / "load.md").write_text(markdown(json.loads((out / "load.json").read_text())))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server processes on the way out
    out = args.out or (REPO / "var" / "bench" if args.quick else RESULTS)
    report = run(args.quick, args.store.resolve(), out)
    print((out / "load.md").read_text())
    failed = [s["name"] for s in report["scenarios"] if "failed" in s]
    if failed:
        print(f"[load] scenarios that failed: {', '.join(failed)}", file=sys.stderr)


if __name__ == "__main__":
    main()
