"""The view page (stages/view.py) in a real Chromium: Debian's `chromium` driven by Playwright's Python package, on
a 6-run demo_lr sweep, a single demo run, a run still without weights and a run whose encoder files moved.

One page server (the real stage, in a subprocess) and one browser for the session. Every request the page makes
is routed: any host but 127.0.0.1 is aborted and fails the test, and so does an uncaught page error. A screenshot
per test goes to pytest's temporary directory (and, with MINIVLM_DOCS_SHOTS=docs/img, the three of the docs
there). Locally the tier skips only when chromium is absent; under CI=true it never skips."""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import REPO, train_config
from minivlm.config import to_toml, to_tree

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]
TRAIN = ["train.max_steps=100", "train.warmup_steps=5", "train.eval_interval=50", "train.log_interval=5",
         "train.save_interval=0"]
SINGLE_IMAGE = "images/val/00000.jpg"
N_HELD_OUT = 4
BEST = "lr=5e-3,projector=mlp"  # the sweep's run that learns most in 100 steps: a caption of words
CI = os.environ.get("CI") == "true"


def need_browser():
    """Skip without chromium, except under CI, where the tier must run (.ci/run installs chromium)."""
    try:
        import playwright.sync_api  # noqa: F401
        missing = []
    except ImportError:
        missing = ["playwright"]
    missing += [] if Path(CHROMIUM).is_file() else ["chromium"]
    if missing:
        (pytest.fail if CI else pytest.skip)(f"{', '.join(missing)} missing: apt-get install chromium; make install")


