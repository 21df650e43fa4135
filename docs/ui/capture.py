"""Screenshots of a sweep in a running MLflow UI, taken with headless Chromium; docs/ui/screenshots.sh runs it.

    python docs/ui/capture.py --base http://127.0.0.1:5000 --experiment NAME --out DIR

Writes DIR/experiment.png (the experiment's runs table, the sweep's run expanded to its trials) and
DIR/compare.png (MLflow's Compare page of the sweep's trial runs). Chromium is driven over the DevTools protocol
(aiohttp, a dependency of mlflow, is the websocket client), so each screenshot is taken once the page shows the
run names, no spinner is left and the page has stopped changing, not after a guessed delay.

Which sweep: the newest run tagged ``kind=sweep`` (what ``sweep run`` makes), or --sweep-run ID_OR_NAME; its trials
are its nested runs (``mlflow.parentRunId``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; only read by type checkers here

# MLflow 3.17's UI picks an experiment's pages from the sidebar's GenAI / Model training switch (kept in the
# browser's localStorage, GenAI by default; this query parameter overrides it), not from the experiment's
# mlflow.experimentKind tag: a fresh browser profile would otherwise open the GenAI overview.
WORKFLOW = "workflowType=machine_learning"
BUSY = ('[aria-busy="true"], [role="progressbar"], .ant-spin-spinning, [class*="skeleton" i], '
        '[class*="spinner" i], [data-testid*="spinner" i], [data-testid*="loading" i]')


class Failure(Exception):
    pass


# --- MLflow REST API ----------------------------------------------------------------------------------------

def api(base: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise Failure(f"MLflow {path} answered {exc.code}: {exc.read().decode(errors='replace')[:300]}") from None


def search_runs(base: str, experiment_id: str, filter_string: str, order_by: list[str], limit: int = 10_000) -> list:
    runs, token = [], None
    while len(runs) < limit:
        body = {"experiment_ids": [experiment_id], "filter": filter_string, "order_by": order_by,
                "max_results": min(1000, limit - len(runs))}
        if token:
            body["page_token"] = token
        page = api(base, "runs/search", body)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            break
    return runs


def tags_of(run: dict) -> dict:
    return {t["key"]: t.get("value", "") for t in run["data"].get("tags", [])}


def find_sweep(base: str, experiment_name: str, sweep_run: str | None) -> tuple[str, dict, list]:
    try:
        experiment = api(base, "experiments/get-by-name", query={"experiment_name": experiment_name})["experiment"]
    except Failure as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc):
            raise Failure(f"no experiment named {experiment_name!r} in this store") from None
        raise
    experiment_id = experiment["experiment_id"]
    if experiment.get("lifecycle_stage") == "deleted":
        raise Failure(f"experiment {experiment_name!r} is deleted")
    kind = {t["key"]: t.get("value") for t in experiment.get("tags", [])}.get("mlflow.experimentKind")
    print(f"experiment {experiment_name!r}: id {experiment_id}, mlflow.experimentKind={kind or '(not set)'}")
    if sweep_run:
        by_name = sweep_run.replace("'", "\\'")
        parents = [r for r in search_runs(base, experiment_id, f"attributes.run_name = '{by_name}'",
                                          ["attributes.start_time DESC"], 1)]
        if not parents:
            try:
                parents = [api(base, "runs/get", query={"run_id": sweep_run})["run"]]
            except Failure:
                raise Failure(f"no run named or with id {sweep_run!r} in experiment {experiment_name!r}") from None
    else:
        parents = search_runs(base, experiment_id, "tags.kind = 'sweep'", ["attributes.start_time DESC"], 1)
        if not parents:  # not made by `sweep run`: the newest run that has nested runs
            children = search_runs(base, experiment_id, "tags.`mlflow.parentRunId` LIKE '%'",
                                   ["attributes.start_time DESC"], 1)
            if not children:
                raise Failure(f"experiment {experiment_name!r} has no sweep run (tag kind=sweep) and no nested "
                              "runs; pass SWEEP_RUN=<run id or name>")
            parents = [api(base, "runs/get", query={"run_id": tags_of(children[0])["mlflow.parentRunId"]})["run"]]
    parent = parents[0]
    parent_id = parent["info"]["run_id"]
    trials = search_runs(base, experiment_id, f"tags.`mlflow.parentRunId` = '{parent_id}'",
                         ["attributes.start_time ASC"])
    if not trials:
        raise Failure(f"sweep run {parent['info'].get('run_name')} ({parent_id}) has no trial runs")
    print(f"sweep run {parent['info'].get('run_name')} ({parent_id}): {len(trials)} trial run(s)")
    return experiment_id, parent, trials


# --- Chromium over the DevTools protocol --------------------------------------------------------------------

class Browser:
    def __init__(self, chromium: str, width: int, height: int, log: Path) -> None:
        self.chromium, self.width, self.height, self.log = chromium, width, height, log
        self.profile = tempfile.mkdtemp(prefix="sweep-ui-chromium-")
        self.proc = self.session = self.ws = None
        self.next_id = 0

    async def __aenter__(self) -> Self:
        import aiohttp

        flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--no-default-browser-check",
                 "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio", "--force-device-scale-factor=1",
                 "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                 f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox (CI containers)
        self.proc = self._launch(flags)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Failure(f"{self.chromium} did not start; see {self.log}")
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json(content_type=None)
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Page.enable")
        await self.resize(self.height)
        return self

    def _launch(self, flags: list[str]) -> subprocess.Popen:
        with open(self.log, "ab") as log:
            # in this process's group: whoever stops this script's group stops Chromium with it
            return subprocess.Popen([self.chromium, *flags, "about:blank"], stdout=log, stderr=log)

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        ident = self.next_id
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=120)
            if message.get("id") == ident:
                if "error" in message:
                    raise Failure(f"Chromium {method}: {message['error']}")
                return message["result"]

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise Failure(f"in the page: {result['exceptionDetails'].get('text')} {expression[:80]}")
        return result["result"].get("value")

    async def resize(self, height: int, width: int | None = None) -> None:
        await self.call("Emulation.setDeviceMetricsOverride", width=width or self.width, height=height,
                        deviceScaleFactor=1, mobile=False)

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def wait_for(self, expression: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.js(expression):
                    return
            except Failure:  # the page is between two documents (a reload)
                pass
            if time.monotonic() > deadline:
                raise Failure(f"timed out after {timeout:.0f}s waiting for {what}")
            await asyncio.sleep(0.5)

    async def settle(self, timeout: float, quiet: float = 2.0, busy_grace: float = 10.0) -> None:
        """Wait until nothing on the page is busy (spinner, skeleton, progress bar) and the page has not changed
        for ``quiet`` seconds. A busy marker left on a page that has not changed for ``busy_grace`` seconds is
        taken as decoration (the run names are already there): noted, not waited for."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            try:
                busy, content = await self.js(f"""(() => {{
                    if (!document.body) return [['loading'], 'loading'];
                    const busy = [...document.querySelectorAll({json.dumps(BUSY)})]
                        .filter(e => e.getClientRects().length > 0)
                        .map(e => e.tagName + '.' + String(e.className).slice(0, 60));
                    return [busy, document.body.innerHTML.length + ':' + document.body.innerText.length];
                }})()""")
            except Failure:  # between two documents
                busy, content = ["navigating"], "navigating"
            if content != last:
                last, since = content, time.monotonic()
            elif not busy and time.monotonic() - since >= quiet:
                return
            elif busy and time.monotonic() - since >= busy_grace and content not in ("loading", "navigating"):
                print(f"note: still marked busy after {busy_grace:.0f}s unchanged, taken as settled: {busy[:3]}",
                      file=sys.stderr)
                return
            await asyncio.sleep(0.25)
        raise Failure(f"the page was still loading or changing after {timeout:.0f}s")

    async def close_side_panels(self) -> None:
        """Close the MLflow Assistant chat panel, which takes a quarter of the width."""
        await self.js("""(() => {
            const b = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
            if (b) b.click();
        })()""")

    async def fit(self, max_width: int, max_height: int) -> tuple[int, int]:
        """Grow the viewport until the page's scrolling panes (the runs grid, the compare page and its tables)
        show everything, up to ``max_width`` x ``max_height`` pixels; returns the size used."""
        width, height = self.width, self.height
        for _ in range(4):
            hidden_x, hidden_y = await self.js("""(() => {
                let x = 0, y = 0;
                for (const e of document.querySelectorAll('*')) {
                    if (!e.checkVisibility({opacityProperty: true, visibilityProperty: true})) continue;
                    const s = getComputedStyle(e);
                    if (/(auto|scroll)/.test(s.overflowY) && e.clientHeight >= 150)
                        y = Math.max(y, e.scrollHeight - e.clientHeight);
                    if (/(auto|scroll)/.test(s.overflowX) && e.clientWidth >= 300)
                        x = Math.max(x, e.scrollWidth - e.clientWidth);
                }
                const d = document.documentElement;
                return [Math.max(x, d.scrollWidth - window.innerWidth), Math.max(y, d.scrollHeight - window.innerHeight)];
            })()""")
            grow_x = hidden_x > 2 and width < max_width
            grow_y = hidden_y > 2 and height < max_height
            if not (grow_x or grow_y):
                break
            width = min(max_width, width + hidden_x + 8) if grow_x else width
            height = min(max_height, height + hidden_y + 8) if grow_y else height
            await self.resize(height, width)
            await asyncio.sleep(1)
        return width, height

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path.write_bytes(base64.b64decode(shot["data"]))


