"""headwater.client (sync and async), CloudEvents over HTTP and the CLI's --url mode, live."""

from __future__ import annotations

import json
import uuid

import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.v1.event import CloudEvent

from headwater.client import AsyncClient, Client
from headwater.errors import Forbidden, InvalidInput
from service.cli import main


def tenant() -> str:
    return "c" + uuid.uuid4().hex[:8]


def test_publish_search_ask_delete_read_your_writes(live_app):
    with Client(live_app.url, api_token="admin", tenant=tenant()) as hw:
        first = hw.publish("tides.md", "High tide at the harbour is at 06:40 and 19:05 today.",
                           metadata={"port": "north"})  # fmt: skip
        second = hw.publish("wind.md", "Wind from the west at 20 knots, gusting 30.")
        assert str(hw.token) == str(first.merge(second))
        # No explicit token: the search waits for this client's own writes.
        hits = hw.search("when is high tide at the harbour", k=2)
        assert hits[0].doc_id == "tides.md" and hits[0].metadata == {"port": "north"}
        assert {"doc_id", "version", "chunk_id", "section", "score"} <= set(hits[0].to_dict())
        [doc] = hw.documents(["tides.md", "missing.md"])
        assert doc.text.startswith("High tide") and doc.version == hits[0].version

        events = list(hw.ask("When is high tide?", k=2))
        assert events[0].kind == "hits" and events[-1].kind == "done"
        assert events[0].hits[0].doc_id == "tides.md"
        assert events[-1].usage["completion_tokens"] == live_app.settings.max_new_tokens
        text, cited = hw.answer("When is high tide?", k=1)
        assert text and [h.doc_id for h in cited] == ["tides.md"]

        hw.delete("tides.md")
        assert all(h.doc_id != "tides.md" for h in hw.search("high tide harbour", k=5))
        assert hw.documents(["tides.md"]) == []
        odd = "logs/a b?c#d%20.md"  # a path that must be quoted to reach the gateway intact
        hw.publish(odd, "Odd names are document ids too.")
        assert [d.doc_id for d in hw.documents([odd])] == [odd]
        hw.delete(odd)
        assert hw.documents([odd]) == []
        with pytest.raises(InvalidInput, match="422"):
            hw.publish("bad\x00id", "x")
    with Client(live_app.url, api_token="wrong") as nobody, pytest.raises(Forbidden):
        nobody.search("x")


async def test_async_client(live_app):
    async with AsyncClient(live_app.url, api_token="admin", tenant=tenant()) as hw:
        await hw.publish("bees.md", "Honey bees dance to show where the flowers are.")
        hits = await hw.search("how do bees communicate", k=1)
        assert hits[0].doc_id == "bees.md"
        kinds = [e.kind async for e in hw.ask("How do bees tell where flowers are?")]
        assert kinds[0] == "hits" and kinds[-1] == "done" and "token" in kinds
        assert [d.doc_id for d in await hw.documents(["bees.md"])] == ["bees.md"]
        await hw.delete("bees.md")
        assert await hw.search("bees dance", k=3) == []


def test_subscribe_and_follow_notifications(live_app):
    with Client(live_app.url, api_token="admin", tenant=tenant()) as hw:
        sub = hw.subscribe("volcano eruption warnings", threshold=0.3)
        hw.publish("geo.md", "A volcano eruption warning was issued for the island today.")
        [note] = list(hw.notifications(sub, limit=1, idle=60))
        assert note.subscription_id == sub and note.doc_id == "geo.md" and note.matched
        hw.unsubscribe(sub)


def test_cloudevents_over_http(live_app):
    me = tenant()
    with Client(live_app.url, api_token="admin", tenant=me) as hw:
        binary = ce_http.to_binary_event(
            CloudEvent(
                attributes={
                    "type": "com.example.page.created",
                    "source": "/wiki",
                    "subject": "p1",
                    "datacontenttype": "text/plain",
                },
                data="Glaciers carve fjords slowly.",
            )
        )
        structured = ce_http.to_structured_event(CloudEvent(
            attributes={"type": "com.example.page.updated", "source": "/wiki", "subject": "p2",
                        "tenant": me}, data={"text": "Rivers deposit silt in deltas.",
                                             "metadata": {"lang": "en"}}))  # fmt: skip
        for message in (binary, structured):
            hw.send_events(message.body, message.headers)
        hits = hw.search("how are fjords made", k=1)
        assert hits[0].doc_id == "p1"
        [p2] = hw.documents(["p2"])
        assert p2.metadata == {"lang": "en"}
        batch = json.dumps([
            json.loads(ce_http.to_structured_event(CloudEvent(attributes={
                "type": "page.deleted", "source": "/wiki", "subject": s})).body)
            for s in ("p1", "p2")
        ]).encode()  # fmt: skip
        hw.send_events(batch, {"content-type": "application/cloudevents-batch+json"})
        assert hw.documents(["p1", "p2"]) == []

        foreign = ce_http.to_structured_event(
            CloudEvent(
                attributes={"type": "page.created", "source": "/x", "subject": "p3", "tenant": "b"},
                data="x",
            )
        )
        with pytest.raises(Forbidden, match="tenant"):
            hw.send_events(foreign.body, foreign.headers)  # the token's tenant, not the payload's
        unknown = ce_http.to_structured_event(CloudEvent(attributes={
            "type": "page.archived", "source": "/x", "subject": "p3"}, data="x"))  # fmt: skip
        with pytest.raises(InvalidInput, match="neither an upsert nor a delete"):
            hw.send_events(unknown.body, unknown.headers)


def test_cli_url_mode(live_app, capsys):
    url = ["--url", live_app.url, "--api-token", "tok-a"]
    assert main(["publish", "--doc-id", "cli/kelp.md", "--text",
                 "Kelp forests grow fast in cold water.", "--json", *url]) == 0  # fmt: skip
    token = json.loads(capsys.readouterr().out)["token"]
    assert main(["search", "where do kelp forests grow", "--k", "1", "--json",
                 "--fresh-as-of", token, *url]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["hits"][0]["doc_id"] == "cli/kelp.md"
    assert main(["ask", "Where does kelp grow?", "--k", "1", "--token", token, *url]) == 0
    assert "[1] cli/kelp.md" in capsys.readouterr().out
    assert main(["delete", "--doc-id", "cli/kelp.md", "--json", *url]) == 0
    token = json.loads(capsys.readouterr().out)["token"]
    assert main(["search", "kelp", "--json", "--fresh-as-of", token, *url]) == 0
    assert all(h["doc_id"] != "cli/kelp.md" for h in json.loads(capsys.readouterr().out)["hits"])
    assert main(["search", "kelp", "--url", live_app.url, "--api-token", "nope"]) == 2
    assert "401" in capsys.readouterr().err
