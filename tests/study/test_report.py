"""Report statistics against scipy, and the HTML report opened in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from scipy import stats

from trainwell.study.execute import run_study
from trainwell.study.report import verdict, write_report
from trainwell.study.statistics import mean_ci, summarize
from trainwell.study.store import Store


def test_mean_ci_matches_scipy():
    values = [0.3, 0.5, 0.45, 0.2]
    low, high = stats.t.interval(
        0.95, len(values) - 1, loc=sum(values) / 4, scale=stats.sem(values)
    )
    mean, half = mean_ci(values)
    assert mean == pytest.approx((low + high) / 2) and half == pytest.approx((high - low) / 2)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    raw = {"epochs": 2, "data": {"train_size": 120}, "model": {"hidden": [16]},
           "gradients": {"monitor": True, "monitor_every": 1},
           "ablation": {"seeds": 2, "grid": {"l2": [1e-2]},
                        "variants": {"ema": {"ema.enabled": True},
                                     "bad": {"optimizer.name": "sgd", "optimizer.lr": 1e6,
                                             "gradients.skip_nonfinite": False}}}}  # fmt: skip
    store = Store(f"sqlite:///{out / 'results.sqlite'}")
    run_study(raw, store)
    return store, out


def test_paired_difference_and_verdict(study):
    store, _ = study
    runs = store.runs(store.study_id())
    rows = summarize(runs)
    l2 = next(r for r in rows if r["variant"] == "l2=0.01")
    by = {(r["variant"], r["seed"]): r["final"]["test_nll"] for r in runs if r["status"] == "done"}
    diffs = [by[("l2=0.01", s)] - by[("base", s)] for s in (0, 1)]
    assert l2["d_test_nll"] == pytest.approx(mean_ci(diffs))
    a, b = ([by[(v, s)] for s in (0, 1)] for v in ("l2=0.01", "base"))
    assert l2["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    family = [r["p"] for r in rows if r["n"] and r["variant"] != "base"]  # l2, ema, EMA weights
    assert len(family) == 3 and l2["p_adj"] == pytest.approx(
        max(min(1.0, (3 - i) * p) for i, p in enumerate(sorted(family)) if p <= l2["p"])
    )
    assert any(r["variant"] == "ema [EMA weights]" for r in rows)
    assert "failed: bad" in verdict(rows)


def test_report_in_headless_chromium(study):
    store, out = study
    path = write_report(store, out)
    text = path.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") >= 3
    # the recommendation first, then the table (with its adjusted-p column), then figures
    assert text.index("<h2>Recommendation</h2>") < text.index("<th>p (Holm)</th>")
    assert text.index("<th>p (Holm)</th>") < text.index("data:image/png")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); HTML checked without it")
    probe = out / "probe.html"
    script = ("<script>window.onload=()=>{const i=[...document.images];"
              "document.body.setAttribute('data-probe',i.length+'/'+i.filter(x=>x.complete&&"
              "x.naturalWidth>0).length+'/'+document.querySelectorAll('#results tbody tr').length)}"
              "</script></body>")  # fmt: skip
    probe.write_text(text.replace("</body>", script), encoding="utf-8")
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    found = re.search(r'data-probe="(\d+)/(\d+)/(\d+)"', dom)
    assert found, dom[-500:]
    images, loaded, rows = map(int, found.groups())
    assert images >= 3 and loaded == images
    assert rows == len(summarize(store.runs(store.study_id())))  # one row per variant