PREFERRED_METRICS = ("val_accuracy", "val_loss", "test_accuracy", "accuracy", "loss")


def table_columns(trials: list, most_params: int = 5) -> list[str]:
    """The runs table's columns: the trials' scores, then the hyperparameters that differ between trials."""
    metrics = sorted({m["key"] for t in trials for m in t["data"].get("metrics", [])})
    shown = [m for m in PREFERRED_METRICS if m in metrics][:3] or metrics[:3]
    values: dict[str, set] = {}
    for trial in trials:
        for param in trial["data"].get("params", []):
            values.setdefault(param["key"], set()).add(param.get("value"))
    varying = [k for k in sorted(values) if len(values[k]) > 1 or len(trials) == 1][:most_params]
    return [f"metrics.`{m}`" for m in shown] + [f"params.`{p}`" for p in varying]


def texts_shown(names: list[str]) -> str:
    return f"(() => {{ const t = document.body ? document.body.innerText : ''; return {json.dumps(names)}.every(n => t.includes(n)); }})()"


async def capture(browser, target: Path, width: int, args) -> Path:
    """Once the page shows what it should: close side panels, fit the window to the page, screenshot."""
    await browser.settle(args.timeout)
    await browser.close_side_panels()
    await browser.settle(args.timeout)
    await browser.fit(width, args.max_height)
    await browser.settle(args.timeout)
    await browser.screenshot(target)
    return target


