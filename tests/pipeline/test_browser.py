"""Headless Chromium on what a person opens: the Prefect UI (server, served deployment, a triggered run) and
the `dvc plots show` page, offline."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.offline_plots import DEFAULT_TEMPLATE
from flows.pipeline import declared_paths
from flows.serve import DEFAULT_CRON, DEPLOYMENT_NAME
from tests.support import REPO_ROOT, dvc, micro_project

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`apt-get install -y chromium`; "
                                                ".ci/run installs it)"),
]

FLOW_NAME = "latent-sft-pipeline"
# How the UI words DEFAULT_CRON
SCHEDULE_TEXT = {"0 3 * * *": "At 03:00 AM every day"}[DEFAULT_CRON]
PREFECT = str(Path(sys.executable).parent / "prefect")


def dump_dom(url: str, profile: Path) -> str:
    """The DOM of ``url`` after its scripts ran, from headless Chromium (no network beyond the page's own)."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def visible_text(dom: str) -> str:
    """The text of a DOM without scripts, styles and tags, white space folded."""
    text = re.sub(r"<(script|style)\b.*?</\1>|<[^>]+>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(text))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def post_json(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_for(url: str, process: subprocess.Popen, timeout_s: float = 180):
    """The JSON at ``url`` once it answers, failing early if ``process`` (which should serve it) exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args} exited with {process.returncode}"
        try:
            return get_json(url)
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def stop(process: subprocess.Popen) -> None:
    """Stop ``process`` and what it started (it leads its own session)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def prefect_server(tmp_path):
    """A Prefect server (SQLite, 127.0.0.1, free port, temporary home): yields the environment to talk to it."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # host and port as settings, not flags: the UI takes its API address from them
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([PREFECT, "server", "start"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        assert wait_for(f"http://127.0.0.1:{port}/api/health", server) is True
        yield {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    finally:
        stop(server)


def test_ui_shows_the_served_deployment_its_schedule_and_a_completed_run(prefect_server, tmp_path):
    api = prefect_server["PREFECT_API_URL"]
    project = micro_project(tmp_path / "project")
    with open(tmp_path / "serve.log", "w") as log:
        serve = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=REPO_ROOT, env=prefect_server,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deployment = wait_for(f"{api}/deployments/name/{FLOW_NAME}/{DEPLOYMENT_NAME}", serve)
        assert [schedule["schedule"]["cron"] for schedule in deployment["schedules"]] == [DEFAULT_CRON]
        assert deployment["global_concurrency_limit"]["limit"] == 1
        # the cheapest real run: the first stage of a fresh micro project
        run = subprocess.run([PREFECT, "deployment", "run", f"{FLOW_NAME}/{DEPLOYMENT_NAME}", "--param",
                              "up_to=prepare_data", "--param", f"project_dir={project}", "--watch"],
                             env=prefect_server, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "serve.log").read_text()
    finally:
        stop(serve)
    run_name = re.search(r"Created flow run '([\w-]+)'", run.stdout).group(1)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
    assert (project / "data" / "raw" / "train.parquet").is_file()
    logs = post_json(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
    assert "Running stage 'prepare_data':" in [log["message"] for log in logs]  # the served run's stage output

    ui = api.removesuffix("/api")
    deployment_page = visible_text(dump_dom(f"{ui}/deployments/deployment/{deployment['id']}", tmp_path / "chromium"))
    assert DEPLOYMENT_NAME in deployment_page and FLOW_NAME in deployment_page
    assert f"Schedules {SCHEDULE_TEXT}" in deployment_page and "Concurrency Limit 1" in deployment_page
    run_page = visible_text(dump_dom(f"{ui}/runs/flow-run/{run_id}", tmp_path / "chromium"))
    assert f"{run_name} Completed" in run_page and f"Deployment {DEPLOYMENT_NAME}" in run_page


def csv_plots(project: Path) -> list[str]:
    """The CSV files dvc.yaml declares as plots (the training loss curves among them)."""
    specs = yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values()
    return [path for spec in specs for path in declared_paths(spec.get("plots", [])) if path.endswith(".csv")]


def test_dvc_plots_page_draws_every_loss_curve_offline(built_micro_project, tmp_path):
    if not DEFAULT_TEMPLATE.is_file():
        pytest.skip(f"no offline plots template at {DEFAULT_TEMPLATE}: `make install` builds it (needs npm)")
    project = built_micro_project.root
    dvc(project, "plots", "show", "--html-template", str(DEFAULT_TEMPLATE), "-o", str(tmp_path / "plots"))
    page = tmp_path / "plots" / "index.html"
    assert "<script src=" not in page.read_text()  # nothing to fetch: the chart library is inline

    dom = dump_dom(page.as_uri(), tmp_path / "chromium")
    curves = csv_plots(project)
    assert len(curves) >= 5
    for curve in curves:
        div_id = re.sub(r"[^\w]", "_", curve)
        chart = re.search(rf'<div id="{div_id}".*?(?=<div id="|</body>)', dom, flags=re.S)
        assert chart, f"{curve}: no chart on the page"
        # vega sizes its canvas from the data and the axes it drew; an empty div means nothing rendered
        canvas = re.search(r'<canvas width="(\d+)" height="(\d+)" class="marks"', chart.group())
        assert canvas and int(canvas.group(1)) > 100 and int(canvas.group(2)) > 100, f"{curve}: no chart drawn"
