"""A self-contained HTML report: charts drawn by matplotlib as inline SVG, nothing fetched."""

from __future__ import annotations

import html
import io
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lipaudit.errors import UsageError
from lipaudit.text import visible

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

INSTALL_HINT = 'the html format needs matplotlib: pip install "lipaudit[html]"'
# Layers drawn in the norm chart; beyond it the largest uppers are kept.
MAX_CHART_LAYERS = 60
# Frequencies whose symbols are held at once in frequency_response (bytes).
_CHUNK_BYTES = 64 * 2**20
# Default work cap of one frequency_response, in estimated flops (at most a few seconds on one
# core): up to 64 channels get 64x64, 128 about 34x34, 256 about 12x12, 512 and up the
# coarsest grid, 8x8.
MAX_WORK = 4e10

Grid = Any  # a torch.Tensor or nested lists of floats


# ---------------------------------------------------------------------------------------------
# frequency response


def _centred(n: int) -> torch.Tensor:
    """w_j = 2 pi (j - n // 2) / n: -pi (or nearly) to below pi, 0 in the middle."""
    import torch

    return (torch.arange(n, dtype=torch.float64) - n // 2) * (2 * math.pi / n)


def _top_sigma(sym: torch.Tensor) -> torch.Tensor:
    """sigma_max of each matrix of a batch, from the Gram matrix on the smaller side (same top
    eigenvalue, sigma_max^2; Hermitian eigenvalues are cheaper than singular values)."""
    import torch

    gram = sym @ sym.mH if sym.shape[1] <= sym.shape[2] else sym.mH @ sym
    top: torch.Tensor = torch.linalg.eigvalsh(gram)[:, -1].clamp(min=0).sqrt()
    return top


def _sigma_at(k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sigma_max(K^(w)) for frequencies w (B, d), K^(w) = sum_p K[:, :, p] e^{-i w.p}, in float64
    (K may be complex)."""
    import itertools

    import torch

    co, ci = int(k.shape[0]), int(k.shape[1])
    ks = tuple(int(s) for s in k.shape[2:])
    taps = math.prod(ks)
    positions = torch.tensor(list(itertools.product(*(range(s) for s in ks))), dtype=torch.float64)
    table = k.reshape(co * ci, taps).T.to(torch.complex128)  # (taps, co * ci)
    small = min(co, ci)
    per_point = 16 * (co * ci + small * small + taps)
    # small batches: batched LAPACK calls slow down per matrix on large batches
    step = max(1, min(32, _CHUNK_BYTES // per_point))
    out = torch.empty(w.shape[0], dtype=torch.float64)
    for start in range(0, w.shape[0], step):
        phases = torch.exp(-1j * (w[start : start + step] @ positions.T))
        out[start : start + step] = _top_sigma((phases @ table).reshape(-1, co, ci))
    return out


def _half_grid(k: torch.Tensor, axes: list[torch.Tensor]) -> torch.Tensor:
    """The full grid over the given centred axes, computing only the half with the last axis at
    or below 0: a real kernel has sigma(-w) = sigma(w)."""
    import torch

    n_last = axes[-1].shape[0]
    h = n_last // 2
    half_axes = [*axes[:-1], axes[-1][: h + 1]]
    w = torch.cartesian_prod(*half_axes).reshape(-1, len(axes))
    half = _sigma_at(k, w).reshape(*(a.shape[0] for a in half_axes))
    full = torch.empty(*(a.shape[0] for a in axes), dtype=torch.float64)
    full[..., : h + 1] = half
    if n_last > h + 1:
        # index j holds -w at (2h - j) mod n, per axis
        idx = [(2 * (a.shape[0] // 2) - torch.arange(a.shape[0])) % a.shape[0] for a in axes]
        mirror = full
        for dim, ix in enumerate(idx[:-1]):
            mirror = mirror.index_select(dim, ix)
        cols = torch.arange(h + 1, n_last)
        full[..., h + 1 :] = mirror.index_select(len(axes) - 1, idx[-1][cols])
    return full


def _side(n: int, dims: int, per_point: float, max_work: float) -> int:
    """The largest grid side up to n (at least 8) whose half grid fits the work cap."""
    while n > 8 and n ** (dims - 1) * (n // 2 + 1) * per_point > max_work:
        n = max(8, int(n * 0.85))
    return n


def frequency_response(kernel: torch.Tensor, n: int = 64, max_work: float = MAX_WORK) -> torch.Tensor:
    """sigma_max(K^(w)) of a conv kernel (c_out, c_in, k_1, ..., k_d) on a centred frequency grid,
    w_j = 2 pi (j - m // 2) / m, j < m: a curve (m,) for conv1d, a torus (m, m) for conv2d, and
    for conv3d the (w_1, w_2) plane through the largest value of a coarse 3-D grid. m is n, or
    less when the grid would cost more than max_work. Display only, no certificate: float64
    eigenvalues of the Gram symbols. The grid's maximum is a lower bound of the operator norm S(K)."""
    import torch

    d = kernel.ndim - 2
    if d not in (1, 2, 3):
        raise ValueError(f"expected a conv kernel with 1 to 3 spatial axes, got shape {tuple(kernel.shape)}")
    if n < 2:
        raise ValueError("n must be at least 2")
    k = kernel.detach().to("cpu", torch.float64)
    co, ci = int(k.shape[0]), int(k.shape[1])
    small, large = min(co, ci), max(co, ci)
    taps = math.prod(int(s) for s in k.shape[2:])
    # flops of one frequency: the symbol, its Gram matrix, the Hermitian eigenvalues
    per_point = float(8 * taps * co * ci + 8 * small * small * large + 20 * small**3) + 1
    dims = min(d, 2)
    m = _side(n, dims, per_point, max_work)
    if co == 0 or ci == 0 or taps == 0:
        return torch.zeros((m,) * dims, dtype=torch.float64)
    if not bool(torch.isfinite(k).all()):
        return torch.full((m,) * dims, math.nan, dtype=torch.float64)
    threads = torch.get_num_threads()
    if threads > 1:
        # batches of small eigenproblems: one thread is many times faster (no pool handoffs)
        torch.set_num_threads(1)
    try:
        return _grid(k, d, m, per_point, max_work)
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def _grid(k: torch.Tensor, d: int, m: int, per_point: float, max_work: float) -> torch.Tensor:
    import torch

    if d < 3:
        return _half_grid(k, [_centred(m)] * d)
    coarse = _side(min(m, 16), 3, per_point, max_work / 2)
    cube = _half_grid(k, [_centred(coarse)] * 3)
    w3 = float(_centred(coarse)[int(cube.amax(dim=(0, 1)).argmax())])
    # the plane w_3 = c: fold the third axis into the kernel, K'_{p1 p2} = sum_p3 K_p e^{-i c p3}
    phase = torch.exp(-1j * w3 * torch.arange(k.shape[4], dtype=torch.float64))
    folded = torch.einsum("oiabc,c->oiab", k.to(torch.complex128), phase)
    # a complex kernel has no sigma(-w) = sigma(w): the whole plane is computed
    w = torch.cartesian_prod(_centred(m), _centred(m)).reshape(-1, 2)
    return _sigma_at(folded, w).reshape(m, m)


# ---------------------------------------------------------------------------------------------
# page


def _esc(text: object, limit: int = 300) -> str:
    return html.escape(visible(str(text), limit), quote=True)


def _fmt(x: object, digits: int = 5) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}"


def _network_bound(net: Mapping[str, Any]) -> str:
    upper, log10 = net.get("lipschitz_upper"), net.get("log10_lipschitz_upper")
    if isinstance(upper, int | float) and not isinstance(upper, bool):
        return _fmt(upper)
    if isinstance(log10, int | float) and not isinstance(log10, bool):
        return f"10^{log10:.4f}"
    return "unknown"


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return matplotlib, Figure


_SVG_START = re.compile(r"<svg\b")
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)


def _svg(fig: Figure) -> str:
    """The figure as an <svg> element: glyphs as paths, images as data URIs, no metadata."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "lipaudit", "svg.image_inline": True}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    m = _SVG_START.search(text)
    text = text[m.start() :] if m else text
    return _METADATA.sub("", text)


def _label(text: str) -> str:
    return visible(text, 48)


def _norm_chart(layers: list[Mapping[str, Any]], Figure: Any) -> tuple[str, str]:
    """Horizontal bars: the certified upper end (with the lower end marked) and the reshaped-kernel
    norm, per layer, on a log axis."""
    rows = [x for x in layers if isinstance(x.get("sigma"), Mapping) and _pos(x["sigma"].get("upper"))]
    note = ""
    if len(rows) > MAX_CHART_LAYERS:
        keep = sorted(rows, key=lambda x: -float(x["sigma"]["upper"]))[:MAX_CHART_LAYERS]
        ids = {id(x) for x in keep}
        note = f"The {MAX_CHART_LAYERS} layers with the largest upper bounds of {len(rows)}."
        rows = [x for x in rows if id(x) in ids]
    if not rows:
        return "", "No layer has a positive finite bound to draw."
    height = 1.2 + 0.32 * len(rows)
    fig = Figure(figsize=(9, height), layout="constrained")
    ax = fig.add_subplot()
    ys = list(range(len(rows)))
    upper = [float(x["sigma"]["upper"]) for x in rows]
    lower = [float(x["sigma"]["lower"]) if _pos(x["sigma"].get("lower")) else math.nan for x in rows]
    reshape = [float(x["reshape_sigma"]) if _pos(x.get("reshape_sigma")) else math.nan for x in rows]
    ax.barh([y - 0.2 for y in ys], upper, height=0.38, color="#c0392b", label="operator norm (upper bound)")
    ax.plot(lower, [y - 0.2 for y in ys], "|", color="black", markersize=8, label="operator norm (lower bound)")
    if any(not math.isnan(r) for r in reshape):
        ax.barh([y + 0.2 for y in ys], reshape, height=0.38, color="#2e86c1",
                label="reshaped-kernel norm (what spectral_norm divides by)")
    values = [v for v in upper + reshape if not math.isnan(v)]
    if max(values) > 100 * min(values):
        ax.set_xscale("log")
        ax.set_xlabel("norm (log scale)")
    else:
        ax.set_xlabel("norm")
    ax.set_yticks(ys, labels=[_label(str(x.get("name", x.get("tensor", "")))) for x in rows])
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    fig.legend(loc="outside upper center", ncols=3, fontsize="small", frameon=False)
    ax.grid(axis="x", which="both", alpha=0.25)
    return _svg(fig), note


def _pos(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _as_grid(value: Grid) -> Any:
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


def _heatmaps(heatmaps: Mapping[str, Grid], layers: list[Mapping[str, Any]], Figure: Any) -> str:
    import numpy as np

    names = {str(x.get("tensor")): str(x.get("name")) for x in layers}
    items = [(k, np.asarray(_as_grid(v), dtype=np.float64)) for k, v in heatmaps.items()]
    items = [(k, g) for k, g in items if g.ndim in (1, 2) and g.size]
    if not items:
        return ""
    cols = min(3, len(items))
    rows = math.ceil(len(items) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.7 * rows), layout="constrained")
    for i, (key, grid) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        title = _label(names.get(key, key))
        finite = grid[np.isfinite(grid)]
        top = float(finite.max()) if finite.size else math.nan
        if grid.ndim == 1:
            w = (np.arange(grid.shape[0]) - grid.shape[0] // 2) * (2 * math.pi / grid.shape[0])
            ax.plot(w, grid, color="#c0392b")
            ax.set_xlabel("w")
            ax.set_ylabel("sigma_max")
            ax.set_xlim(-math.pi, math.pi)
        else:
            n0, n1 = grid.shape
            step0, step1 = 2 * math.pi / n0, 2 * math.pi / n1
            lo0, lo1 = -(n0 // 2) * step0, -(n1 // 2) * step1
            extent = (lo1 - step1 / 2, lo1 + (n1 - 0.5) * step1, lo0 - step0 / 2, lo0 + (n0 - 0.5) * step0)
            im = ax.imshow(grid, extent=extent, origin="lower", cmap="viridis", interpolation="nearest",
                           aspect="equal")
            if finite.size:
                j0, j1 = np.unravel_index(np.nanargmax(np.where(np.isfinite(grid), grid, -np.inf)), grid.shape)
                ax.plot(lo1 + j1 * step1, lo0 + j0 * step0, "+", color="white", markersize=10)
            ax.set_xlabel("w2")
            ax.set_ylabel("w1")
            fig.colorbar(im, ax=ax, shrink=0.85, label="sigma_max")
        ax.set_title(f"{title}\nmax {_fmt(top, 4)}", fontsize="medium")
    return _svg(fig)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem;line-height:1.45}
h1{font-size:1.5rem;word-break:break-all}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
.summary{display:flex;gap:1rem;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:.6rem 1rem}
.big{font-size:1.6rem;font-weight:600}.pass{color:#1e8449}.fail{color:#c0392b}
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{border-bottom:1px solid #eee;padding:.25rem .5rem;
text-align:left;vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
.error{color:#c0392b;font-weight:600}.warning{color:#b9770e;font-weight:600}.info{color:#2874a6}
figure{margin:1rem 0}figure svg{max-width:100%;height:auto}figcaption{color:#555;font-size:.9rem}
code{background:#f4f4f4;padding:0 .2rem}.muted{color:#777}
"""


def _findings(findings: Sequence[Any]) -> str:
    if not findings:
        return "<p>No findings.</p>"
    rows = []
    for f in findings:
        if not isinstance(f, Mapping):
            continue
        sev = str(f.get("severity", "info"))
        css = sev if sev in ("error", "warning", "info") else "info"
        rows.append(
            f'<tr><td><code>{_esc(f.get("code"))}</code></td><td class="{css}">{_esc(sev)}</td>'
            f"<td>{_esc(f.get('tensor') or '')}</td><td>{_esc(f.get('message'), 2000)}</td></tr>"
        )
    return ("<table><thead><tr><th>code</th><th>severity</th><th>tensor</th><th>message</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _layer_table(layers: list[Mapping[str, Any]]) -> str:
    rows = []
    for x in layers:
        sigma = x.get("sigma") if isinstance(x.get("sigma"), Mapping) else {}
        assert isinstance(sigma, Mapping)
        ratio = x.get("reshape_ratio")
        ratio_text = f"{_fmt(ratio.get('upper'), 3)}x" if isinstance(ratio, Mapping) else "-"
        cert = "-" if sigma.get("upper") is None else ("yes" if sigma.get("certified") else "estimate")
        shape = "x".join(str(s) for s in x.get("shape", []) if isinstance(s, int))
        rows.append(
            f"<tr><td>{_esc(x.get('name'))}{' (sn)' if x.get('parametrization') == 'spectral_norm' else ''}</td>"
            f"<td>{_esc(x.get('kind'))}</td><td>{_esc(shape)}</td><td class=n>{_fmt(sigma.get('lower'))}</td>"
            f"<td class=n>{_fmt(sigma.get('upper'))}</td><td>{cert}</td><td class=n>{_fmt(x.get('reshape_sigma'))}</td>"
            f"<td class=n>{ratio_text}</td><td>{'yes' if x.get('in_network_bound') else 'no'}</td></tr>"
        )
    return ("<table><thead><tr><th>layer</th><th>kind</th><th>shape</th><th>sigma lower</th><th>sigma upper</th>"
            "<th>certified</th><th>reshape sigma</th><th>ratio</th><th>in L</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _certified(net: Mapping[str, Any]) -> str:
    if net.get("certified"):
        return "certified"
    why = net.get("not_certified_because")
    first = why[0] if isinstance(why, list) and why else None
    return "not certified" + (f": {_esc(first)}" if first else "")


def _section(report: Mapping[str, Any], heatmaps: Mapping[str, Grid], Figure: Any) -> str:
    error = report.get("error")
    if isinstance(error, Mapping):
        return (f"<section><h1>lipaudit: {_esc(error.get('path') or '')}</h1>"
                f"<p class=error>{_esc(error.get('message'), 2000)}</p></section>")
    ck = report.get("checkpoint") if isinstance(report.get("checkpoint"), Mapping) else {}
    net = report.get("network") if isinstance(report.get("network"), Mapping) else {}
    assert isinstance(ck, Mapping) and isinstance(net, Mapping)
    layers = [x for x in report.get("layers") or [] if isinstance(x, Mapping)]
    passed = report.get("passed") is True
    chart, note = _norm_chart(layers, Figure)
    maps = _heatmaps(heatmaps, layers, Figure)
    assumptions = "".join(f"<li>{_esc(a, 1000)}</li>" for a in net.get("assumptions") or [])
    skipped = [s for s in report.get("skipped") or [] if isinstance(s, Mapping)]
    parts = [
        f"<section><h1>lipaudit: {_esc(ck.get('path', ''))}</h1>",
        '<div class="summary">',
        f'<div class="card"><div class="muted">network Lipschitz bound</div><div class="big">L &le; '
        f"{_esc(_network_bound(net))}</div><div>{_certified(net)}, "
        f"product of {_esc(net.get('layers_counted', 0))} layers</div></div>",
        f'<div class="card"><div class="muted">gates</div><div class="big {"pass" if passed else "fail"}">'
        f"{'passed' if passed else 'failed'}</div><div>{len(report.get('findings') or [])} findings</div></div>",
        f'<div class="card"><div class="muted">checkpoint</div><div>{_esc(ck.get("format", ""))}, '
        f"{_esc(ck.get('tensors', 0))} tensors, {_esc(ck.get('parameters', 0))} parameters</div>"
        f"<div>sha256 <code>{_esc(str(ck.get('sha256', ''))[:16])}</code></div></div>",
        "</div>",
        "<h2>Assumptions of the network bound</h2>",
        f"<ul>{assumptions}</ul>" if assumptions else "<p>None stated.</p>",
        "<h2>Findings</h2>",
        _findings(report.get("findings") or []),
        "<h2>Operator norm against the reshaped-kernel norm</h2>",
        f'<figure class="chart norm-chart">{chart}<figcaption>Red: the certified operator norm of each layer '
        "(tick: its lower end). Blue: the norm of the kernel reshaped to a matrix, which "
        "<code>torch.nn.utils.spectral_norm</code> divides by; for a convolution it can understate the "
        f"operator norm. {_esc(note)}</figcaption></figure>",
    ]
    if maps:
        parts += [
            "<h2>Frequency response of the worst convolutions</h2>",
            f'<figure class="chart heatmaps">{maps}<figcaption>sigma_max(K^(w)) over the frequency torus '
            "w in [-pi, pi)^d, K^(w) = sum_p K_p e^(-i w.p); the operator norm for the worst padding, stride and "
            "input size is its maximum (+). conv3d: the (w1, w2) plane through the largest value.</figcaption>"
            "</figure>",
        ]
    parts += ["<h2>Layers</h2>", _layer_table(layers)]
    if skipped:
        items = "".join(f"<li>{_esc(s.get('tensor'))}: {_esc(s.get('reason'))}</li>" for s in skipped)
        parts.append(f"<details><summary>Skipped tensors ({len(skipped)})</summary><ul>{items}</ul></details>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html_many(items: Sequence[tuple[Mapping[str, Any], Mapping[str, Grid]]]) -> str:
    """One page for several reports, each with its heatmaps (keyed by tensor key)."""
    _matplotlib_mod, Figure = _matplotlib()
    version = "unknown"
    for report, _ in items:
        tool = report.get("tool")
        if isinstance(tool, Mapping) and isinstance(tool.get("version"), str):
            version = tool["version"]
    with warnings.catch_warnings():
        # a name with characters the bundled font lacks only draws boxes
        warnings.simplefilter("ignore")
        sections = [_section(r, h, Figure) for r, h in items]
    title = "lipaudit report"
    if len(items) == 1:
        ck = items[0][0].get("checkpoint")
        if isinstance(ck, Mapping):
            title += f": {visible(str(ck.get('path', '')), 120)}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n<hr>\n".join(sections)
        + f"\n<footer class=muted><p>lipaudit {_esc(version)}</p></footer>\n</body></html>\n"
    )


def render_html(report: Mapping[str, Any], heatmaps: Mapping[str, Grid] | None = None) -> str:
    """The page for a report dict (Report.to_dict()) and heatmaps {tensor key: frequency_response
    grid}; a {"reports": [...]} document gives one section per report, without heatmaps."""
    reports = report.get("reports")
    if isinstance(reports, list):
        return render_html_many([(r, {}) for r in reports if isinstance(r, Mapping)])
    return render_html_many([(report, heatmaps or {})])


render = render_html
