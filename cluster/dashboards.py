"""Grafana dashboards: load and lint them, push them through Grafana's HTTP API, or render them
as PNGs from Prometheus for people without Grafana.

The dashboards are JSON files in ``infra/grafana/dashboards/`` (Grafana's own model). Panels use
the ``$datasource`` template variable, which defaults to the datasource ``push`` creates (uid
``retort-prometheus``); ``$application``/``$deployment``/``$model``/``$job`` filter series.

``push`` is idempotent: it reads the datasource, the ``Retort`` folder and every dashboard
first and writes only what differs, so a second push reports every item ``unchanged``.
``snapshot`` evaluates each panel's targets with ``/api/v1/query_range`` (variables substituted)
and draws one PNG per dashboard, panels laid out as in Grafana's grid.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import RetortError
from cluster.promql import known_retort_metric, promql_problems

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS_DIR = REPO / "infra" / "grafana" / "dashboards"
DATASOURCE_UID = "retort-prometheus"
DATASOURCE_NAME = "Retort Prometheus"
FOLDER_UID = "retort"
FOLDER_TITLE = "Retort"
GRID_WIDTH = 24

# --- loading and linting ----------------------------------------------------------------------


def _overlap(a: dict, b: dict) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def lint(dash: dict[str, Any]) -> list[str]:
    """Problems of one dashboard: uid/title, unique panel ids, grid positions inside the 24-column
    grid and not overlapping, datasource references that resolve (the Retort uid or a template
    variable of the dashboard), and every target's PromQL (``promql_problems``)."""
    out: list[str] = []
    for key in ("uid", "title", "panels"):
        if not dash.get(key):
            out.append(f"missing {key!r}")
    variables = {v.get("name") for v in (dash.get("templating") or {}).get("list", [])}
    ids: set = set()
    grids: list[tuple[str, dict]] = []
    for p in dash.get("panels") or []:
        name = f"panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids or not isinstance(p.get("id"), int):
            out.append(f"{name}: id missing or not unique")
        ids.add(p.get("id"))
        g = p.get("gridPos") or {}
        if (
            not all(isinstance(g.get(k), int) for k in "xywh")
            or g["x"] < 0
            or g["w"] <= 0
            or g["h"] <= 0
            or g["x"] + g["w"] > GRID_WIDTH
        ):
            out.append(f"{name}: gridPos {g} is not inside the {GRID_WIDTH}-column grid")
        else:
            out += [f"{name}: overlaps {other}" for other, og in grids if _overlap(g, og)]
            grids.append((name, g))
        refs = [p.get("datasource")] + [t.get("datasource") for t in p.get("targets") or []]
        for ref in refs:
            uid = (ref or {}).get("uid", "") if isinstance(ref, dict) else str(ref or "")
            if uid != DATASOURCE_UID and uid.strip("${}") not in variables:
                out.append(
                    f"{name}: datasource {ref!r} is neither {DATASOURCE_UID!r} nor a template variable"
                )
        if not p.get("targets"):
            out.append(f"{name}: no targets")
        for t in p.get("targets") or []:
            out += [
                f"{name} target {t.get('refId')}: {e}"
                for e in promql_problems(t.get("expr", ""), known_retort_metric)
            ]
    return out


