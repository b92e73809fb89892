"""Every endpoint of the dashboard API, from both kinds of source, plus token and read-only rules."""

import json

import httpx
import pytest
from fastapi.testclient import TestClient

import dashboard_runs as runs
from fedmla.coordinator.dashboard import DashboardServer, InMemorySource, create_app
from fedmla.coordinator.dashboard.app import plotly_js_path

P = runs.MODEL_FP32_BYTES


@pytest.fixture
def client(finished):
    with TestClient(create_app(finished)) as c:
        yield c


def test_page_and_its_scripts_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/plotly.min.js"' in page.text and 'src="static/dashboard.js"' in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    js = client.get("/static/dashboard.js")
    assert js.status_code == 200 and "EventSource" in js.text
    plotly = client.get("/static/plotly.min.js")
    assert plotly.status_code == 200 and plotly.content == plotly_js_path().read_bytes()
    assert plotly.headers["content-type"].startswith("text/javascript")


def test_health(client, finished):
    h = client.get("/api/health").json()
    assert h == {"status": "ok", "run_id": runs.RUN_ID, "version": finished.version()}


def test_summary(client):
    s = client.get("/api/summary").json()
    assert (s["run_id"], s["rounds_total"], s["rounds_ended"], s["current_round"], s["current_status"]) == \
        (runs.RUN_ID, 3, 3, 3, "committed")
    assert s["last_val_loss"] == 2.75 and s["last_train_loss"] == 2.7 and s["best_val_loss"] == 2.75
    assert s["cum_bytes_up"] == 17_500 and s["cum_bytes_down"] == 54_000
    assert s["cum_fedavg_fp32_bytes"] == 7 * P
    assert s["cum_fedavg_ratio"] == pytest.approx(7 * P / 17_500)
    assert s["clients_total"] == 3 and s["clients_by_status"] == {"joined": 3}


def test_run_has_config_and_model_summary(client):
    r = client.get("/api/run").json()
    assert r["run_id"] == runs.RUN_ID and r["schema_version"] == 1 and r["created_at"] == runs.T0
    assert r["config"] == runs.CONFIG and r["mla_config"] == runs.MLA_CONFIG
    assert r["model"]["parameters"] == 97_728
    assert r["model"]["kv_cache_bytes_per_token"] == 2 * 2 * (32 + 8)  # 2 layers x (latent 32 + rope 8) x 2 bytes
    assert r["model"]["n_layers"] == 2 and r["model"]["n_heads"] == 4 and r["model_error"] is None


def test_rounds(client):
    rounds = client.get("/api/rounds").json()
    assert [r["id"] for r in rounds] == [1, 2, 3]
    assert [r["val_loss"] for r in rounds] == [3.3, 3.0, 2.75]
    assert [r["train_loss"] for r in rounds] == [3.2, 2.9, 2.7]
    assert rounds[0]["val_perplexity"] == pytest.approx(27.112638920657883)  # e**3.3
    assert [(r["sampled"], r["replied"], r["dropped"], r["rejected"]) for r in rounds] == [(3, 3, 0, 0), (3, 2, 1, 0), (3, 2, 0, 1)]
    assert [r["bytes_up"] for r in rounds] == [7500, 6000, 4000]
    assert [r["bytes_down"] for r in rounds] == [18000] * 3
    assert [r["cum_bytes_up"] for r in rounds] == [7500, 13500, 17500]
    assert [r["cum_bytes_total"] for r in rounds] == [25500, 49500, 71500]
    assert [r["fedavg_fp32_bytes"] for r in rounds] == [3 * P, 2 * P, 2 * P]
    assert [r["fedavg_ratio"] for r in rounds] == [pytest.approx(P / 2500), pytest.approx(P / 3000), pytest.approx(P / 2000)]
    assert [r["cum_fedavg_ratio"] for r in rounds] == \
        [pytest.approx(P / 2500), pytest.approx(5 * P / 13500), pytest.approx(7 * P / 17500)]
    assert [r["model_version"] for r in rounds] == [1, 2, 3]
    assert [r["duration_seconds"] for r in rounds] == [8.5] * 3
    assert [r["aggregation_seconds"] for r in rounds] == [0.25, 0.5, 0.75]
    assert [r["reason"] for r in rounds] == ["all sampled clients replied", "remaining clients dropped", "deadline"]
    assert [r["status"] for r in rounds] == ["committed"] * 3
    assert [r["id"] for r in client.get("/api/rounds", params={"since": 2}).json()] == [2, 3]
    assert client.get("/api/rounds", params={"since": -1}).status_code == 422


