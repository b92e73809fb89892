"""The dashboard served by the coordinator process itself (settings.dashboard_port)."""

import httpx

from fedmla.coordinator.inprocess import BackgroundCoordinator
from fedmla.coordinator.synthetic import SyntheticCodecClient
from fedmla.coordinator.testing import make_clients, ready_task, settings_for, wait_for

TOKEN = "embedded-dashboard-token"


def test_coordinator_serves_its_dashboard_live_with_token(tmp_path):
    settings = settings_for(tmp_path, clients_per_round=2, min_replies=2, dashboard_port=0,
                            dashboard_token=TOKEN)
    with BackgroundCoordinator(settings) as bg:
        dash = bg.server.dashboard
        assert dash is not None and dash.url.startswith("http://127.0.0.1:")    # loopback unless told otherwise
        assert httpx.get(dash.url + "api/summary", timeout=10).status_code == 401
        api = httpx.Client(base_url=dash.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert api.post("api/summary").status_code in (401, 403, 405)            # read-only
        run = api.get("api/run").json()
        assert run["run_id"] == bg.store.run_id
        assert "dashboard_token" not in run["config"] and TOKEN not in api.get("api/run").text   # never shown

        clients = make_clients(bg, ["alice", "bob"])
        synth = {c: SyntheticCodecClient(cl, c) for c, cl in zip(["alice", "bob"], clients)}
        task = ready_task(clients[0])
        # The open round is on the dashboard before it commits, with its replies as they arrive.
        wait_for(lambda: [r for r in api.get("api/rounds").json() if r["id"] == task.round_id
                          and r["status"] == "running" and r["sampled"] == 2], what="the open round on the dashboard")
        clients[0].submit(synth["alice"].update_for(task), task.round_id, task.model.version)
        wait_for(lambda: [r for r in api.get("api/rounds").json() if r["id"] == task.round_id and r["replied"] == 1],
                 what="the first reply on the dashboard")
        task_b = ready_task(clients[1])
        clients[1].submit(synth["bob"].update_for(task_b), task_b.round_id, task_b.model.version)
        committed = wait_for(lambda: [r for r in api.get("api/rounds").json()
                                      if r["id"] == task.round_id and r["status"] == "committed"], what="commit")
        stored = bg.call(lambda: bg.store.rounds())[0]
        assert committed[0]["bytes_up"] == stored["bytes_up"] > 0
        heat = api.get("api/head-importance/latest").json()
        assert heat["round_id"] == task.round_id and heat["mask"] is not None   # the codec's mask, from the store
        api.close()
        for c in clients:
            c.close()
    # stopped with the coordinator
    try:
        httpx.get(dash.url + "api/health", timeout=2)
        raise AssertionError("the dashboard outlived its coordinator")
    except httpx.TransportError:
        pass
