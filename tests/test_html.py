"""--format html: frequency response against dense references, a self-contained page with charts,
and the page as a real browser draws it (skips without chromium)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil
import subprocess
from functools import cache
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipaudit.errors import UsageError
from lipaudit.formats import html as html_format
from lipaudit.formats.html import frequency_response

ROOT = Path(__file__).resolve().parent.parent


def _symbol_norm(k: np.ndarray, w: tuple[float, ...]) -> float:
    """sigma_max of sum_p K_p e^{-i w.p}, summed tap by tap in numpy, LAPACK SVD in float64."""
    sym = np.zeros(k.shape[:2], dtype=np.complex128)
    for p in itertools.product(*(range(s) for s in k.shape[2:])):
        sym += k[(slice(None), slice(None), *p)] * np.exp(-1j * float(np.dot(w, p)))
    return float(np.linalg.norm(sym, 2))


def _circular_matrix_norm(k: torch.Tensor, n: int) -> float:
    """Norm of the circular convolution on an n^d input: push every basis vector through conv."""
    d = k.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    c_in = k.shape[1]
    size = c_in * n**d
    basis = torch.eye(size, dtype=torch.float64).reshape(size, c_in, *([n] * d))
    pad: list[int] = []
    for s in reversed(k.shape[2:]):
        pad += [0, s - 1]
    out = conv(F.pad(basis, pad, mode="circular"), k)
    return float(np.linalg.norm(out.reshape(size, -1).numpy().T, 2))


def _w(n: int, j: int) -> float:
    return 2 * math.pi * (j - n // 2) / n


@pytest.mark.parametrize(("shape", "n"), [((3, 2, 3, 3), 8), ((2, 4, 2, 4), 7), ((5, 5, 1, 1), 6), ((2, 3, 5, 2), 3)])
def test_conv2d_grid_matches_numpy_at_every_point(shape: tuple[int, ...], n: int) -> None:
    g = torch.Generator().manual_seed(sum(shape) + n)
    k = torch.randn(shape, generator=g, dtype=torch.float64)
    grid = frequency_response(k, n)
    assert grid.shape == (n, n)
    kn = k.numpy()
    for j1, j2 in itertools.product(range(n), range(n)):
        assert grid[j1, j2].item() == pytest.approx(_symbol_norm(kn, (_w(n, j1), _w(n, j2))), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("n", [6, 8])
def test_grid_maximum_is_the_circular_convolution_norm(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    k = torch.randn(3, 2, 3, 2, generator=g, dtype=torch.float64)  # an even kernel axis too
    assert float(frequency_response(k, n).max()) == pytest.approx(_circular_matrix_norm(k, n), rel=1e-9)
    k1 = torch.randn(4, 3, 4, generator=g, dtype=torch.float64)
    curve = frequency_response(k1, n)
    assert curve.shape == (n,)
    assert float(curve.max()) == pytest.approx(_circular_matrix_norm(k1, n), rel=1e-9)


def test_conv3d_plane_values_are_symbol_norms_and_below_the_certified_bound() -> None:
    from lipaudit.spectral.conv import conv_interval

    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 3, 3, 3, 2, generator=g, dtype=torch.float64)
    plane = frequency_response(k, 8)
    assert plane.shape == (8, 8)
    upper = conv_interval(k, 1e-3).upper
    assert float(plane.max()) <= upper
    # the plane is some w3 = c of the coarse grid: one c makes every point agree with numpy
    kn = k.numpy()
    hits = []
    for j3 in range(8):
        c = _w(8, j3)
        ref = [_symbol_norm(kn, (_w(8, a), _w(8, b), c)) for a, b in [(0, 0), (3, 5), (7, 2)]]
        hits.append(all(math.isclose(plane[a, b].item(), r, rel_tol=1e-9)
                        for (a, b), r in zip([(0, 0), (3, 5), (7, 2)], ref, strict=True)))
    assert any(hits)
    # a kernel flat along the third axis gives the 2-D response
    flat = k[..., :1]
    assert torch.allclose(frequency_response(flat, 8), frequency_response(flat[..., 0], 8), rtol=1e-10)


def test_fp16_bf16_zero_and_nonfinite_kernels() -> None:
    k = torch.randn(4, 4, 3, 3)
    ref = frequency_response(k.half().double(), 8)
    assert torch.allclose(frequency_response(k.half(), 8), ref)
    assert torch.allclose(frequency_response(k.bfloat16(), 8), frequency_response(k.bfloat16().double(), 8))
    assert float(frequency_response(torch.zeros(2, 2, 3, 3), 8).abs().max()) == 0.0
    bad = k.clone()
    bad[0, 0, 0, 0] = math.inf
    assert bool(frequency_response(bad, 8).isnan().all())
    with pytest.raises(ValueError):
        frequency_response(torch.zeros(2, 2), 8)


def test_extreme_magnitudes_scale_exactly() -> None:
    k = torch.randn(3, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    base = frequency_response(k, 8)
    for scale in (1e-150, 1e150):
        # the Gram squares the entries: 1e+-150 keeps them inside float64
        assert torch.allclose(frequency_response(k * scale, 8) / scale, base, rtol=1e-9)


def test_wide_kernels_stay_within_the_work_cap() -> None:
    import time

    k = torch.randn(192, 160, 3, 3, dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    grid = frequency_response(k, 64, max_work=1e9)
    took = time.perf_counter() - start
    m = grid.shape[0]
    assert 8 <= m < 64 and grid.shape == (m, m)
    assert took < 30
    kn = k.double().numpy()
    assert grid[1, 2].item() == pytest.approx(_symbol_norm(kn, (_w(m, 1), _w(m, 2))), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# the page


@cache
def _report_json(name: str, fail_above: float | None, assume: tuple[str, ...] = ()) -> str:
    from lipaudit.audit import audit
    from lipaudit.checkpoint import open_checkpoint
    from lipaudit.report import Settings

    ckpt = open_checkpoint(str(ROOT / "fixtures" / name), None)
    return json.dumps(audit(ckpt, Settings(fail_above=fail_above, assume=assume)).to_dict())


def _report(name: str = "demo_sn_cnn.pt", fail_above: float | None = 5.0,
            assume: tuple[str, ...] = ("chain",)) -> dict[str, Any]:
    """The demo is a plain chain, so its product is certified under --assume chain."""
    return json.loads(_report_json(name, fail_above, assume))  # type: ignore[no-any-return]


def _heatmaps(report: dict[str, Any]) -> dict[str, Any]:
    sd = torch.load(ROOT / "fixtures" / "demo_sn_cnn.pt", weights_only=True)
    return {x["tensor"]: frequency_response(sd[x["tensor"]], 32) for x in report["layers"] if x["kind"] == "conv2d"}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self.figures: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "figure":
            self.figures.append([])
        elif self.figures and self.stack.count("figure"):
            self.figures[-1].append(tag)
        self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if self.figures and self.stack.count("figure"):
            self.figures[-1].append(tag)

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason='needs the html extra: pip install "lipaudit[html]"')


@needs_matplotlib
def test_page_leads_with_verdict_and_bracket_then_chart_findings_assumptions_last() -> None:
    report = _report()
    maps = _heatmaps(report)
    page = html_format.render_html(report, maps)
    p = _parse(page)
    classes = [a.get("class") or "" for t, a in p.tags if t == "figure"]
    assert any("norm-chart" in c for c in classes) and any("heatmaps" in c for c in classes)
    # the per-layer chart is a sortable table, one row per layer with its values on hover
    rows = [a for t, a in p.tags if t == "tr" and a.get("title")]
    assert len(rows) == len(report["layers"])
    for x, row in zip(report["layers"], rows, strict=True):
        assert x["name"] in str(row["title"]) and f"{x['sigma']['upper']:.5g}" in str(row["title"])
    # the heatmaps are an inline SVG with one image per heatmap and one per colour bar
    assert len(p.figures) == 2 and "table" in p.figures[0] and "svg" in p.figures[1]
    assert sum(t == "image" for t in p.figures[1]) == 2 * len(maps)
    text = " ".join(p.text)
    assert f"L \u2264 {report['network']['lipschitz_upper']:.5g}" in text and "certified" in text
    # order: verdict, bound, layers, heatmaps, findings, assumptions
    marks = ["FAILED", "L \u2264", "Layers", "Frequency response", "Findings", "Assumptions of the network bound"]
    where = [page.index(m if m != "L \u2264" else "L &le;") for m in marks]
    assert where == sorted(where), list(zip(marks, where, strict=True))
    assert "LIP001" in page[: page.index("Layers")]  # the verdict says why it failed
    for a in report["network"]["assumptions"]:
        assert a in text
    for f in report["findings"]:
        assert f["code"] in text and f["message"] in text
    for x in report["layers"]:
        assert x["name"] in text


@needs_matplotlib
def test_an_estimate_is_never_shown_as_a_bound() -> None:
    report = _report("lstm_train_state.pt", None)
    assert report["network"]["certified"] is False
    page = html_format.render_html(report, {})
    text = " ".join(_parse(page).text)
    assert "no certified bound" in text and "L \u2264" not in text and "estimate" in text


@needs_matplotlib
def test_graph_reports_show_the_dominant_path() -> None:
    from tests.conftest import run

    doc = json.loads(run("inspect", ROOT / "fixtures" / "residual.pt2", "--format", "json", "-q",
                         "--no-measure").stdout)
    path = doc["network"]["details"]["dominant_path"]
    page = html_format.render_html(doc, {})
    assert "Dominant path" in page and all(f"<code>{n}</code>" in page for n in path)
    doc["network"]["details"] = None  # a chain has none: the section is left out
    assert "Dominant path" not in html_format.render_html(doc, {})


@needs_matplotlib
def test_graph_reports_show_each_block_with_its_rule() -> None:
    from tests.conftest import run

    doc = json.loads(run("inspect", ROOT / "fixtures" / "resnet_small.pt2", "--format", "json", "-q",
                         "--no-measure").stdout)
    blocks = doc["network"]["details"]["blocks"]
    assert blocks
    page = html_format.render_html(doc, {})
    assert "<h2>Blocks</h2>" in page
    for b in blocks:
        assert f"<code>{b['entry']}</code> &rarr; <code>{b['exit']}</code>" in page
        assert b["rule"] in page
    doc["network"]["details"]["blocks"] = [{**blocks[0], "skipped": "over the block work budget"}]
    assert "skipped: over the block work budget" in html_format.render_html(doc, {})
    md = run("inspect", ROOT / "fixtures" / "resnet_small.pt2", "--format", "markdown", "-q", "--no-measure").stdout
    assert f"{len(blocks)} blocks bounded as a whole" in md or "1 block bounded as a whole" in md



@needs_matplotlib
def test_graph_reports_show_the_slope_floor() -> None:
    """The floor is in the JSON bracket, the HTML card and block table and the Markdown block table;
    --floor-work 0 leaves it out."""
    from tests.conftest import run

    args = ("inspect", ROOT / "fixtures" / "resnet_small.pt2", "--format", "json", "-q", "--measure-work", "20")
    doc = json.loads(run(*args, "--floor-work", "60").stdout)
    details = doc["network"]["details"]
    floor, upper = details["bracket"]["slope_floor"], details["bracket"]["upper"]
    assert 0 < floor <= upper and details["floor"]["work"] <= 60 and doc["settings"]["floor_work"] == 60
    page = html_format.render_html(doc, {})
    assert "slope floor" in page and "<th>slope floor</th>" in page
    floored = [b for b in details["blocks"] if "floor" in b]
    assert all(b["floor"] <= b["upper"] for b in floored)
    off = json.loads(run(*args, "--floor-work", "0").stdout)["network"]["details"]
    assert off["slope_floor"] is None and off["floor"] == {}
    assert all("floor" not in b for b in off["blocks"])
    from lipaudit.formats import fmt_num
    from lipaudit.formats.markdown import _blocks

    rows = "\n".join(_blocks(details))
    assert "| slope floor |" in rows and all(f"| {fmt_num(b['floor'])} |" in rows for b in floored)

def _scripts(page: str) -> list[dict[str, str | None]]:
    return [a for t, a in _parse(page).tags if t == "script"]


@needs_matplotlib
def test_page_fetches_nothing() -> None:
    report = _report()
    page = html_format.render_html(report, _heatmaps(report))
    for tag, attrs in _parse(page).tags:
        assert tag not in ("link", "iframe", "object", "embed")
        for name in ("src", "href", "xlink:href"):
            value = attrs.get(name)
            assert value is None or value.startswith(("data:", "#")), (tag, name, value[:60])
    assert _scripts(page) == [{}]  # the one inline sorting script
    assert "url(http" not in page and "@import" not in page and "fetch(" not in page


@needs_matplotlib
def test_hostile_names_are_inert() -> None:
    report = _report()
    report["checkpoint"]["path"] = "<script>alert(1)</script>.pt"
    for x in report["layers"]:
        x["name"] = "$\\frac{a}{b}$ <img src=x onerror=alert(1)> \x1b[31m\u202e\" title=x"
    report["findings"][0]["message"] = "</td><script>alert(2)</script>"
    page = html_format.render_html(report, {report["layers"][0]["tensor"]: [[1.0, 2.0], [3.0, 4.0]]})
    p = _parse(page)
    assert not any(t == "img" for t, _ in p.tags) and _scripts(page) == [{}]
    assert all(not k.startswith("on") for _, a in p.tags for k in a)
    assert "\x1b" not in page and "\u202e" not in page


@needs_matplotlib
def test_mathtext_names_do_not_crash_the_page(tmp_path: Path) -> None:
    """issue 17 item 8: matplotlib read $\\foo$ as a formula and the page exited 70."""
    from tests.conftest import run

    torch.manual_seed(0)
    ckpt = tmp_path / "math.pt"
    torch.save({"$\\foo$.weight": torch.randn(4, 3, 3, 3), "$x^{$.weight": torch.randn(4, 4, 3, 3)}, ckpt)
    out = tmp_path / "m.html"
    result = run("inspect", ckpt, "--format", "html", "-o", out)
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert "$\\foo$" in page and 'class="chart heatmaps"' in page


@needs_matplotlib
def test_many_layers_error_document_and_lists() -> None:
    report = _report()
    template = report["layers"][0]
    report["layers"] = [dict(template, name=f"l{i}", tensor=f"l{i}.weight",
                             sigma=dict(template["sigma"], upper=1.0 + i, lower=1.0 + i)) for i in range(80)]
    page = html_format.render_html(report, {"l3.weight": [0.5, 1.0, 0.7]})
    assert all(f"<td>l{i}<" in page or f"<td>l{i} (sn)<" in page for i in range(80))
    error = {"schema_version": 1, "tool": {"name": "lipaudit", "version": "0.1.0"},
             "error": {"code": "unsafe_input", "exit_code": 3, "message": "pickle calls os.system", "path": "x.pt"}}
    many = html_format.render_html({"reports": [_report(), error]})
    assert many.count("<section>") == 2 and "pickle calls os.system" in many


def test_without_matplotlib_the_message_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UsageError, match=r'pip install "lipaudit\[html\]"') as info:
        html_format.render_html(_report(), {})
    assert info.value.exit_code == 2


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@needs_matplotlib
@pytest.mark.skipif(_browser() is None, reason="no headless chromium installed")
def test_a_real_browser_draws_and_sorts_the_page(tmp_path: Path) -> None:
    report = _report()
    page = tmp_path / "report.html"
    page.write_text(html_format.render_html(report, _heatmaps(report)), encoding="utf-8")
    browser = _browser()
    assert browser is not None
    # after layout: the heatmap SVG has a drawn size, each bar has width, and a click on the
    # "sigma upper" head sorts the rows by that value (the page's own script)
    script = (
        "<script>window.addEventListener('load',()=>{"
        "const s=document.querySelector('figure.heatmaps svg').getBoundingClientRect();"
        "const bars=[...document.querySelectorAll('table.layers .bar .up')].map(b=>b.getBoundingClientRect().width);"
        "const th=[...document.querySelectorAll('table.layers th')].find(h=>h.textContent==='sigma upper');"
        "th.click();"  # the first click sorts largest first
        "const order=[...document.querySelectorAll('table.layers tbody tr')].map(r=>r.cells[0].textContent);"
        "const v=document.querySelector('.card.verdict').getBoundingClientRect();"
        "document.title='PROBE '+JSON.stringify({svg:[s.width,s.height],bars:bars,order:order,verdict:v.top});"
        "})</script>"
    )
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    title = dom.stdout.split("<title>", 1)[1].split("</title>", 1)[0]
    seen = json.loads(title.removeprefix("PROBE ").replace("&quot;", '"'))
    assert seen["svg"][0] > 300 and seen["svg"][1] > 150, seen
    assert len(seen["bars"]) == len(report["layers"]) and all(w > 0 for w in seen["bars"]), seen
    by_upper = sorted(report["layers"], key=lambda x: -x["sigma"]["upper"])
    assert [s.removesuffix(" (sn)") for s in seen["order"]] == [x["name"] for x in by_upper], seen
    assert seen["verdict"] < 400  # the verdict is on the first screen
    shot = tmp_path / "shot.png"
    run = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.stat().st_size > 10_000, run.stderr[-2000:]
    # the screenshot is not blank: the verdict's red and the bars' colours are drawn
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
