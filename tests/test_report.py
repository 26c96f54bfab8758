"""The ablation report: statistics against references, and the page as a browser sees it."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess

import pytest

from trainwell.experiment import run_study
from trainwell.report import mean_ci, summarize, verdict, write_report
from trainwell.store import Store

TINY = {"epochs": 2, "batch_size": 32, "data": {"train_size": 120}, "model": {"hidden": [16]}}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_mean_ci_is_the_student_t_interval():
    scipy_stats = pytest.importorskip("scipy.stats")
    values = [0.91, 0.93, 0.9, 0.95, 0.92]
    mean, half = mean_ci(values)
    low, high = scipy_stats.t.interval(
        0.95, len(values) - 1, loc=statistics.mean(values), scale=scipy_stats.sem(values)
    )
    assert mean == pytest.approx(statistics.mean(values))
    assert half == pytest.approx((high - low) / 2)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    store = Store(f"sqlite:///{out / 'results.sqlite'}")
    raw = {**TINY, "ablation": {"seeds": 2, "grid": {"l2": [1e-3], "dropout.p": [0.3]}}}
    run_study(raw, store)
    return store, write_report(store, out), out


def test_report_numbers_come_from_the_runs(study):
    store, _, _ = study
    runs = store.runs(store.study_id())
    rows = summarize(runs)
    base = [r["final"]["test_acc"] for r in runs if r["variant"] == "base"]
    row = next(r for r in rows if r["variant"] == "base")
    assert row["n"] == 2
    found = [v for k, v in row.items() if "acc" in k and isinstance(v, tuple)]
    assert any(v[0] == pytest.approx(statistics.mean(base)) for v in found)
    assert "l2=0.001" in verdict(rows) or "dropout=0.3" in verdict(rows)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_in_headless_chromium_images_load_and_one_row_per_variant(study, tmp_path):
    store, report, out = study
    assert (out / "summary.png").is_file()
    probe = """<script>window.addEventListener('load', () => {
      const imgs = [...document.images];
      document.title = JSON.stringify({images: imgs.length,
        loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
        rows: document.querySelectorAll('#results tbody tr').length});
    });</script>"""
    page = tmp_path / "probe.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]  # fmt: skip
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    title = re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    seen = json.loads(title.replace("&quot;", '"'))
    runs = store.runs(store.study_id())
    assert seen["images"] >= 1 and seen["loaded"] == seen["images"]
    assert seen["rows"] == len({(r["data"], r["variant"]) for r in runs})