def load(path: Path) -> dict[str, Any]:
    """One dashboard file; RetortError (exit 2) naming the file if it is not valid JSON or fails ``lint``."""
    try:
        dash = json.loads(path.read_text())
    except OSError as e:
        raise RetortError(f"cannot read dashboard {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise RetortError(
            f"dashboard {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    if not isinstance(dash, dict):
        raise RetortError(f"dashboard {path} must be a JSON object, got {type(dash).__name__}")
    problems = lint(dash)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RetortError(f"dashboard {path} is malformed: {problems[0]}{more}")
    return dash


def load_all(directory: Path = DASHBOARDS_DIR) -> list[tuple[Path, dict[str, Any]]]:
    files = sorted(Path(directory).glob("*.json"))
    if not files:
        raise RetortError(f"no dashboard files (*.json) in {directory}")
    return [(f, load(f)) for f in files]


# --- push through the Grafana API -------------------------------------------------------------


@dataclass
class PushResult:
    kind: str  # datasource | folder | dashboard
    name: str
    action: str  # created | updated | unchanged

    def __str__(self) -> str:
        return f"{self.action:<9} {self.kind:<10} {self.name}"


def datasource_payload(prometheus_url: str) -> dict[str, Any]:
    return {
        "name": DATASOURCE_NAME,
        "uid": DATASOURCE_UID,
        "type": "prometheus",
        "access": "proxy",
        "url": prometheus_url.rstrip("/"),
        "isDefault": True,
        "basicAuth": False,
        "jsonData": {"httpMethod": "POST", "timeInterval": "5s"},
    }


def _differs(want: dict[str, Any], have: dict[str, Any]) -> bool:
    return any(have.get(k) != v for k, v in want.items())


def _grafana_call(url: str, fn, *args, **kw):
    """Call grafana-client; turn its exceptions into one-line RetortErrors (404 returns None)."""
    from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaServerError
    from niquests.exceptions import RequestException

    try:
        return fn(*args, **kw)
    except GrafanaClientError as e:
        msg = _message(e)
        if e.status_code == 404:
            return None
        if e.status_code in (401, 403):
            raise RetortError(
                f"Grafana at {url} refused the credentials (HTTP {e.status_code}: {msg}); "
                "check --token (an Editor/Admin service-account token) or --user/--password"
            ) from None
        raise RetortError(f"Grafana at {url} rejected the request (HTTP {e.status_code}: {msg})") from None
    except ValueError:  # niquests' JSONDecodeError: something answered, but not with Grafana's JSON
        raise RetortError(f"{url} does not look like Grafana (its API did not answer with JSON)") from None
    except GrafanaServerError as e:
        raise RetortError(f"Grafana at {url} failed (HTTP {e.status_code}: {_message(e)})", 1) from None
    except (GrafanaException, RequestException, OSError) as e:
        raise RetortError(f"cannot reach Grafana at {url}: {str(e).splitlines()[0][:200]}") from None


def _message(e) -> str:
    r = getattr(e, "response", None)
    return str(r.get("message") if isinstance(r, dict) else r or e)[:200]


def grafana_api(
    url: str,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    timeout_s: float = 10.0,
):
    from grafana_client import GrafanaApi

    if not re.match(r"^https?://[^/\s]+", url or ""):
        raise RetortError(f"--grafana-url must look like http://host:3000 (got {url!r})")
    cred: Any = token or ((user, password or "") if user else None)
    return GrafanaApi.from_url(url, credential=cred, timeout=timeout_s)


def push(
    api, url: str, prometheus_url: str, dashboards: list[tuple[Path, dict[str, Any]]]
) -> list[PushResult]:
    """Create or update the datasource, the folder and every dashboard; write only what differs."""
    try:
        info = _grafana_call(url, api.health.check)
    except AttributeError:  # 200 with a text body: grafana-client returns the text
        info = None
    if not isinstance(info, dict):
        raise RetortError(f"{url} does not look like Grafana (no buildInfo at /api/frontend/settings)")
    out = [_push_datasource(api, url, prometheus_url), _push_folder(api, url)]
    for _path, dash in dashboards:
        out.append(_push_dashboard(api, url, dash))
    return out


def _push_datasource(api, url: str, prometheus_url: str) -> PushResult:
    want = datasource_payload(prometheus_url)
    have = _grafana_call(url, api.datasource.get_datasource_by_uid, DATASOURCE_UID)
    if have is None:
        _grafana_call(url, api.datasource.create_datasource, want)
        return PushResult("datasource", DATASOURCE_NAME, "created")
    if not _differs(want, have):
        return PushResult("datasource", DATASOURCE_NAME, "unchanged")
    _grafana_call(
        url, api.datasource.update_datasource_by_uid, DATASOURCE_UID, {**want, "version": have.get("version")}
    )
    return PushResult("datasource", DATASOURCE_NAME, "updated")


def _push_folder(api, url: str) -> PushResult:
    have = _grafana_call(url, api.folder.get_folder, FOLDER_UID)
    if have is None:
        _grafana_call(url, api.folder.create_folder, FOLDER_TITLE, uid=FOLDER_UID)
        return PushResult("folder", FOLDER_TITLE, "created")
    if have.get("title") == FOLDER_TITLE:
        return PushResult("folder", FOLDER_TITLE, "unchanged")
    _grafana_call(url, api.folder.update_folder, FOLDER_UID, title=FOLDER_TITLE, overwrite=True)
    return PushResult("folder", FOLDER_TITLE, "updated")


def _comparable(dash: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dash.items() if k not in ("id", "version")}


def _push_dashboard(api, url: str, dash: dict[str, Any]) -> PushResult:
    have = _grafana_call(url, api.dashboard.get_dashboard, dash["uid"])
    if (
        have is not None
        and _comparable(have.get("dashboard") or {}) == _comparable(dash)
        and (have.get("meta") or {}).get("folderUid") == FOLDER_UID
    ):
        return PushResult("dashboard", dash["title"], "unchanged")
    body = {
        "dashboard": {**_comparable(dash), "id": None},
        "folderUid": FOLDER_UID,
        "overwrite": True,
        "message": "retort dashboards push",
    }
    _grafana_call(url, api.dashboard.update_dashboard, body)
    return PushResult("dashboard", dash["title"], "created" if have is None else "updated")


# --- snapshots from Prometheus ----------------------------------------------------------------

BUILTINS = ("__rate_interval", "__interval", "__range")


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace ``$name`` / ``${name}`` / ``[[name]]`` (longest names first); unknown -> ``.*``."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return variables.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", repl, expr)