async def failed(browser, out: Path, page: str, exc: Exception) -> Failure:
    """Keep what a page showed when it failed, and say where."""
    shot = out / f"{page}.failed.png"
    await browser.screenshot(shot)
    return Failure(f"{page} page: {exc} (what the page showed: {shot})")


async def shoot(args, experiment_id: str, parent: dict, trials: list) -> list[Path]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parent_name = parent["info"].get("run_name") or parent["info"]["run_id"]
    trial_names = [t["info"].get("run_name") or t["info"]["run_id"] for t in trials]
    trial_ids = [t["info"]["run_id"] for t in trials]
    width, height = (int(v) for v in args.window.split(","))
    written = []
    async with Browser(args.chromium, width, height, Path(args.log)) as browser:
        # (a) the runs table, the sweep's run expanded to show its trials, with their scores and hyperparameters
        target = out / "experiment.png"
        try:
            await browser.goto(f"{args.base}/#/experiments/{experiment_id}/runs?{WORKFLOW}")
            await browser.wait_for(texts_shown([parent_name]), f"run {parent_name!r} in the runs table",
                                   args.timeout)
            await browser.settle(args.timeout)
            await browser.close_side_panels()
            # The page keeps its table settings in localStorage: expand the sweep's run and pick the columns there,
            # then reload (clicking through the Columns menu would be more fragile).
            state = {"runsExpanded": {parent["info"]["run_id"]: True}, "selectedColumns": table_columns(trials)}
            patched = await browser.js(f"""(() => {{
                const key = Object.keys(localStorage).find(k => k.includes('ExperimentPage-') &&
                    k.includes({json.dumps(json.dumps([experiment_id]))}) && k.endsWith('ReactComponentState'));
                if (!key) return false;
                const saved = JSON.parse(localStorage.getItem(key)), want = {json.dumps(state)};
                saved.runsExpanded = {{...(saved.runsExpanded || {{}}), ...want.runsExpanded}};
                saved.selectedColumns = want.selectedColumns;
                localStorage.setItem(key, JSON.stringify(saved));
                return true;
            }})()""")
            if patched:
                await browser.js("location.reload()")
                await asyncio.sleep(1)
            else:  # another UI version: click the sweep run's expander instead
                print("note: the runs table's saved settings were not found; expanding the sweep's run by a click "
                      "(default columns)", file=sys.stderr)
                await browser.js(f"""(() => {{
                    for (const row of document.querySelectorAll('[role=row]')) {{
                        const names = [...row.querySelectorAll('a')].map(a => a.innerText.trim());
                        const b = row.querySelector('button[data-component-id*="runnamecellrenderer"]');
                        if (b && names.includes({json.dumps(parent_name)})) {{ b.click(); return; }}
                    }}
                }})()""")
            await browser.wait_for(texts_shown([parent_name, trial_names[0]]),
                                   f"trial run {trial_names[0]!r} under {parent_name!r}", args.timeout)
            written.append(await capture(browser, target, width, args))  # the runs grid: taller, never wider
        except Failure as exc:
            raise await failed(browser, out, "experiment", exc)
        # (b) the Compare page of the trial runs (the UI's route: #/compare-runs?runs=[...]&experiments=[...])
        target = out / "compare.png"
        await browser.resize(height)
        query = (f"runs={urllib.parse.quote(json.dumps(trial_ids, separators=(',', ':')))}"
                 f"&experiments={urllib.parse.quote(json.dumps([experiment_id]))}&{WORKFLOW}")
        try:
            await browser.goto(f"{args.base}/#/compare-runs?{query}")
            await browser.wait_for(texts_shown(trial_names), "the trial runs on the Compare page", args.timeout)
            written.append(await capture(browser, target, args.max_width or width, args))
        except Failure as exc:
            raise await failed(browser, out, "compare", exc)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the MLflow server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", required=True, help="folder for experiment.png and compare.png")
    parser.add_argument("--sweep-run", default=os.environ.get("SWEEP_RUN") or None,
                        help="the sweep's parent run (id or name); default: the newest run tagged kind=sweep")
    parser.add_argument("--window", default=os.environ.get("WINDOW_SIZE", "1600,1000"), help="WIDTH,HEIGHT")
    parser.add_argument("--max-height", type=int, default=int(os.environ.get("MAX_HEIGHT", "3000")),
                        help="grow the window up to this height so that every run shows")
    parser.add_argument("--max-width", type=int, default=int(os.environ.get("MAX_WIDTH", "0")),
                        help="widen the Compare page up to this width so that every trial's column shows "
                             "(default: the window's width)")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("PAGE_TIMEOUT", "120")),
                        help="seconds to wait for each page")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM") or next(
        (c for c in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable") if shutil.which(c)),
        "chromium"))
    parser.add_argument("--log", default=os.devnull, help="where Chromium's own messages go")
    args = parser.parse_args()
    args.base = args.base.rstrip("/")
    try:
        experiment_id, parent, trials = find_sweep(args.base, args.experiment, args.sweep_run)
        for path in asyncio.run(shoot(args, experiment_id, parent, trials)):
            print(f"wrote {path}")
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
