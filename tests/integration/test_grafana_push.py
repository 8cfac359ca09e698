"""`retort dashboards push` over real HTTP against tests/support/fake_grafana.py (no Grafana server
exists on these machines): the first push creates everything, a second changes nothing, an edit
is pushed as an update, bad credentials / an unreachable URL / a malformed file are one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prom_support import repo_env
from support.fake_grafana import FakeGrafana

from cluster import dashboards as D

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOKEN = "glsa_test_token"
PROM = "http://127.0.0.1:9090"


def push(url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "dashboards",
            "push",
            "--grafana-url",
            url,
            "--prometheus-url",
            PROM,
            "--timeout",
            "5",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=repo_env(),
        cwd=str(REPO),
    )


@pytest.fixture
def grafana():
    with FakeGrafana(
        tokens={TOKEN: "Admin", "viewer-token": "Viewer"}, users={"admin": ("secret", "Admin")}
    ) as g:
        yield g


def test_push_twice_second_is_unchanged(grafana):
    first = push(grafana.url, "--token", TOKEN)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.strip().splitlines()
    assert sum(line.startswith("created") for line in lines) == 7  # datasource + folder + 5 dashboards
    n_writes = len(grafana.writes)
    assert n_writes == 7
    st = grafana.state
    assert st.datasources[D.DATASOURCE_UID]["url"] == PROM and st.folders[D.FOLDER_UID]["title"] == "Retort"
    for path, dash in D.load_all():
        stored = st.dashboards[dash["uid"]]
        assert stored["folderUid"] == D.FOLDER_UID and stored["dashboard"]["panels"] == dash["panels"], path

    second = push(grafana.url, "--token", TOKEN)
    assert second.returncode == 0, second.stderr
    assert all(line.startswith("unchanged") for line in second.stdout.strip().splitlines()[:-1])
    assert "0 changed, 7 unchanged" in second.stdout
    assert len(grafana.writes) == n_writes, grafana.writes[n_writes:]  # nothing written at all


def test_edited_dashboard_and_moved_prometheus_are_updated(grafana, tmp_path):
    assert push(grafana.url, "--token", TOKEN).returncode == 0
    folder = tmp_path / "dash"
    shutil.copytree(D.DASHBOARDS_DIR, folder)
    d = json.loads((folder / "serving.json").read_text())
    d["panels"][0]["title"] = "Requests per second by route"
    (folder / "serving.json").write_text(json.dumps(d))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "dashboards",
            "push",
            "--grafana-url",
            grafana.url,
            "--user",
            "admin",
            "--password",
            "secret",
            "--prometheus-url",
            "http://127.0.0.1:9091",
            "--dir",
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=repo_env(),
        cwd=str(REPO),
    )
    assert r.returncode == 0, r.stderr
    changed = [line for line in r.stdout.splitlines() if line.startswith("updated")]
    assert (
        len(changed) == 2
        and any("Retort / Serving" in c for c in changed)
        and any("datasource" in c for c in changed)
    )
    stored = grafana.state.dashboards[d["uid"]]["dashboard"]
    assert stored["panels"][0]["title"] == "Requests per second by route" and stored["version"] == 2


@pytest.mark.parametrize(
    "cred,code",
    [
        (["--token", "wrong"], 401),
        (["--token", "viewer-token"], 403),
        (["--user", "admin", "--password", "nope"], 401),
    ],
)
def test_bad_credentials_are_one_clear_line(grafana, cred, code):
    r = push(grafana.url, *cred)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and f"HTTP {code}" in err[0] and "credentials" in err[0], err
    if code == 403:  # reads pass, the first write is refused: nothing was created
        assert grafana.state.datasources == {}


def test_unreachable_grafana_is_one_clear_line():
    from cluster.net import free_port

    r = push(f"http://127.0.0.1:{free_port()}", "--token", TOKEN)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot reach Grafana" in err[0], err


def test_malformed_dashboard_file_is_one_clear_line(grafana, tmp_path):
    (tmp_path / "bad.json").write_text('{"uid": "bad", "title": "x", "panels": [')
    r = push(grafana.url, "--token", TOKEN, "--dir", str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "bad.json is not valid JSON" in r.stderr and grafana.writes == []


def test_fake_grafana_rejects_malformed_payloads_like_grafana(grafana):
    """The fake is honest: grafana-client sees the same 400s Grafana sends for bad payloads."""
    from grafana_client.client import GrafanaBadInputError, GrafanaUnauthorizedError

    api = D.grafana_api(grafana.url, TOKEN)
    with pytest.raises(GrafanaBadInputError, match="title cannot be empty"):
        api.dashboard.update_dashboard({"dashboard": {"uid": "x", "title": ""}, "overwrite": True})
    with pytest.raises(GrafanaBadInputError, match="folder not found"):
        api.dashboard.update_dashboard({"dashboard": {"uid": "x", "title": "t"}, "folderUid": "missing"})
    with pytest.raises(GrafanaBadInputError, match="Name is required"):
        api.datasource.create_datasource({"type": "prometheus"})
    with pytest.raises(GrafanaUnauthorizedError):
        D.grafana_api(grafana.url, "nope").datasource.get_datasource_by_uid("x")
    assert api.search.search_dashboards(type_="dash-db") == []