def default_variables(step_s: float, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Grafana's builtins for a ``step_s`` resolution (rate windows span >= 4 steps, >= 20 s) plus overrides."""
    window = f"{int(max(4 * step_s, 20))}s"
    return {
        "__rate_interval": window,
        "__interval": f"{int(max(step_s, 1))}s",
        "__range": window,
        "datasource": DATASOURCE_UID,
        **(overrides or {}),
    }


def panel_queries(dash: dict[str, Any], variables: dict[str, str]) -> list[tuple[dict, dict, str]]:
    """(panel, target, PromQL with variables substituted) for every target of every panel."""
    return [(p, t, substitute(t["expr"], variables)) for p in dash["panels"] for t in p.get("targets") or []]


def prom_query_range(
    prometheus_url: str, expr: str, start: float, end: float, step: float, timeout_s: float = 15.0
) -> list[dict[str, Any]]:
    """``/api/v1/query_range`` result (matrix); RetortError when unreachable or the query is rejected."""
    qs = urllib.parse.urlencode(
        {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    )
    url = f"{prometheus_url.rstrip('/')}/api/v1/query_range"
    try:
        with urllib.request.urlopen(f"{url}?{qs}", timeout=timeout_s) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read()).get("error", "")
        except ValueError:
            err = ""
        raise RetortError(f"Prometheus rejected {expr!r}: HTTP {e.code} {err}"[:400]) from None
    except (OSError, ValueError) as e:
        raise RetortError(f"cannot reach Prometheus at {prometheus_url}: {getattr(e, 'reason', e)}") from None
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    return (
        re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "")
        or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__")
        or "value"
    )


def _draw_panel(
    ax, prometheus_url: str, panel: dict, variables: dict[str, str], start: float, end: float, step: float
) -> int:
    """Plot every target's series on ``ax``; returns the number of series drawn."""
    n = 0
    for _p, t, expr in panel_queries({"panels": [panel]}, variables):
        for series in prom_query_range(prometheus_url, expr, start, end, step):
            xs = [float(ts) - start for ts, _ in series["values"]]
            ys = [float(v) for _, v in series["values"]]
            if any(not math.isnan(y) for y in ys):
                ax.plot(xs, ys, label=legend(t.get("legendFormat", ""), series["metric"])[:40], linewidth=1)
                n += 1
    unit = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit", "")
    ax.set_xlim(0, end - start)
    ax.set_title(panel.get("title", ""), fontsize=9)
    ax.set_ylabel(unit, fontsize=7)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if n:
        ax.legend(fontsize=6, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    return n


def render_dashboard(
    prometheus_url: str,
    dash: dict[str, Any],
    out: Path,
    start: float,
    end: float,
    step: float,
    variables: dict[str, str],
) -> Path:
    """One PNG of a dashboard: panels placed by their gridPos (rows by y, columns by x/24)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(dash["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    rows = sorted({p["gridPos"]["y"] for p in panels})
    fig = plt.figure(figsize=(14, 3.2 * len(rows)), layout="constrained")
    grid = fig.add_gridspec(len(rows), GRID_WIDTH)
    for p in panels:
        g = p["gridPos"]
        ax = fig.add_subplot(grid[rows.index(g["y"]), g["x"] : g["x"] + g["w"]])
        _draw_panel(ax, prometheus_url, p, variables, start, end, step)
    fig.suptitle(f"{dash['title']}  ({_utc(start)} - {_utc(end)} UTC; x: seconds since start)", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _utc(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def snapshot(
    prometheus_url: str,
    dashboards_dir: Path | str,
    out_dir: Path | str,
    start: float,
    end: float,
    step: float,
    variables: dict[str, str] | None = None,
) -> list[Path]:
    """Render every dashboard of ``dashboards_dir`` over [start, end] to ``out_dir/<file stem>.png``."""
    if end <= start or step <= 0:
        raise RetortError(f"snapshot needs start < end and step > 0 (got {start}, {end}, {step})")
    prom_query_range(prometheus_url, "vector(1)", end - step, end, step)  # reachable? one clear error if not
    v = default_variables(step, variables)
    return [
        render_dashboard(
            prometheus_url, dash, Path(out_dir) / f"{path.stem}.png", start, end, step, v
        ).resolve()
        for path, dash in load_all(Path(dashboards_dir))
    ]
