"""Route labels: bounded-cardinality names for request paths (SPEC "Route labels").

Every label is at most `LABEL_MAX` characters (cut, ending in `…`) and printable:
aiohttp hands over the percent-decoded path, so ``%0a``/``%1b``/``%00`` arrive as
control characters; they are escaped (`printable.printable`). Templates of
``SIDECAR_ROUTES`` and ``OPTIONS *`` are reserved: they never count against
``SIDECAR_MAX_ROUTES`` and are never pushed into ``other``.
"""

from __future__ import annotations

import re

from .printable import bounded, printable

OTHER = "other"
ALL = "*"
ASTERISK = "OPTIONS *"  # the asterisk form: `OPTIONS * HTTP/1.1` has the path "*"
ID = "{id}"
LABEL_MAX = 128

_UUID = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")  # 3, 0.2
_HEX = re.compile(r"(?=[^/]*\d)[0-9a-fA-F]{12,}")
# long tokens (base64/base64url/ids like chatcmpl-AbC123...): >= 16 chars with a digit
_TOKEN = re.compile(r"(?:[A-Za-z]+[-_])?(?=[^/]*\d)[A-Za-z0-9_\-+=.~]{16,}")
_PARAM = re.compile(r"\{[^/{}]+\}")
_CACHE_MAX = 10_000  # paths remembered; the cache is emptied when full
_CACHE_PATH_MAX = 256  # longer paths are labelled each time, never cached


def _is_id(segment: str) -> bool:
    return bool(
        _NUMBER.fullmatch(segment)
        or _UUID.fullmatch(segment)
        or _HEX.fullmatch(segment)
        or _TOKEN.fullmatch(segment)
    )


def collapse_ids(path: str, limit: int | None = None) -> str:
    """Replace id-like segments of ``path`` by ``{id}``; with ``limit``, stop once the
    result is longer than ``limit`` (a long hostile path costs no more than a short one)."""
    out: list[str] = []
    length = -1  # of "/".join(out)
    for seg in path.split("/"):
        part = ID if seg and _is_id(seg) else seg
        out.append(part)
        length += len(part) + 1
        if limit is not None and length > limit:
            break
    return "/".join(out)


def _compile(template: str) -> re.Pattern[str]:
    parts = _PARAM.split(template)
    body = "[^/]+".join(re.escape(p) for p in parts)
    return re.compile(body + "/?")


class RouteLabeler:
    """Maps a path (no query string) to its label.

    First matching template of ``SIDECAR_ROUTES``; else the path with ids collapsed,
    escaped and cut to `LABEL_MAX`; past ``max_routes`` distinct such labels, ``other``.
    Results are cached per path (bounded: `_CACHE_MAX` paths of at most
    `_CACHE_PATH_MAX` characters, so hostile paths cannot grow memory).
    """

    def __init__(self, templates: list[str], max_routes: int) -> None:
        self._templates = [(t, _compile(t)) for t in templates]
        self._max = max_routes
        self._labels: set[str] = set()
        self._cache: dict[str, str] = {}

    @property
    def labels(self) -> frozenset[str]:
        """The labels admitted so far from paths (templates not included)."""
        return frozenset(self._labels)

    def label(self, path: str) -> str:
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        label = self._resolve(path)
        if len(path) <= _CACHE_PATH_MAX:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[path] = label
        return label

    def _resolve(self, path: str) -> str:
        if path == ALL:  # aiohttp gives "*" only for the asterisk form, i.e. OPTIONS *
            return ASTERISK
        for template, pattern in self._templates:
            if pattern.fullmatch(path):
                return template
        collapsed = collapse_ids(path, LABEL_MAX) or "/"
        return self._admit(bounded(printable(collapsed), LABEL_MAX))

    def _admit(self, label: str) -> str:
        if label in self._labels:
            return label
        if len(self._labels) >= self._max:
            return OTHER
        self._labels.add(label)
        return label