def test_one_round_with_its_clients(client):
    d = client.get("/api/rounds/3").json()
    assert d["round"]["id"] == 3 and d["round"]["cum_bytes_up"] == 17500
    rows = {c["client"]: c for c in d["clients"]}
    assert sorted(rows) == list(runs.CLIENTS)
    assert [rows[c]["status"] for c in runs.CLIENTS] == ["replied", "rejected", "replied"]
    assert rows["client-b"]["rejection_reason"] == runs.REJECTION and rows["client-b"]["bytes_up"] == 0
    assert rows["client-a"]["local_loss"] == 2.7 and rows["client-a"]["num_examples"] == 1000
    missing = client.get("/api/rounds/42")
    assert missing.status_code == 404 and missing.json()["detail"] == f"round 42 not found in run {runs.RUN_ID!r}"


def test_clients(client):
    cs = {c["name"]: c for c in client.get("/api/clients").json()}
    assert sorted(cs) == list(runs.CLIENTS)
    a, b, c = cs["client-a"], cs["client-b"], cs["client-c"]
    assert (a["status"], a["rounds_joined"], a["bytes_up"], a["bytes_down"]) == ("joined", 3, 7500, 18000)
    assert a["last_seen"] == runs.T0 + 39 and a["joined_at"] == runs.T0
    assert a["last_round"] == 3 and a["local_loss"] == 2.7 and a["rejection_reason"] is None
    assert (b["rounds_joined"], b["bytes_up"], b["rejection_reason"], b["local_loss"]) == (2, 5500, runs.REJECTION, None)
    assert (c["rounds_joined"], c["bytes_up"], c["num_examples"]) == (2, 4500, 1200)


def test_one_client_with_its_rounds(client):
    d = client.get("/api/clients/client-c").json()
    assert d["client"]["name"] == "client-c"
    assert [(r["round_id"], r["bytes_up"], r["local_loss"]) for r in d["rounds"]] == \
        [(1, 2500, pytest.approx(3.22)), (2, 0, None), (3, 2000, pytest.approx(2.72))]
    assert [r["status"] for r in d["rounds"]] == ["replied", "dropped", "replied"]
    missing = client.get("/api/clients/nobody")
    assert missing.status_code == 404 and "client 'nobody' not found" in missing.json()["detail"]


def test_head_importance(client):
    assert client.get("/api/head-importance").json() == {"rounds": [1, 2, 3]}
    latest = client.get("/api/head-importance/latest").json()
    assert latest["round_id"] == 3 and latest["scores"] == runs.SCORES[3] and latest["mask"] == runs.MASK[3]
    assert (latest["n_layers"], latest["n_heads"], latest["active_heads"]) == (2, 4, 6)
    r1 = client.get("/api/head-importance/1").json()
    assert r1["scores"] == runs.SCORES[1] and r1["mask"] == [[True, True, True, False], [True, True, True, False]]
    missing = client.get("/api/head-importance/7")
    assert missing.status_code == 404 and "round 7" in missing.json()["detail"]


def test_empty_run():
    with TestClient(create_app(InMemorySource("empty"))) as c:
        assert c.get("/api/rounds").json() == [] and c.get("/api/clients").json() == []
        s = c.get("/api/summary").json()
        assert s["current_round"] is None and s["rounds_total"] == 0 and s["cum_fedavg_ratio"] is None
        assert c.get("/api/head-importance/latest").status_code == 404
        assert c.get("/api/run").json()["model"] is None


