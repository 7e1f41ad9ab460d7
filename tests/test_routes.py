from __future__ import annotations

import pytest

from sidecar.routes import OTHER, RouteLabeler, collapse_ids


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
