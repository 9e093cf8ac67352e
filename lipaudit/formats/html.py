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

    from lipaudit.diff import DiffResult

INSTALL_HINT = 'the html format needs matplotlib: pip install "lipaudit[html]"'
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
    from lipaudit.pool import single_threaded

    with single_threaded():  # batches of small eigenproblems: one thread is many times faster
        return _grid(k, d, m, per_point, max_work)


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
        # names are text, never mathtext: "$\\foo$.weight" must not be parsed as a formula
        ax.set_title(f"{title}\nmax {_fmt(top, 4)}", fontsize="medium", parse_math=False)
    return _svg(fig)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;padding:0 1rem;line-height:1.45}
h1{font-size:1.4rem;word-break:break-all}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.summary{display:flex;gap:1rem;flex-wrap:wrap;align-items:stretch}
.card{border:1px solid #ddd;border-radius:6px;padding:.6rem 1rem;min-width:14rem}
.card.verdict{border-width:3px}.card.verdict.pass{border-color:#1e8449}.card.verdict.fail{border-color:#c0392b}
.big{font-size:1.7rem;font-weight:650}.pass{color:#1e8449}.fail{color:#c0392b}.warn{color:#b9770e}
table{border-collapse:collapse;width:100%;font-size:.88rem}th,td{border-bottom:1px solid #eee;padding:.22rem .45rem;
text-align:left;vertical-align:middle}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.sortable th{cursor:pointer;user-select:none;white-space:nowrap}table.sortable th:hover{background:#f4f4f4}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
tr:hover td{background:#fafafa}
.bar{position:relative;height:.9rem;min-width:14rem;background:#f6f6f6;border-radius:2px}
.bar .up{position:absolute;left:0;top:0;bottom:0;background:#f1c4bd;border-radius:2px}
.bar .br{position:absolute;top:0;bottom:0;background:#c0392b}
.bar .rs{position:absolute;top:-2px;bottom:-2px;width:2px;background:#2e86c1}
.bar .one{position:absolute;top:-3px;bottom:-3px;width:0;border-left:1px dashed #777}
.error{color:#c0392b;font-weight:600}.warning{color:#b9770e;font-weight:600}.info{color:#2874a6}
figure{margin:1rem 0}figure svg{max-width:100%;height:auto}figcaption{color:#555;font-size:.9rem}
code{background:#f4f4f4;padding:0 .2rem}.muted{color:#777}ol.path li{margin:.1rem 0}
"""
# Sorting by a click on a column head; numbers sort by their data-v value. Inline: the page
# fetches nothing.
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function(t){
  t.querySelectorAll("thead th").forEach(function(th,i){
    th.tabIndex=0;
    function sort(){
      var dir=th.dataset.dir==="desc"?1:-1;
      t.querySelectorAll("thead th").forEach(function(h){delete h.dataset.dir});
      th.dataset.dir=dir===1?"asc":"desc";
      var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
      function key(r){var c=r.cells[i];return c.dataset.v!==undefined?c.dataset.v:c.textContent}
      rows.sort(function(a,b){
        var x=key(a),y=key(b),nx=parseFloat(x),ny=parseFloat(y);
        if(!isNaN(nx)||!isNaN(ny)){nx=isNaN(nx)?-Infinity:nx;ny=isNaN(ny)?-Infinity:ny;return dir*(nx-ny)}
        return dir*x.localeCompare(y)});
      rows.forEach(function(r){body.appendChild(r)})}
    th.addEventListener("click",sort);
    th.addEventListener("keydown",function(e){if(e.key==="Enter"){sort()}});
  })});
"""


def _num(x: object) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _v(x: object) -> str:
    """A sort key for data-v: the number, or empty (sorted below every number)."""
    n = _num(x)
    return "" if n is None else repr(n)


def _failing(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    settings = report.get("settings") if isinstance(report.get("settings"), Mapping) else {}
    assert isinstance(settings, Mapping)
    severities = ("error", "warning") if settings.get("fail_on") == "warning" else ("error",)
    return [f for f in report.get("findings") or [] if isinstance(f, Mapping) and f.get("severity") in severities]


def _verdict_card(report: Mapping[str, Any]) -> str:
    passed = report.get("passed") is True
    bad = _failing(report)
    if passed:
        detail = "no gate failed"
    elif bad:
        first = bad[0]
        where = f" {first.get('tensor')}" if first.get("tensor") else ""
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        detail = (f"{len(bad)} {'error' if len(bad) == 1 else 'errors'}: {first.get('code')}{where}: "
                  f"{first.get('message')}{more}")
    else:
        detail = "a gate failed"
    css = "pass" if passed else "fail"
    return (f'<div class="card verdict {css}"><div class="muted">verdict</div>'
            f'<div class="big {css}">{"PASSED" if passed else "FAILED"}</div><div>{_esc(detail, 400)}</div></div>')


def _bound_card(net: Mapping[str, Any]) -> str:
    upper, log10 = _num(net.get("lipschitz_upper")), _num(net.get("log10_lipschitz_upper"))
    value = _fmt(upper) if upper is not None else (f"10^{log10:.4f}" if log10 is not None else "unknown")
    lower = _num(net.get("lipschitz_lower"))
    counted = net.get("layers_counted") or 0
    how = (f"over the exported graph, {counted} layer{'' if counted == 1 else 's'}" if net.get("method") == "graph"
           else f"product of {counted} layer{'' if counted == 1 else 's'}")
    if not counted:
        return ('<div class="card bound"><div class="muted">network Lipschitz constant</div>'
                '<div class="big warn">no network bound</div><div>no layer is covered</div></div>')
    if lower is not None and upper is not None and lower > 0:
        bracket = f"[{_fmt(lower)}, {_fmt(upper)}], ratio {_fmt(upper / lower, 3)}"
    else:
        bracket = f"[not measured, {_esc(value)}]"
    floor = _num((net.get("details") or {}).get("slope_floor"))
    if floor is not None and upper is not None and floor > 0:
        bracket += (f"; slope floor {_fmt(floor)}: a certificate that sees activations only through their "
                    f"slopes cannot go below it (upper / floor {_fmt(upper / floor, 3)})")
    if net.get("certified"):
        return (f'<div class="card bound"><div class="muted">network Lipschitz constant</div>'
                f'<div class="big">L &le; {_esc(value)}</div><div>bracket {bracket}</div>'
                f"<div>certified; {_esc(how)}</div></div>")
    why = net.get("not_certified_because")
    reason = why[0] if isinstance(why, list) and why else "not a proof"
    return (f'<div class="card bound"><div class="muted">network Lipschitz constant</div>'
            f'<div class="big warn">no certified bound</div><div>{_esc(reason, 300)}</div>'
            f"<div>estimate {_esc(value)} ({_esc(how)}), not a proof</div></div>")


def _layer_chart(layers: list[Mapping[str, Any]]) -> str:
    """Every layer as a row: its numbers and a bar on a log axis (the upper end, the [lower, upper]
    bracket darker, the reshaped-kernel norm as a blue tick, 1 dashed); a hover shows the values;
    a click on a column head sorts by it."""
    values = [v for x in layers for v in (_num((x.get("sigma") or {}).get("upper")),
                                          _num((x.get("sigma") or {}).get("lower")), _num(x.get("reshape_sigma")))
              if v is not None and v > 0]
    lo = math.log10(min([*values, 1.0])) - 0.05
    hi = math.log10(max([*values, 1.0])) + 0.05

    def pos(v: float | None) -> float | None:
        if v is None or v <= 0:
            return None
        return 100 * (math.log10(v) - lo) / (hi - lo)

    rows = []
    for x in layers:
        sigma = x.get("sigma") if isinstance(x.get("sigma"), Mapping) else {}
        assert isinstance(sigma, Mapping)
        upper, lower, reshape = _num(sigma.get("upper")), _num(sigma.get("lower")), _num(x.get("reshape_sigma"))
        ratio = x.get("reshape_ratio")
        r_up = _num(ratio.get("upper")) if isinstance(ratio, Mapping) else None
        cert = "-" if upper is None else ("yes" if sigma.get("certified") else "estimate")
        shape = "x".join(str(s) for s in x.get("shape", []) if isinstance(s, int))
        name = str(x.get("name", x.get("tensor", "")))
        hover = (f"{visible(name, 200)}: sigma in [{_fmt(lower)}, {_fmt(upper)}] ({cert}; "
                 f"{sigma.get('lower_method') or '-'} / {sigma.get('upper_method') or '-'}), reshaped-kernel norm "
                 f"{_fmt(reshape)}, ratio {_fmt(r_up, 3)}, in the network bound: "
                 f"{'yes' if x.get('in_network_bound') else 'no'}")
        bar = []
        p_up, p_lo, p_rs, p_one = pos(upper), pos(lower), pos(reshape), pos(1.0)
        if p_up is not None:
            bar.append(f'<span class="up" style="width:{p_up:.2f}%"></span>')
            start = p_lo if p_lo is not None else p_up
            bar.append(f'<span class="br" style="left:{start:.2f}%;width:{max(p_up - start, 0.4):.2f}%"></span>')
        if p_rs is not None:
            bar.append(f'<span class="rs" style="left:{p_rs:.2f}%"></span>')
        if p_one is not None:
            bar.append(f'<span class="one" style="left:{p_one:.2f}%"></span>')
        rows.append(
            f'<tr title="{_esc(hover, 600)}"><td>{_esc(name)}'
            f"{' (sn)' if x.get('parametrization') == 'spectral_norm' else ''}</td>"
            f"<td>{_esc(x.get('kind'))}</td><td>{_esc(shape)}</td>"
            f'<td class=n data-v="{_v(lower)}">{_fmt(lower)}</td><td class=n data-v="{_v(upper)}">{_fmt(upper)}</td>'
            f'<td data-v="{_v(upper)}"><div class="bar">{"".join(bar)}</div></td><td>{cert}</td>'
            f'<td class=n data-v="{_v(reshape)}">{_fmt(reshape)}</td>'
            f'<td class=n data-v="{_v(r_up)}">{_fmt(r_up, 3) + "x" if r_up is not None else "-"}</td>'
            f"<td>{'yes' if x.get('in_network_bound') else 'no'}</td></tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("layer", "kind", "shape", "sigma lower", "sigma upper",
                                             f"norm (log axis, {_fmt(10 ** lo, 2)} to {_fmt(10 ** hi, 2)})",
                                             "certified", "reshape sigma", "ratio", "in L"))
    return (f'<table class="sortable layers"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _dominant_path(net: Mapping[str, Any]) -> str:
    """The chain of graph nodes that carries the bound (graph strategies fill network.details)."""
    details = net.get("details")
    if not isinstance(details, Mapping):
        return ""
    path = details.get("dominant_path")
    if not isinstance(path, list) or not path:
        return ""
    nodes = {str(n.get("node")): n for n in details.get("nodes") or [] if isinstance(n, Mapping)}
    items = []
    for name in path:
        n = nodes.get(str(name), {})
        gain, bound = _num(n.get("log10_gain")), _num(n.get("log10_bound"))
        extra = []
        if n.get("op"):
            extra.append(f"op {_esc(n.get('op'))}")
        if gain is not None:
            extra.append(f"gain {_fmt(10 ** gain, 4)}")
        if bound is not None:
            extra.append(f"bound so far {_fmt(10 ** bound, 4)}")
        items.append(f"<li><code>{_esc(name)}</code>{' - ' + ', '.join(extra) if extra else ''}</li>")
    summary = details.get("summary")
    return ("<h2>Dominant path through the graph</h2><p>The path from input to output whose gains make the "
            f"bound{': ' + _esc(summary) if summary else ''}.</p><ol class=path>{''.join(items)}</ol>")


def _blocks(net: Mapping[str, Any]) -> str:
    """Blocks bounded as a whole: where the looseness sits, and which rule tightened what."""
    details = net.get("details")
    blocks = details.get("blocks") if isinstance(details, Mapping) else None
    if not isinstance(blocks, list) or not blocks:
        return ""
    rows = []
    for b in blocks:
        if not isinstance(b, Mapping):
            continue
        product, upper, floor = _num(b.get("product")), _num(b.get("upper")), _num(b.get("floor"))
        gain = product / upper if product is not None and upper and upper > 0 else None
        loose = upper / floor if upper is not None and floor and floor > 0 else None
        state = "skipped: " + str(b.get("skipped")) if b.get("skipped") else ("used" if b.get("used") else
                                                                              "not lower than the walk")
        nodes = b.get("nodes")
        nodes = nodes if isinstance(nodes, list) else []
        rule = str(b.get("rule") or "") + (" (channels rescaled)" if b.get("rescaled") else "")
        rows.append(
            f"<tr><td><code>{_esc(b.get('entry'))}</code> &rarr; <code>{_esc(b.get('exit'))}</code></td>"
            f"<td class=n data-v=\"{len(nodes)}\">{len(nodes)}</td><td>{'yes' if b.get('residual') else 'no'}</td>"
            f"<td>{_esc(rule)}</td><td class=n data-v=\"{_v(product)}\">{_fmt(product, 4)}</td>"
            f"<td class=n data-v=\"{_v(upper)}\">{_fmt(upper, 4)}</td>"
            f"<td class=n data-v=\"{_v(gain)}\">{_fmt(gain, 3) if gain is not None else ''}</td>"
            f"<td class=n data-v=\"{_v(floor)}\">{_fmt(floor, 4) if floor is not None else ''}</td>"
            f"<td class=n data-v=\"{_v(loose)}\">{_fmt(loose, 3) if loose is not None else ''}</td>"
            f"<td>{_esc(state)}</td></tr>")
    return ("<h2>Blocks</h2><p>Parts of the graph bounded as a whole (composite maps, the loop transformation "
            "of slope-restricted activations): each block's product of norms, its bound, and how much tighter "
            "that is. The network bound takes the smaller along every path. A block's slope floor is the "
            "largest norm found for it with its activations replaced by slopes from their ranges: no bound that "
            "sees activations only through their slopes goes below it, so bound / floor is what a better "
            "method of that kind could still remove there.</p>"
            '<table class="sortable blocks"><thead><tr><th>block</th><th>nodes</th><th>residual</th><th>rule</th>'
            "<th>product</th><th>bound</th><th>product / bound</th><th>slope floor</th><th>bound / floor</th>"
            "<th>state</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _findings(findings: Sequence[Any]) -> str:
    if not findings:
        return "<p>No findings.</p>"
    rows = []
    for f in findings:
        if not isinstance(f, Mapping):
            continue
        sev = str(f.get("severity", "info"))
        css = sev if sev in ("error", "warning", "info") else "info"
        rank = {"error": 0, "warning": 1}.get(sev, 2)
        rows.append(
            f'<tr><td><code>{_esc(f.get("code"))}</code></td><td class="{css}" data-v="{rank}">{_esc(sev)}</td>'
            f"<td>{_esc(f.get('tensor') or '')}</td><td>{_esc(f.get('message'), 2000)}</td></tr>"
        )
    return ('<table class="sortable findings"><thead><tr><th>code</th><th>severity</th><th>tensor</th>'
            f"<th>message</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _section(report: Mapping[str, Any], heatmaps: Mapping[str, Grid], Figure: Any) -> str:
    error = report.get("error")
    if isinstance(error, Mapping):
        return (f"<section><h1>lipaudit: {_esc(error.get('path') or '')}</h1>"
                f'<div class="card verdict fail"><div class="big fail">error</div>'
                f"<p class=error>{_esc(error.get('message'), 2000)}</p></div></section>")
    ck = report.get("checkpoint") if isinstance(report.get("checkpoint"), Mapping) else {}
    net = report.get("network") if isinstance(report.get("network"), Mapping) else {}
    assert isinstance(ck, Mapping) and isinstance(net, Mapping)
    layers = [x for x in report.get("layers") or [] if isinstance(x, Mapping)]
    maps = _heatmaps(heatmaps, layers, Figure)
    assumptions = "".join(f"<li>{_esc(a, 1000)}</li>" for a in net.get("assumptions") or [])
    skipped = [s for s in report.get("skipped") or [] if isinstance(s, Mapping)]
    files = [f for f in ck.get("files") or [] if isinstance(f, Mapping)]
    hashes = "".join(f"<li><code>{_esc(f.get('sha256'))}</code> {_esc(f.get('name'))}</li>" for f in files)
    parts = [
        f"<section><h1>lipaudit: {_esc(ck.get('path', ''))}</h1>",
        '<div class="summary">',
        _verdict_card(report),
        _bound_card(net),
        f'<div class="card"><div class="muted">checkpoint</div><div>{_esc(ck.get("format", ""))}, '
        f"{_esc(ck.get('tensors', 0))} tensors, {_esc(ck.get('parameters', 0))} parameters</div>"
        f"<div>sha256 <code>{_esc(str(ck.get('sha256', ''))[:16])}</code></div>"
        + (f"<details><summary>{len(files)} files</summary><ul>{hashes}</ul></details>" if files else "")
        + "</div>",
        "</div>",
        "<h2>Layers</h2>",
        '<figure class="chart norm-chart">',
        _layer_chart(layers) if layers else "<p>No layer was found.</p>",
        "<figcaption>Each layer's operator norm: the light bar reaches the certified upper end, the dark part is "
        "the bracket [lower, upper], the blue tick the norm of the kernel reshaped to a matrix (what "
        "<code>torch.nn.utils.spectral_norm</code> divides by; for a convolution it can understate the operator "
        "norm), the dashed line 1. Hover a row for its values; click a column head to sort.</figcaption></figure>",
    ]
    if maps:
        parts += [
            "<h2>Frequency response of the worst convolutions</h2>",
            f'<figure class="chart heatmaps">{maps}<figcaption>sigma_max(K^(w)) over the frequency torus '
            "w in [-pi, pi)^d, K^(w) = sum_p K_p e^(-i w.p); the operator norm for the worst padding, stride and "
            "input size is its maximum (+). conv3d: the (w1, w2) plane through the largest value.</figcaption>"
            "</figure>",
        ]
    parts.append(_dominant_path(net))
    parts.append(_blocks(net))
    parts += ["<h2>Findings</h2>", _findings(report.get("findings") or [])]
    if skipped:
        items = "".join(f"<li>{_esc(s.get('tensor'))}: {_esc(s.get('reason'))}</li>" for s in skipped)
        parts.append(f"<details><summary>Skipped tensors ({len(skipped)})</summary><ul>{items}</ul></details>")
    parts += ["<h2>Assumptions of the network bound</h2>",
              f"<ul>{assumptions}</ul>" if assumptions else "<p>None stated.</p>", "</section>"]
    return "\n".join(p for p in parts if p)


def _page(title: str, body: str, version: str) -> str:
    """One self-contained file: styles and the sorting script inline, nothing fetched."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + body
        + f"\n<footer class=muted><p>lipaudit {_esc(version)}</p></footer>\n<script>{_SCRIPT}</script>\n"
        "</body></html>\n"
    )


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
    return _page(title, "\n<hr>\n".join(sections), version)


def render_html(report: Mapping[str, Any], heatmaps: Mapping[str, Grid] | None = None) -> str:
    """The page for a report dict (Report.to_dict()) and heatmaps {tensor key: frequency_response
    grid}; a {"reports": [...]} document gives one section per report, without heatmaps."""
    reports = report.get("reports")
    if isinstance(reports, list):
        return render_html_many([(r, {}) for r in reports if isinstance(r, Mapping)])
    return render_html_many([(report, heatmaps or {})])


render = render_html


def render_diff(d: DiffResult, options: object = None) -> str:
    """A diff as one self-contained page: the verdict and the network bound first, then each layer."""
    from lipaudit.formats import diff_verdict, fmt_log10, fmt_num, rise_text

    limit = d.max_increase_pct
    rows = []
    for x in d.layers:
        over = limit is not None and x.rise_pct is not None and x.rise_pct > limit
        rows.append(
            f"<tr><td>{_esc(x.name)}</td><td>{_esc(x.kind)}</td><td>{_esc(x.status)}</td>"
            f"<td class=n>{fmt_num(x.old_upper)}</td><td class=n>{fmt_num(x.new_upper)}</td>"
            f"<td class=\"n{' fail' if over else ''}\">{_esc(rise_text(x.rise_pct))}</td></tr>"
        )
    failures = "".join(f"<li>{_esc(v, 1000)}</li>" for v in d.violations)
    verdict = diff_verdict(d)
    css = "fail" if not d.passed else ("pass" if limit is not None else "muted")
    body = (
        f"<section><h1>lipaudit diff: {_esc(d.old.path)} &rarr; {_esc(d.new.path)}</h1>"
        f'<div class="summary"><div class="card verdict"><div class="muted">gate</div>'
        f'<div class="big {css}">{_esc(verdict)}</div></div>'
        f'<div class="card"><div class="muted">network Lipschitz bound</div><div class="big">'
        f"{_esc(fmt_log10(d.old.log10_upper))} &rarr; {_esc(fmt_log10(d.new.log10_upper))}</div>"
        f"<div>{_esc(rise_text(d.network_rise_pct))}"
        f"{'' if d.new.certified else ', new bound not certified'}</div></div></div>"
        + (f"<h2>Gate failures</h2><ul>{failures}</ul>" if failures else "")
        + "<h2>Layers</h2><table class=sortable><thead><tr><th>layer</th><th>kind</th><th>status</th>"
        "<th>old upper</th><th>new upper</th><th>change</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )
    return _page(f"lipaudit diff: {visible(d.new.path, 120)}", body, d.tool_version)
