"""A small local HTTP server that speaks the few Grafana HTTP API endpoints ``retort dashboards
push`` uses (no Grafana server exists on these machines). It keeps state in memory and answers
like Grafana 11 does: same paths, status codes and JSON shapes, bearer-token / basic auth (401
for a bad credential, 403 for a Viewer writing), 400 with a ``message`` for malformed payloads,
404 ``not found`` bodies, 409/412 on conflicts, versions that increase on every save.

Endpoints: GET /api/health, GET /api/frontend/settings, GET /api/datasources/uid/:uid,
GET /api/datasources/name/:name, POST /api/datasources, PUT /api/datasources/uid/:uid,
GET /api/folders/:uid, POST /api/folders, PUT /api/folders/:uid, POST /api/dashboards/db,
GET /api/dashboards/uid/:uid, GET /api/search. Every write is appended to ``writes``.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

VERSION = "11.3.0"
UID_RE = re.compile(r"^[a-zA-Z0-9\-_]{1,40}$")


class HTTPError(Exception):
    def __init__(self, code: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.body = code, {"message": message, **extra}


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.datasources: dict[str, dict] = {}  # uid -> datasource
        self.folders: dict[str, dict] = {}  # uid -> folder
        self.dashboards: dict[str, dict] = {}  # uid -> {"dashboard", "folderUid", "version"}
        self.writes: list[tuple[str, str]] = []
        self.next_id = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


class FakeGrafana:
    """``with FakeGrafana(tokens={"t": "Admin"}) as g: g.url`` -> http://127.0.0.1:<port>."""

    def __init__(
        self, tokens: dict[str, str] | None = None, users: dict[str, tuple[str, str]] | None = None
    ) -> None:
        self.tokens = tokens or {}
        self.users = users or {}  # user -> (password, role)
        self.state = State()
        handler = type("Handler", (_Handler,), {"grafana": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeGrafana:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    @property
    def writes(self) -> list[tuple[str, str]]:
        return list(self.state.writes)

    # --- auth -----------------------------------------------------------------------------

    def role(self, header: str | None) -> str:
        if not header:
            raise HTTPError(401, "Unauthorized")
        scheme, _, cred = header.partition(" ")
        if scheme.lower() == "bearer":
            if cred in self.tokens:
                return self.tokens[cred]
            raise HTTPError(401, "Invalid API key")
        if scheme.lower() == "basic":
            try:
                user, _, pw = base64.b64decode(cred).decode().partition(":")
            except ValueError:
                raise HTTPError(401, "Invalid username or password") from None
            if user in self.users and self.users[user][0] == pw:
                return self.users[user][1]
            raise HTTPError(401, "Invalid username or password")
        raise HTTPError(401, "Unauthorized")


class _Handler(BaseHTTPRequestHandler):
    grafana: FakeGrafana
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise HTTPError(400, "bad request data") from None

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        path = unquote(url.path.rstrip("/"))
        try:
            if path == "/api/health" and method == "GET":
                return self._send(200, {"commit": "fake", "database": "ok", "version": VERSION})
            role = self.grafana.role(self.headers.get("Authorization"))
            if method != "GET" and role not in ("Admin", "Editor"):
                raise HTTPError(
                    403,
                    "You'll need additional permissions to perform this action. "
                    "Permissions needed: datasources:write",
                )
            body = self._json() if method in ("POST", "PUT") else None
            with self.grafana.state.lock:
                status, out = route(self.grafana.state, method, path, parse_qs(url.query), body)
                if method != "GET":
                    self.grafana.state.writes.append((method, path))
            self._send(status, out)
        except HTTPError as e:
            self._send(e.code, e.body)


def route(s: State, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
    m = re.fullmatch(r"/api/(datasources|folders|dashboards|search|frontend)(?:/(.*))?", path)
    if not m:
        raise HTTPError(404, "Not found")
    kind, rest = m.group(1), m.group(2) or ""
    if kind == "frontend" and rest == "settings" and method == "GET":
        return 200, {"buildInfo": {"version": VERSION, "commit": "fake", "edition": "Open Source"}}
    if kind == "datasources":
        return datasources(s, method, rest, body)
    if kind == "folders":
        return folders(s, method, rest, body)
    if kind == "dashboards":
        return dashboards(s, method, rest, body)
    if kind == "search" and method == "GET":
        return 200, search(s, query)
    raise HTTPError(404, "Not found")


def _need_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise HTTPError(400, "bad request data")
    return body


def datasources(s: State, method: str, rest: str, body: Any) -> tuple[int, Any]:
    if method == "GET" and rest.startswith("uid/"):
        ds = s.datasources.get(rest[4:])
    elif method == "GET" and rest.startswith("name/"):
        ds = next((d for d in s.datasources.values() if d["name"] == rest[5:]), None)
    elif method == "POST" and rest == "":
        return 200, _create_datasource(s, _need_object(body))
    elif method == "PUT" and rest.startswith("uid/"):
        return 200, _update_datasource(s, rest[4:], _need_object(body))
    else:
        raise HTTPError(404, "Not found")
    if ds is None:
        raise HTTPError(404, "Data source not found")
    return 200, copy.deepcopy(ds)


def _check_datasource(body: dict) -> None:
    if not body.get("name"):
        raise HTTPError(400, "Name is required")
    if not body.get("type"):
        raise HTTPError(400, "Type is required")
    if body.get("access", "proxy") not in ("proxy", "direct"):
        raise HTTPError(400, "Access must be proxy or direct")
    if body.get("uid") and not UID_RE.match(body["uid"]):
        raise HTTPError(400, "invalid data source uid")


def _create_datasource(s: State, body: dict) -> dict:
    _check_datasource(body)
    if any(d["name"] == body["name"] for d in s.datasources.values()):
        raise HTTPError(409, "data source with the same name already exists")
    uid = body.get("uid") or f"ds{s.next_id}"
    if uid in s.datasources:
        raise HTTPError(409, "data source with the same uid already exists")
    ds = {
        "id": s.new_id(),
        "uid": uid,
        "orgId": 1,
        "access": "proxy",
        "url": "",
        "basicAuth": False,
        "isDefault": False,
        "jsonData": {},
        "readOnly": False,
        **body,
        "version": 1,
    }
    s.datasources[uid] = ds
    return {
        "datasource": copy.deepcopy(ds),
        "id": ds["id"],
        "message": "Datasource added",
        "name": ds["name"],
    }


def _update_datasource(s: State, uid: str, body: dict) -> dict:
    if uid not in s.datasources:
        raise HTTPError(404, "Data source not found")
    _check_datasource(body)
    old = s.datasources[uid]
    if body.get("version") is not None and body["version"] != old["version"]:
        raise HTTPError(
            409, "Datasource has already been updated by someone else. Please reload and try again"
        )
    ds = {**old, **body, "id": old["id"], "uid": uid, "version": old["version"] + 1}
    s.datasources[uid] = ds
    return {
        "datasource": copy.deepcopy(ds),
        "id": ds["id"],
        "message": "Datasource updated",
        "name": ds["name"],
    }


def folders(s: State, method: str, rest: str, body: Any) -> tuple[int, Any]:
    if method == "GET" and rest:
        if rest not in s.folders:
            raise HTTPError(404, "folder not found", status="not-found")
        return 200, copy.deepcopy(s.folders[rest])
    if method == "POST" and rest == "":
        body = _need_object(body)
        if not str(body.get("title") or "").strip():
            raise HTTPError(400, "folder title cannot be empty")
        uid = body.get("uid") or f"f{s.next_id}"
        if not UID_RE.match(uid):
            raise HTTPError(400, "uid contains illegal characters")
        if uid in s.folders:
            raise HTTPError(409, "a folder with the same uid already exists")
        if any(f["title"] == body["title"] for f in s.folders.values()):
            raise HTTPError(
                409, "a folder or dashboard in the general folder with the same name already exists"
            )
        s.folders[uid] = {
            "id": s.new_id(),
            "uid": uid,
            "title": body["title"],
            "url": f"/dashboards/f/{uid}/",
            "version": 1,
            "hasAcl": False,
            "canSave": True,
        }
        return 200, copy.deepcopy(s.folders[uid])
    if method == "PUT" and rest in s.folders:
        body = _need_object(body)
        f = s.folders[rest]
        if not body.get("overwrite") and body.get("version") != f["version"]:
            raise HTTPError(412, "the folder has been changed by someone else", status="version-mismatch")
        f.update(title=body.get("title") or f["title"], version=f["version"] + 1)
        return 200, copy.deepcopy(f)
    raise HTTPError(404, "folder not found", status="not-found")


def dashboards(s: State, method: str, rest: str, body: Any) -> tuple[int, Any]:
    if method == "GET" and rest.startswith("uid/"):
        entry = s.dashboards.get(rest[4:])
        if entry is None:
            raise HTTPError(404, "Dashboard not found")
        d = entry["dashboard"]
        folder = s.folders.get(entry["folderUid"] or "", {})
        meta = {
            "type": "db",
            "slug": _slug(d["title"]),
            "url": f"/d/{d['uid']}/{_slug(d['title'])}",
            "folderUid": entry["folderUid"] or "",
            "folderTitle": folder.get("title", "General"),
            "folderId": folder.get("id", 0),
            "version": d["version"],
            "canSave": True,
            "provisioned": False,
        }
        return 200, {"dashboard": copy.deepcopy(d), "meta": meta}
    if method == "POST" and rest == "db":
        return 200, _save_dashboard(s, _need_object(body))
    raise HTTPError(404, "Not found")


def _save_dashboard(s: State, body: dict) -> dict:
    d = body.get("dashboard")
    if not isinstance(d, dict):
        raise HTTPError(400, "bad request data")
    if not str(d.get("title") or "").strip():
        raise HTTPError(400, "Dashboard title cannot be empty", status="empty-name")
    if not isinstance(d.get("panels", []), list):
        raise HTTPError(400, "bad request data")
    uid = d.get("uid") or f"d{s.next_id}"
    if not UID_RE.match(uid):
        raise HTTPError(400, "uid contains illegal characters", status="bad-uid")
    folder = body.get("folderUid") or ""
    if folder and folder not in s.folders:
        raise HTTPError(400, "folder not found", status="folder-not-found")
    old = s.dashboards.get(uid)
    if old and not body.get("overwrite") and d.get("version") != old["dashboard"]["version"]:
        raise HTTPError(412, "The dashboard has been changed by someone else", status="version-mismatch")
    dash_id = old["dashboard"]["id"] if old else s.new_id()
    version = old["dashboard"]["version"] + 1 if old else 1
    stored = {**copy.deepcopy(d), "id": dash_id, "uid": uid, "version": version}
    s.dashboards[uid] = {"dashboard": stored, "folderUid": folder}
    return {
        "id": dash_id,
        "uid": uid,
        "url": f"/d/{uid}/{_slug(d['title'])}",
        "status": "success",
        "version": version,
        "slug": _slug(d["title"]),
        "folderUid": folder,
    }


def search(s: State, query: dict[str, list[str]]) -> list[dict]:
    text = (query.get("query") or [""])[0].lower()
    folder_uids = set(query.get("folderUIDs") or [])
    kind = (query.get("type") or [""])[0]
    out: list[dict] = []
    if kind in ("", "dash-folder"):
        out += [
            {"id": f["id"], "uid": f["uid"], "title": f["title"], "type": "dash-folder", "url": f["url"]}
            for f in s.folders.values()
            if text in f["title"].lower()
        ]
    for e in s.dashboards.values() if kind in ("", "dash-db") else ():
        d = e["dashboard"]
        if text in d["title"].lower() and (not folder_uids or e["folderUid"] in folder_uids):
            out.append(
                {
                    "id": d["id"],
                    "uid": d["uid"],
                    "title": d["title"],
                    "type": "dash-db",
                    "url": f"/d/{d['uid']}/{_slug(d['title'])}",
                    "tags": d.get("tags", []),
                    "folderUid": e["folderUid"],
                    "folderTitle": s.folders.get(e["folderUid"], {}).get("title", ""),
                }
            )
    return out


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