def test_openapi_documents_every_endpoint(client):
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/api/health", "/api/summary", "/api/run", "/api/rounds", "/api/rounds/{round_id}", "/api/clients",
        "/api/clients/{name}", "/api/head-importance", "/api/head-importance/latest",
        "/api/head-importance/{round_id}", "/api/events"}
    assert all(set(ops) == {"get"} for ops in spec["paths"].values())
    events = spec["paths"]["/api/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert "rounds_from" in events["properties"]
    refs = set(_refs(spec))
    assert "#/components/schemas/RoundView" in refs
    for ref in refs:  # every reference resolves, including those of the event-stream schema
        assert ref.rsplit("/", 1)[1] in spec["components"]["schemas"], ref


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_read_only(client):
    for method in ("POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
        r = client.request(method, "/api/rounds")
        assert r.status_code == 405 and r.headers["allow"] == "GET", method
        if method != "HEAD":
            assert "read-only" in r.json()["detail"], method


@pytest.mark.parametrize("path", ["/", "/api/summary", "/api/events", "/openapi.json"])
def test_token_required_everywhere_but_static(path):
    with TestClient(create_app(InMemorySource("r"), token="s3cret")) as c:
        r = c.get(path)
        assert r.status_code == 401 and "dashboard token missing" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
        r = c.get(path, headers={"Authorization": "Bearer s3cre"})
        assert r.status_code == 401 and r.json()["detail"] == "dashboard token is wrong"
        r = c.get(path, params={"token": "S3CRET"})
        assert r.status_code == 401
        assert c.get("/static/dashboard.js").status_code == 200  # shipped code, no run data
        if path != "/api/events":
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert c.get(path, params={"token": "s3cret"}).status_code == 200


def test_empty_token_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        create_app(InMemorySource("r"), token="")


class _BrokenSource(InMemorySource):
    def rounds(self):
        raise OSError("disk I/O error")


def test_a_failing_source_is_a_503_naming_the_error():
    with TestClient(create_app(_BrokenSource("r"))) as c:
        r = c.get("/api/rounds")
        assert r.status_code == 503 and r.json()["detail"] == "could not read the run: OSError: disk I/O error"


# ---- live events, over a real server ---------------------------------------------------
def _events(response):
    """Parse a text/event-stream into (event, id, data) tuples as they arrive."""
    event, ident, data = None, None, []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield event, ident, json.loads("\n".join(data))
            event, ident, data = None, None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("id:"):
            ident = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_events_push_each_change_with_only_the_rounds_that_can_have_changed(kind, tmp_path):
    source, writer = runs.make_source(kind, tmp_path, n_rounds=1)
    server = DashboardServer(source, poll_interval=0.05, token="tok").start()
    try:
        with httpx.stream("GET", server.url + "api/events", headers={"Authorization": "Bearer tok"}, timeout=30) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            stream = _events(resp)
            name, ident, first = next(stream)
            assert name == "update" and ident == str(first["version"])
            assert first["full"] and [r["id"] for r in first["rounds"]] == [1]
            assert first["summary"]["current_round"] == 1 and first["run"]["model"]["parameters"] == 97_728
            assert first["head_importance"]["round_id"] == 1 and first["head_importance_rounds"] == [1]
            assert {c["name"] for c in first["clients"]} == set(runs.CLIENTS)

            # Round 2 opens: clients are seen again (a store records that much; memory also the open round).
            writer.write(runs.round_start(2))
            seen = runs.T0 + 20
            update = next(stream)[2]
            while not (all(c["last_seen"] == seen for c in update["clients"])
                       and (kind != "memory" or update["summary"]["current_round"] == 2)):
                update = next(stream)[2]
            # round 1 ended, but it is among the newest ended rounds: resent (it may gain a val loss)
            assert not update["full"] and update["rounds_from"] == 1
            assert update["version"] > first["version"]
            assert [(r["id"], r["status"]) for r in update["rounds"]] == \
                [(1, "committed")] + ([(2, "running")] if kind == "memory" else [])

            writer.write(runs.round_end(2))
            while not (update["summary"]["rounds_ended"] == 2 and update["head_importance_rounds"] == [1, 2]):
                update = next(stream)[2]
            assert update["rounds_from"] == 1 and [r["id"] for r in update["rounds"]] == [1, 2]
            assert update["rounds"][1]["val_loss"] == 3.0 and update["rounds"][1]["status"] == "committed"
            assert update["summary"]["cum_bytes_up"] == 13500 and update["head_importance"]["round_id"] == 2
    finally:
        server.stop()
        source.close()
        writer.close()
