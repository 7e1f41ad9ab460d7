"""Route labels: bounded-cardinality names for request paths (SPEC "Route labels")."""

from __future__ import annotations

import re

OTHER = "other"
ALL = "*"
ID = "{id}"

_UUID = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)
_NUMBER = re.compile(r"\d+")
_HEX = re.compile(r"(?=[^/]*\d)[0-9a-fA-F]{12,}")
# long tokens (base64/base64url/ids like chatcmpl-AbC123...): >= 16 chars with a digit
_TOKEN = re.compile(r"(?:[A-Za-z]+[-_])?(?=[^/]*\d)[A-Za-z0-9_\-+=.~]{16,}")
_PARAM = re.compile(r"\{[^/{}]+\}")
_CACHE_MAX = 10_000


def _is_id(segment: str) -> bool:
    return bool(
        _NUMBER.fullmatch(segment)
        or _UUID.fullmatch(segment)
        or _HEX.fullmatch(segment)
        or _TOKEN.fullmatch(segment)
    )


def collapse_ids(path: str) -> str:
    """Replace id-like segments of ``path`` by ``{id}``."""
    return "/".join(ID if seg and _is_id(seg) else seg for seg in path.split("/"))


def _compile(template: str) -> re.Pattern[str]:
    parts = _PARAM.split(template)
    body = "[^/]+".join(re.escape(p) for p in parts)
    return re.compile(body + "/?")


class RouteLabeler:
    """Maps a path (no query string) to its label.

    First matching template of ``SIDECAR_ROUTES``; else the path with ids collapsed;
    past ``max_routes`` distinct labels, ``other``. Results are cached per path (the
    cache is bounded too, so hostile paths cannot grow memory).
    """

    def __init__(self, templates: list[str], max_routes: int) -> None:
        self._templates = [(t, _compile(t)) for t in templates]
        self._max = max_routes
        self._labels: set[str] = set()
        self._cache: dict[str, str] = {}

    @property
    def labels(self) -> frozenset[str]:
        return frozenset(self._labels)

    def label(self, path: str) -> str:
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        label = self._resolve(path)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[path] = label
        return label

    def _resolve(self, path: str) -> str:
        for template, pattern in self._templates:
            if pattern.fullmatch(path):
                return self._admit(template)
        return self._admit(collapse_ids(path) or "/")

    def _admit(self, label: str) -> str:
        if label in self._labels:
            return label
        if len(self._labels) >= self._max:
            return OTHER
        self._labels.add(label)
        return label