@pytest.fixture(scope="session")
def view_runs(demo, demo_cache, tmp_path_factory) -> dict[str, Path]:
    """configs/sweeps/demo_lr.toml's six runs (100 tiny steps each) trained and summarised by the sweep's own plan
    and report (in this process: six training subprocesses would cost a minute), a single demo run, a copy of it
    without weights (config and metrics only: still training) and one whose encoder files moved."""
    from minivlm.dist import Dist
    from minivlm.training.sweep import Outcome, load_sweep, plan, report
    from minivlm.training.trainer import fit
    need_browser()
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the page server and the caption stage run (bitwise-equal greedy tokens)
    work = tmp_path_factory.mktemp("view")
    (work / "base.toml").write_text(to_toml(to_tree(train_config(demo, demo_cache, work, *TRAIN))))
    sweep = REPO / "configs" / "sweeps" / "demo_lr.toml"
    spec = load_sweep(sweep)
    base, runs = plan(spec, work / "base.toml", [], str(sweep))
    outcomes = {}
    for run in runs:
        t = time.time()
        fit(run.cfg, Dist())
        outcomes[run.name] = Outcome("done", wall_s=round(time.time() - t, 1))
    sweep_dir = Path(base.train.out_dir) / spec.name
    report(sweep_dir, runs, outcomes)
    single = train_config(demo, demo_cache, work, *TRAIN, "train.lr=5e-3", "train.run_name=demo")
    fit(single, Dist())
    torch.set_num_threads(threads)
    demo_run = single.train.run_dir
    unfinished = work / "runs" / "unfinished"
    unfinished.mkdir()
    for name in ("config.toml", "metrics.jsonl"):
        shutil.copy(demo_run / name, unfinished / name)
    moved = work / "runs" / "moved"
    shutil.copytree(demo_run, moved, ignore=shutil.ignore_patterns("checkpoints", "view"))
    mc = json.loads((moved / "model_config.json").read_text())
    mc["encoder"]["name_or_path"] = str(work / "encoder_moved_away")
    (moved / "model_config.json").write_text(json.dumps(mc))
    return {"sweep": sweep_dir, "demo": demo_run, "unfinished": unfinished, "moved": moved, "images": demo}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def browser():
    need_browser()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def caption_stage(view_runs, server):
    """stages/caption.py's caption of the held-out image for the demo run, as it prints it (`path: caption`): a
    subprocess started once the page server is up (its open time is its own), read when asked."""
    image = view_runs["images"] / SINGLE_IMAGE
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    runs = {"demo": view_runs["demo"]}
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "stages" / "caption.py"), "--run", str(d), "--image",
                                     str(image)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, d in runs.items()}
    out = {}

    def collect() -> dict[str, str]:
        for name, proc in procs.items():
            if name not in out:
                stdout, stderr = proc.communicate(timeout=300)
                assert proc.returncode == 0, stderr[-2000:]
                out[name] = stdout.removesuffix("\n").removeprefix(f"{image}: ")
        return out
    yield collect
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def server(view_runs, browser, tmp_path_factory):
    """stages/view.py on the runs, on a free loopback port; `open_s`: process start to the first page loaded."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    paths = [view_runs[k] for k in ("sweep", "demo", "unfinished", "moved")]
    proc = subprocess.Popen([sys.executable, str(REPO / "stages" / "view.py"), "--runs", *map(str, paths), "--port",
                             str(port), "--n", str(N_HELD_OUT)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    printed = [proc.stdout.readline() for _ in range(2)]
    url = f"http://127.0.0.1:{port}/"
    assert printed[0].strip().endswith(url) and f"ssh -L {port}:127.0.0.1:{port}" in printed[1], printed
    page = browser.new_page()
    deadline = time.time() + 120
    while True:  # the URL is printed before the server listens
        try:
            page.goto(url, wait_until="load")
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.2)
    page.wait_for_selector("#runs-table table")
    open_s = time.time() - t0
    page.close()
    out = tmp_path_factory.getbasetemp() / "view-open-time.txt"
    out.write_text(f"{open_s:.1f} s from process start to the first page load\n")
    yield {"url": url, "open_s": open_s, "proc": proc}
    proc.kill()  # nothing to flush: the held-out captions it kept were written atomically
    proc.wait()


class Guard:
    """Every request routed: 127.0.0.1 goes through, anything else is aborted and recorded; page errors too."""

    def __init__(self):
        self.off_host, self.errors = [], []

    def route(self, route):
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            self.off_host.append(route.request.url)
            route.abort()


@pytest.fixture
def page(browser, server, caption_stage, request, tmp_path_factory):
    """A fresh browser context on the page, every request routed through a Guard. (caption_stage: its stage
    subprocess starts with the first test and runs while the table tests do.)"""
    guard = Guard()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.route("**/*", guard.route)
    pg = context.new_page()
    pg.on("pageerror", lambda e: guard.errors.append(str(e)))
    pg.guard = guard
    pg.goto(server["url"], wait_until="load")
    pg.wait_for_selector("#runs-table table")
    yield pg
    shots = tmp_path_factory.getbasetemp() / "view-screenshots"
    shots.mkdir(exist_ok=True)
    pg.screenshot(path=str(shots / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert guard.off_host == [], f"requests left 127.0.0.1: {guard.off_host}"
    assert guard.errors == [], f"uncaught page errors: {guard.errors}"


def docs_shot(pg, name: str) -> None:
    """With MINIVLM_DOCS_SHOTS=docs/img: the whole page, on the tab the docs show, saved as view-NAME.png."""
    folder = os.environ.get("MINIVLM_DOCS_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(Path(folder) / f"view-{name}.png"), full_page=True)


def table_rows(pg, selector: str) -> list[dict[str, str]]:
    """The rows of a Dataframe as the browser shows them, by header, read through its ARIA grid roles."""
    grid = pg.locator(f"{selector} [role=grid]")
    heads = [h.inner_text().strip() for h in grid.locator("[role=columnheader]").all()]
    return [dict(zip(heads, (c.inner_text().strip() for c in row.locator("[role=gridcell]").all())))
            for row in grid.locator("[role=row]").all()[1:]]


def html_table(pg, selector: str) -> list[dict[str, str]]:
    heads = [h.inner_text().strip() for h in pg.locator(f"{selector} thead th").all()]
    return [dict(zip(heads, (c.inner_text().strip() for c in row.locator("td").all())))
            for row in pg.locator(f"{selector} tbody tr").all()]


def summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_runs_table_lists_every_run_with_summary_csv_numbers(page, view_runs):
    rows = {r["run"]: r for r in table_rows(page, "#runs-table")}
    sweep = view_runs["sweep"].name
    expected = summary(view_runs["sweep"])
    assert len(expected) == 6 and set(rows) == {f"{sweep}/{r['run']}" for r in expected} | {"demo", "unfinished",
                                                                                             "moved"}
    for want in expected:
        got = rows[f"{sweep}/{want['run']}"]
        assert got["best_eval_loss"] == f"{float(want['best_eval_loss']):.4f}"
        assert got["image_gap"] == f"{float(want['image_gap']):.4f}"
        assert got["status"] == want["status"] == "done"
        assert got["overrides"] == f"train.lr={want['train.lr']} model.projector={want['model.projector']}"
    assert rows["unfinished"]["status"] == "interrupted" and rows["demo"]["status"] == "done"
    assert page.locator("#train-loss svg").count() and page.locator("#eval-loss svg").count()  # curves drawn
    docs_shot(page, "runs")


def test_sorting_the_table_by_best_eval_loss(page):
    header = page.locator("#runs-table th", has_text="best_eval_loss").first
    header.hover()
    header.locator("button.cell-menu-button").click()
    page.get_by_role("menuitem", name="Sort descending").click()
    page.wait_for_timeout(300)
    losses = [float(r["best_eval_loss"]) for r in table_rows(page, "#runs-table")]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) > 1
    header.hover()
    header.locator("button.cell-menu-button").click()
    page.get_by_role("menuitem", name="Sort ascending").click()
    page.wait_for_timeout(300)
    assert [float(r["best_eval_loss"]) for r in table_rows(page, "#runs-table")] == sorted(losses)


def open_tab(pg, name: str) -> None:
    pg.get_by_role("tab", name=name).click()


def caption_upload(pg, image: Path, columns: int) -> list[dict[str, str]]:
    """Upload `image`, press Caption, wait for `columns` runs' captions (they appear run by run)."""
    open_tab(pg, "Caption")
    pg.locator("#upload input[type=file]").set_input_files(str(image))
    pg.wait_for_selector("#upload .file-preview, #upload table")
    pg.get_by_role("button", name="Caption", exact=True).click()
    pg.wait_for_function("n => document.querySelectorAll('#captions table.captions thead th').length === n",
                         arg=columns + 1, timeout=120_000)
    pg.wait_for_function("() => document.querySelector('#notes').innerText.includes('moved:')", timeout=60_000)
    return html_table(pg, "#captions table.captions")


