from __future__ import annotations

import pytest

from sidecar.routes import ALL, ASTERISK, LABEL_MAX, OTHER, RouteLabeler, collapse_ids

from .rawhttp import raw_request


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/models/42", "/v1/models/{id}"),
        ("/users/550e8400-e29b-41d4-a716-446655440000/orders", "/users/{id}/orders"),
        ("/blobs/deadbeefcafe1234", "/blobs/{id}"),
        ("/files/file-AbCdEf0123456789xyz", "/files/{id}"),
        ("/v1/chat/completions/chatcmpl-9xYzAbC123dEf456GhI", "/v1/chat/completions/{id}"),
        ("/v1/embeddings", "/v1/embeddings"),
        ("/healthcheck-endpoint-long-name", "/healthcheck-endpoint-long-name"),
        ("/", "/"),
    ],
)
def test_id_collapsing(path, label):
    assert collapse_ids(path) == label


def test_templates_win_in_order():
    lab = RouteLabeler(["/v1/models/{id}", "/v1/{anything}/x", "/v1/models/special"], 100)
    assert lab.label("/v1/models/gpt-4o") == "/v1/models/{id}"
    assert lab.label("/v1/models/special") == "/v1/models/{id}"  # first match wins
    assert lab.label("/v1/foo/x") == "/v1/{anything}/x"
    assert lab.label("/v1/models/a/b") == "/v1/models/a/b"  # a param spans one segment


def test_cap_gives_other_and_keeps_existing_labels():
    lab = RouteLabeler([], 3)
    assert [lab.label(f"/r{i}") for i in "abc"] == ["/ra", "/rb", "/rc"]
    assert lab.label("/rd") == OTHER
    assert lab.label("/ra") == "/ra"
    assert lab.labels == {"/ra", "/rb", "/rc"}


def test_hostile_paths_do_not_grow_memory():
    lab = RouteLabeler([], 5)
    for i in range(50_000):
        lab.label(f"/x/{i}/y{i}z")
    assert len(lab._cache) <= 10_000
    assert len(lab.labels) <= 5


def test_request_ids_are_valid_v4_uuids_and_unique():
    import uuid

    from sidecar.ids import new_id

    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    for rid in list(ids)[:100]:
        u = uuid.UUID(rid)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == rid


# Hostile input (issue 10): labels bounded and printable, templates reserved, OPTIONS *


def test_decimal_numbers_are_ids():
    assert collapse_ids("/delay/0.2") == "/delay/{id}"
    assert collapse_ids("/delay/3") == "/delay/{id}"
    assert collapse_ids("/v1.2/models") == "/v1.2/models"


def test_labels_are_at_most_128_chars_ending_in_ellipsis():
    lab = RouteLabeler([], 100)
    label = lab.label("/" + "a" * 8000)
    assert len(label) == LABEL_MAX == 128
    assert label == "/" + "a" * 126 + "…"
    many = lab.label("/x" * 4000)  # thousands of segments: cut all the same
    assert len(many) == 128 and many.endswith("…")
    assert lab.label("/short") == "/short"


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/a\nb", "/a\\x0ab"),  # %0a, percent-decoded by aiohttp
        ("/a\x1b[31mred", "/a\\x1b[31mred"),  # %1b: a terminal escape sequence
        ("/nul\x00byte", "/nul\\x00byte"),
        ("/c1\x9bcsi", "/c1\\x9bcsi"),
        ("/bidi\u202eevil", "/bidi\\u202eevil"),
        ("/del\x7f", "/del\\x7f"),
        ("/raw\udcffbyte", "/raw\\xffbyte"),  # a non-UTF-8 byte under surrogateescape
    ],
)
def test_control_characters_never_reach_a_label(path, label):
    lab = RouteLabeler([], 100)
    assert lab.label(path) == label
    assert lab.label(path).isprintable()


def test_templates_are_always_admitted_never_other():
    lab = RouteLabeler(["/v1/chat/completions", "/v1/models/{id}"], 3)
    for i in range(50):  # junk first: fills SIDECAR_MAX_ROUTES
        lab.label(f"/junk-{i}")
    assert lab.label("/junk-99") == OTHER
    assert lab.label("/v1/chat/completions") == "/v1/chat/completions"
    assert lab.label("/v1/models/gpt-4o") == "/v1/models/{id}"
    assert len(lab.labels) == 3  # templates do not count against the cap


def test_options_asterisk_has_its_own_label():
    lab = RouteLabeler([], 2)
    lab.label("/a")
    lab.label("/b")
    assert lab.label("*") == ASTERISK == "OPTIONS *"
    assert lab.label("*") != ALL


def test_long_paths_are_not_cached():
    lab = RouteLabeler([], 100)
    for i in range(200):
        lab.label(f"/{i:04d}" + "z" * 8000)
    assert all(len(p) <= 256 for p in lab._cache)
    assert sum(len(p) for p in lab._cache) < 256 * 10_000


async def test_options_asterisk_is_counted_once_through_the_proxy(proxied):
    """`OPTIONS *` used to get the label `*`, so `*` (all routes) counted it twice."""
    _, sc, records, _, _ = proxied
    await raw_request(sc.proxy_port, b"OPTIONS * HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    (record,) = await records.wait_for(1)
    assert record.route == "OPTIONS *"
    sc.percentiles.tick()
    routes = sc.percentiles.snapshot().as_json()["routes"]
    assert routes["OPTIONS *"]["60"]["count"] == 1
    assert routes["*"]["60"]["count"] == 1
