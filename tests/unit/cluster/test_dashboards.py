"""The shipped Grafana dashboards and provisioning files: structure, datasource references,
PromQL shape (the real parse against Prometheus is in tests/integration/test_dashboards_prometheus.py),
and that the linter catches each fault it claims to."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml

from cluster import dashboards as D
from cluster import metrics as M
from cluster.errors import RetortError

PROVISIONING = D.REPO / "infra" / "grafana" / "provisioning"


@pytest.fixture(scope="module")
def shipped() -> dict[str, dict]:
    return {p.stem: d for p, d in D.load_all()}


def test_the_five_dashboards_are_shipped_with_unique_uids(shipped):
    assert set(shipped) == {"serving", "kv_cache", "autoscaling", "training", "models"}
    uids = [d["uid"] for d in shipped.values()]
    assert len(set(uids)) == len(uids) and all(len(u) <= 40 for u in uids)


@pytest.mark.parametrize("name", ["serving", "kv_cache", "autoscaling", "training", "models"])
def test_dashboard_lints_clean(shipped, name):
    assert D.lint(shipped[name]) == []


def test_panel_ids_unique_and_grid_positions_disjoint(shipped):
    for name, d in shipped.items():
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), name
        cells: set[tuple[int, int]] = set()
        for p in d["panels"]:
            g = p["gridPos"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{name}: panel {p['id']} overlaps another"
            assert g["x"] + g["w"] <= 24
            cells |= mine


def test_datasource_refs_resolve_to_the_provisioned_uid(shipped):
    prov = yaml.safe_load((PROVISIONING / "datasources" / "retort.yaml").read_text())
    (ds,) = prov["datasources"]
    assert ds["uid"] == D.DATASOURCE_UID and ds["type"] == "prometheus"
    for name, d in shipped.items():
        (var,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
        assert var["current"]["value"] == D.DATASOURCE_UID, name
        for p in d["panels"]:
            for ref in [p["datasource"], *(t["datasource"] for t in p["targets"])]:
                assert ref == {"type": "prometheus", "uid": "${datasource}"}, (name, p["title"])


def test_template_variables_for_application_and_deployment(shipped):
    for name in ("serving", "kv_cache", "autoscaling", "models"):
        names = {v["name"] for v in shipped[name]["templating"]["list"]}
        assert {"application", "deployment"} <= names, name
    assert "job" in {v["name"] for v in shipped["training"]["templating"]["list"]}


def test_links_to_rays_own_dashboards(shipped):
    for d in shipped.values():
        urls = {link.get("url") for link in d["links"]}
        assert {"/d/rayServeDashboard", "/d/rayTrainDashboard", "/d/rayDefaultDashboard"} <= urls


def test_every_retort_metric_is_on_some_dashboard(shipped):
    text = json.dumps(list(shipped.values()))
    missing = [m.name for m in M.ALL if M.exported(m) not in text]
    assert not missing, f"metrics without a panel: {missing}"


def test_issue_panels_present(shipped):
    def titles(n):
        return " | ".join(p["title"] for p in shipped[n]["panels"]).lower()

    for word in (
        "requests/s",
        "errors",
        "end-to-end",
        "first token",
        "per output token",
        "tokens/s",
        "running",
        "replicas",
    ):
        assert word in titles("serving"), word
    for word in ("usage", "prefix-cache hit rate", "store hit rate", "bytes", "evictions"):
        assert word in titles("kv_cache"), word
    for word in ("replicas", "ongoing", "queued", "scale events"):
        assert word in titles("autoscaling"), word
    for word in ("loss", "kd and ce", "tokens/s", "step time", "workers"):
        assert word in titles("training"), word
    for word in ("deployed version", "promotions"):
        assert word in titles("models"), word


def test_dashboard_provider_points_at_both_folders():
    prov = yaml.safe_load((PROVISIONING / "dashboards" / "retort.yaml").read_text())
    providers = {p["name"]: p for p in prov["providers"]}
    assert providers["retort"]["folderUid"] == D.FOLDER_UID and providers["retort"]["type"] == "file"
    assert "RAY_GRAFANA_DASHBOARDS" in providers["ray"]["options"]["path"]


# --- the linter catches what it claims ---------------------------------------------------------------


@pytest.fixture
def good(shipped) -> dict:
    return copy.deepcopy(shipped["serving"])


def test_lint_catches_duplicate_ids(good):
    good["panels"][1]["id"] = good["panels"][0]["id"]
    assert any("not unique" in p for p in D.lint(good))


def test_lint_catches_overlap_and_out_of_grid(good):
    good["panels"][1]["gridPos"] = dict(good["panels"][0]["gridPos"], x=6)
    good["panels"][2]["gridPos"]["x"] = 20
    problems = D.lint(good)
    assert any("overlaps" in p for p in problems) and any("24-column" in p for p in problems)


def test_lint_catches_unresolved_datasource(good):
    good["panels"][0]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "someone-elses"}
    assert any("datasource" in p for p in D.lint(good))


@pytest.mark.parametrize(
    "expr,fragment",
    [
        ("sum(rate(ray_serve_num_http_requests_total[1m])", "unclosed"),
        ("sum(rate(ray_serve_num_http_requests_total[1m])))", "unbalanced"),
        ("summ(rate(ray_serve_num_http_requests_total[1m]))", "unknown function"),
        ("sum(rate(ray_serve_num_http_requests_total{application=retort}[1m]))", "bad label matcher"),
        ("sum(rate(ray_serve_num_http_requests_total[one minute]))", "bad range"),
        ("sum(rate(ray_retort_no_such_metric_total[1m]))", "not defined"),
    ],
)
def test_lint_catches_bad_promql(good, expr, fragment):
    good["panels"][0]["targets"][0]["expr"] = expr
    assert any(fragment in p for p in D.lint(good)), D.lint(good)


def test_promql_check_accepts_strings_with_brackets_and_template_ranges():
    expr = 'sum by (le) (rate(ray_serve_http_request_latency_ms_bucket{route=~"/v1/(chat|x)\\\\}",a!="b,c"}[$__rate_interval]))'
    assert D.promql_problems(expr, D.known_retort_metric) == []


def test_load_reports_malformed_json_in_one_line(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"uid": "x", "title": "t",\n "panels": [}')
    with pytest.raises(RetortError) as e:
        D.load(bad)
    assert "broken.json" in str(e.value) and "line 2" in str(e.value) and "\n" not in str(e.value)


def test_load_reports_lint_problems(tmp_path, good):
    good["panels"][0]["targets"][0]["expr"] = "rate(x[1m]"
    f = tmp_path / "d.json"
    f.write_text(json.dumps(good))
    with pytest.raises(RetortError, match="is malformed: panel 1"):
        D.load(f)


def test_substitute_variables():
    v = D.default_variables(5.0, {"application": "retort", "model": "student"})
    expr = (
        'rate(x{application=~"$application",model=~"${model}",deployment=~"$deployment"}[$__rate_interval])'
    )
    out = D.substitute(expr, v)
    assert out == 'rate(x{application=~"retort",model=~"student",deployment=~".*"}[20s])'
    assert not re.search(r"\$\w", D.substitute(json.dumps(D.load_all()[0][1]), v).replace("$__all", ""))