def test_uploaded_held_out_image_gets_caption_stage_caption_from_every_selected_run_side_by_side(
        page, view_runs, caption_stage, one_thread):
    sweep = view_runs["sweep"].name
    captioned = [f"{sweep}/{r['run']}" for r in summary(view_runs["sweep"])] + ["demo"]
    rows = caption_upload(page, view_runs["images"] / SINGLE_IMAGE, len(captioned))
    stage = caption_stage()
    assert len(rows) == 1 and rows[0]["image"] == Path(SINGLE_IMAGE).name
    assert [k for k in rows[0] if k != "image"] == captioned  # every selected run that can caption, in order
    assert stage["demo"] != "" and rows[0]["demo"] == stage["demo"]
    from minivlm.use.captioner import caption_files, load_run
    for name in captioned[:-1]:  # the sweep's runs: caption_files, the function stages/caption.py calls
        cap = load_run(view_runs["sweep"] / name.partition("/")[2])
        cap.model.eval()
        (_, text, _), = caption_files(cap, [view_runs["images"] / SINGLE_IMAGE])
        assert rows[0][name] == (text or "(empty caption)"), name
    assert rows[0][f"{sweep}/{BEST}"] not in ("", "(empty caption)")
    notes = page.inner_text("#notes")
    assert "unfinished: no model.safetensors yet" in notes and "caption disabled" in notes
    moved = [ln for ln in notes.splitlines() if ln.startswith("moved:")]
    assert len(moved) == 1 and "encoder_moved_away" in moved[0]  # one line naming the run and the missing files
    docs_shot(page, "caption")


def test_held_out_grid_shows_each_runs_captions_and_reopening_computes_nothing(page, browser, server, view_runs):
    from minivlm.use.evaluation import evaluate_run
    open_tab(page, "Held-out images")
    page.click("#show-held-out")
    page.wait_for_selector("#held-out table.held-out", timeout=120_000)
    grid = html_table(page, "#held-out table.held-out")
    assert len(grid) == N_HELD_OUT and page.locator("#held-out img").count() == N_HELD_OUT
    sweep = view_runs["sweep"].name
    reference = {name: evaluate_run(d, n=N_HELD_OUT)["captions"] for name, d in
                 (("demo", view_runs["demo"]), (f"{sweep}/lr=5e-3,projector=linear",
                                                view_runs["sweep"] / "lr=5e-3,projector=linear"))}
    for name, samples in reference.items():  # stages/evaluate.py's captions of the same samples
        assert [row[name] for row in grid] == [s["generated"] or "(empty caption)" for s in samples]
        assert [row["reference"] for row in grid] == [s["reference"] for s in samples]
    kept = sorted(view_runs["sweep"].glob("*/view/held_out.json")) + [view_runs["demo"] / "view" / "held_out.json"]
    assert len(kept) == 7
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    docs_shot(page, "held-out")

    again = browser.new_page()  # the page reopened: the grid comes back, nothing is captioned again
    again.goto(server["url"], wait_until="load")
    open_tab(again, "Held-out images")
    t = time.time()
    again.click("#show-held-out")
    again.wait_for_selector("#held-out table.held-out", timeout=60_000)
    assert html_table(again, "#held-out table.held-out") == grid
    assert {p: p.stat().st_mtime_ns for p in kept} == stamps, "reopening wrote held-out captions again"
    assert time.time() - t < 30
    again.close()


def test_the_guard_fails_a_request_to_any_other_host(page):
    """The routing guard itself: a request the page makes elsewhere is caught (then forgiven here)."""
    page.evaluate("fetch('http://example.com/x').catch(() => null)")
    page.wait_for_timeout(300)
    assert page.guard.off_host == ["http://example.com/x"]
    page.guard.off_host.clear()
