"""Everything Redis-specific about the fleet view, behind `FleetStore`.

Key layout (one fleet = one hash tag, so on Redis Cluster all its keys live in one
slot and every script below touches keys of that slot only)::

    sidecar:fleet:{NAME}:w<W>:<slot>:<u|s>:<route>   hash  bucket -> count, "m" -> max s
    sidecar:fleet:{NAME}:w<W>:<slot>:idx             set   the <u|s>:<route> of that slot
    sidecar:fleet:{NAME}:pods:<u|s>:<route>          zset  instance -> last share (ms)
    sidecar:fleet:{NAME}:instances                   zset  instance -> last share (ms)
    sidecar:fleet:{NAME}:seq:<incarnation>           string last batch applied (idempotence)
    sidecar:fleet:{NAME}:meta                        hash  windows
    sidecar:fleet:{NAME}:lease / :lease:seq          string "<incarnation> <token>" / counter
    sidecar:fleet:{NAME}:breaches                    hash  rule -> "<gen> <json state>"
    sidecar:fleet:{NAME}:outbox                      list  fleet events not yet in the stream

Writers add their per-second sparse histograms into the slot hashes with HINCRBY, so
the fleet's histograms are merged by Redis itself and memory does not grow with the
number of sidecars. A batch is applied by one script, at most once per sequence
number (a retry after a timeout cannot count twice). Slot keys expire once no window
can contain them. Fleet events reach the stream through the outbox: a breach state
change and its event are written atomically (fenced by the lease token), then the
lease holder copies the outbox to the stream, skipping events the stream already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from ..events import Event
from ..percentiles import Key
from ..routes import ALL, LABEL_MAX
from ..sketch import NBUCKETS
from ..window import SubWindow
from .layout import LEASE_TTL_S, expires_at, late_after, slot_of, slots_in

log = logging.getLogger(__name__)
EVENT_FIELDS = frozenset(f.name for f in dataclasses.fields(Event))
COUNT_MAX = 2**53  # a bucket count above it was not written by a sidecar

KIND = {False: "u", True: "s"}


def member_of(key: Key) -> str:
    route, stream = key
    return f"{KIND[stream]}:{route}"


def key_of(member: str) -> Key | None:
    """The (route, stream) a member names; None for a name no sidecar writes (every
    route label is printable and at most `LABEL_MAX` characters): it becomes a
    Prometheus label and terminal text on every reader."""
    kind, _, route = member.partition(":")
    if kind not in ("u", "s") or not route or len(route) > LABEL_MAX or not route.isprintable():
        return None
    return (route, kind == "s")


@dataclass(frozen=True, slots=True)
class Batch:
    """What one tick of one sidecar collected, numbered for idempotent retries."""

    seq: int
    at: float  # wall time the data belongs to (the middle of the second it covers)
    subs: Mapping[Key, SubWindow]


@dataclass(frozen=True, slots=True)
class Lease:
    token: int  # fencing token: grows with every new holder


@dataclass(frozen=True, slots=True)
class RuleState:
    gen: int  # bumped by every state change: the compare-and-set version
    active: dict[str, Any] | None  # the open breach event (as Event kwargs), or None


class FleetError(Exception):
    """The store could not be reached or refused the operation (retry later)."""


class FleetStore(Protocol):
    async def share(
        self, batches: Sequence[Batch], *, now: float, want_lease: bool
    ) -> Lease | None: ...

    async def release(self) -> None: ...

    async def windows(self) -> list[int]: ...

    async def read_slots(
        self, window_s: int, slots: Sequence[int]
    ) -> dict[int, dict[Key, SubWindow]]: ...

    async def late_marks(self, window_s: int, lo: int, hi: int) -> dict[int, frozenset[str]]: ...

    async def members(
        self, alive_since: float, data_since: float, keys: Iterable[Key]
    ) -> tuple[list[str], dict[Key, int]]: ...

    async def rule_states(self) -> dict[str, RuleState]: ...

    async def transition(
        self,
        lease: Lease,
        rule: str,
        gen: int,
        active: dict[str, Any] | None,
        event: dict[str, Any],
    ) -> bool: ...

    async def deliver_outbox(
        self, lease: Lease, stream: str, maxlen: int
    ) -> list[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


# KEYS: seq, instances, meta; per window (W): idx, late; data (W x R, window-major); pods (P)
# ARGV: seq, instance, now_ms, W, R, retention_ms, windows, late deadline per window
#       ("ms,ms": applied after it, by Redis's clock, readers may have read the slot
#       already and must read it again), late mark;
#       per window: expire_at_ms (W), slot (W), oldest slot worth keeping (W);
#       per route: member (R), payload (R): "bucket:count ... m<max>";
#       per pods key: member (P); then housekeeping (1: trim and refresh expiries, every
#       HOUSEKEEPING_EVERY batches), P, and at_ms (the data's own time, the pods' score)
# Routes exclude `*`: a reader sums it from the routes (each request is in exactly one
# route label), which halves the writes; `*` still has its pods key.
_SHARE = """
local seq = tonumber(ARGV[1])
if seq <= tonumber(redis.call('GET', KEYS[1]) or '0') then return 0 end
local keep = tonumber(ARGV[6])
redis.call('SET', KEYS[1], ARGV[1], 'PX', keep)
local now = tonumber(ARGV[3])
local housekeeping = ARGV[#ARGV - 2] == '1'
redis.call('ZADD', KEYS[2], now, ARGV[2])
if housekeeping then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - keep)
  redis.call('PEXPIRE', KEYS[2], keep)
  redis.call('HSET', KEYS[3], 'windows', ARGV[7])
  redis.call('PEXPIRE', KEYS[3], keep)
end
local W, R = tonumber(ARGV[4]), tonumber(ARGV[5])
local at, P = tonumber(ARGV[#ARGV]), tonumber(ARGV[#ARGV - 1])
for p = 1, P do
  local pods = KEYS[3 + 2 * W + W * R + p]
  redis.call('ZADD', pods, at, ARGV[2])
  if housekeeping then
    redis.call('ZREMRANGEBYSCORE', pods, '-inf', now - keep)
    redis.call('PEXPIRE', pods, keep)
  end
end
if R == 0 then return 1 end
local deadlines = {}
for d in string.gmatch(ARGV[8], '%d+') do deadlines[#deadlines + 1] = tonumber(d) end
local t = redis.call('TIME')
local applied = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local members = {unpack(ARGV, 10 + 3 * W, 9 + 3 * W + R)}
for w = 1, W do
  local idx, exp = KEYS[3 + w], ARGV[9 + w]
  for r = 1, R do
    local key, payload = KEYS[3 + 2 * W + (w - 1) * R + r], ARGV[9 + 3 * W + R + r]
    local m = tonumber(string.match(payload, 'm(%S+)'))
    local old = redis.call('HGET', key, 'm')
    if not old then
      redis.call('HSET', key, 'm', m)
      redis.call('PEXPIREAT', key, exp)
    elseif m > tonumber(old) then
      redis.call('HSET', key, 'm', m)
    end
    for b, c in string.gmatch(payload, '(%d+):(%d+)') do
      redis.call('HINCRBY', key, b, c)
    end
  end
  redis.call('SADD', idx, unpack(members))
  redis.call('PEXPIREAT', idx, exp)
  if applied > deadlines[w] then
    -- readers may have read this slot already: tell them to read it again
    local late = KEYS[3 + W + w]
    redis.call('ZADD', late, ARGV[9 + W + w], ARGV[9 + W + w] .. ' ' .. ARGV[9])
    redis.call('ZREMRANGEBYSCORE', late, '-inf', '(' .. ARGV[9 + 2 * W + w])
    redis.call('PEXPIRE', late, keep)
  end
end
return 1
"""

# KEYS: lease, lease counter. ARGV: incarnation, ttl_ms, want (1 acquire/renew, 0 release)
# returns the fencing token while held, else 0
_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local holder, token = string.match(cur, '^(.*) (%d+)$')
  if holder ~= ARGV[1] then return 0 end
  if ARGV[3] == '1' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(token)
  end
  redis.call('DEL', KEYS[1])
  return 0
end
if ARGV[3] ~= '1' then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token, 'PX', ARGV[2])
return token
"""

# KEYS: data keys. Returns each hash flattened into one string "field value field value".
_READ = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = table.concat(redis.call('HGETALL', key), ' ')
end
return out
"""

# KEYS: lease, breaches, outbox. ARGV: lease value, rule, expected gen, new state, event.
# 1 = done, 0 = the state moved on (someone else did it), -1 = not the lease holder
_TRANSITION = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local cur = redis.call('HGET', KEYS[2], ARGV[2])
local gen = 0
if cur then gen = tonumber(string.match(cur, '^(%d+) ')) end
if gen ~= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], (gen + 1) .. ' ' .. ARGV[4])
redis.call('RPUSH', KEYS[3], ARGV[5])
return 1
"""

# KEYS: lease, outbox. ARGV: lease value, n. Drops the first n outbox entries.
_POP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
return 1
"""

_READ_CHUNK = 200  # keys per read script call: bounded work per call on both sides
HOUSEKEEPING_EVERY = 10  # batches between trims of the sorted sets and expiry refreshes
PODS_REFRESH_S = 2.0  # keys per read script call: bounded work per call on both sides


class _Script:
    def __init__(self, source: str) -> None:
        import hashlib

        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class RedisFleetStore:
    """`FleetStore` on one Redis (or one Cluster slot, via the hash tag)."""

    def __init__(
        self,
        url: str,
        fleet: str,
        instance: str,
        incarnation: str,
        windows_s: Sequence[int],
        timeout_s: float = 2.0,
    ) -> None:
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            decode_responses=True,
            encoding_errors="backslashreplace",  # a non-UTF-8 member is a name, not a crash
        )
        self.fleet = fleet
        self.prefix = f"sidecar:fleet:{{{fleet}}}"
        self.instance = instance
        self.incarnation = incarnation
        self.windows_s = tuple(windows_s)
        self._retention_ms = int((max(self.windows_s) + 60) * 1000)
        self._lease_value = ""
        self._pods_sent: dict[str, float] = {}

    # --- key names -------------------------------------------------------------------
    def key(self, *parts: object) -> str:
        return ":".join((self.prefix, *map(str, parts)))

    def data_key(self, window_s: int, slot: int, member: str) -> str:
        return self.key(f"w{window_s}", slot, member)

    def idx_key(self, window_s: int, slot: int) -> str:
        return self.key(f"w{window_s}", slot, "idx")

    def late_key(self, window_s: int) -> str:
        return self.key(f"w{window_s}", "late")

    # --- scripts ---------------------------------------------------------------------
    async def _run(
        self, calls: Sequence[tuple[_Script, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Run scripts in one pipelined round trip (loading them once if Redis lost them)."""
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for script, keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                results = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                raise FleetError(str(exc) or type(exc).__name__) from None
            missing = {
                c[0] for c, r in zip(calls, results, strict=True) if isinstance(r, NoScriptError)
            }
            if missing and attempt == 0:
                try:
                    for script in missing:
                        await self.client.script_load(script.source)
                except (RedisError, OSError) as exc:
                    raise FleetError(str(exc)) from None
                continue  # every script call here is idempotent: run them all again
            for r in results:
                if isinstance(r, Exception):
                    raise FleetError(str(r))
            return list(results)
        raise AssertionError("unreachable")

    # --- sharing and the lease -------------------------------------------------------
    def _share_call(self, batch: Batch, now: float) -> tuple[_Script, list[str], list[Any]]:
        windows = self.windows_s
        shared = [(k, sub) for k, sub in batch.subs.items() if sub.count]
        # who had requests for a route: refreshed every PODS_REFRESH_S, not every second
        pods = [member_of(k) for k, _ in shared]
        pods = [m for m in pods if batch.at - self._pods_sent.get(m, -1e18) >= PODS_REFRESH_S]
        for m in pods:
            self._pods_sent[m] = batch.at
        members = [member_of(k) for k, _ in shared if k[0] != ALL]
        subs = [sub for k, sub in shared if k[0] != ALL]
        slots = [slot_of(batch.at, w) for w in windows]
        keys = [self.key("seq", self.incarnation), self.key("instances"), self.key("meta")]
        keys += [self.idx_key(w, s) for w, s in zip(windows, slots, strict=True)]
        keys += [self.late_key(w) for w in windows]
        for w, s in zip(windows, slots, strict=True):
            keys += [self.data_key(w, s, m) for m in members]
        keys += [self.key("pods", m) for m in pods]
        args: list[Any] = [
            batch.seq,
            self.instance,
            int(now * 1000),
            len(windows),
            len(members),
            self._retention_ms,
            ",".join(map(str, windows)),
            ",".join(
                str(int(late_after(s, w) * 1000)) for w, s in zip(windows, slots, strict=True)
            ),
            f"{self.incarnation}:{batch.seq}",
        ]
        args += [int(expires_at(s, w) * 1000) for w, s in zip(windows, slots, strict=True)]
        args += slots
        args += [s - 2 * slots_in(w) for w, s in zip(windows, slots, strict=True)]
        args += members
        args += [_payload(sub) for sub in subs]
        args += pods
        args += ["1" if batch.seq % HOUSEKEEPING_EVERY == 1 else "0", len(pods)]
        args.append(int(batch.at * 1000))
        return _SHARE_S, keys, args

    def _lease_call(self, want: bool) -> tuple[_Script, list[str], list[Any]]:
        keys = [self.key("lease"), self.key("lease", "seq")]
        return _LEASE_S, keys, [self.incarnation, int(LEASE_TTL_S * 1000), "1" if want else "0"]

    async def share(
        self, batches: Sequence[Batch], *, now: float, want_lease: bool
    ) -> Lease | None:
        """Apply ``batches`` (each at most once), heartbeat, and acquire or renew the
        lease when ``want_lease``: one round trip. Returns the lease if held."""
        calls = [self._share_call(b, now) for b in batches]
        calls.append(self._lease_call(want_lease))
        *_, token = await self._run(calls)
        if not token:
            self._lease_value = ""
            return None
        self._lease_value = f"{self.incarnation} {int(token)}"
        return Lease(int(token))

    async def release(self) -> None:
        await self._run([self._lease_call(False)])
        self._lease_value = ""

    # --- reading the fleet window ----------------------------------------------------
    async def windows(self) -> list[int]:
        try:
            text = await self.client.hget(self.key("meta"), "windows")
        except (RedisError, OSError) as exc:
            raise FleetError(str(exc)) from None
        try:
            return sorted({int(w) for w in str(text or "").split(",") if w})
        except ValueError:
            return []

    async def read_slots(
        self, window_s: int, slots: Sequence[int]
    ) -> dict[int, dict[Key, SubWindow]]:
        """Each slot's histograms: two round trips (which routes, then their data)."""
        if not slots:
            return {}
        try:
            pipe = self.client.pipeline(transaction=False)
            for s in slots:
                pipe.smembers(self.idx_key(window_s, s))
            indexes = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise FleetError(str(exc)) from None
        wanted: list[tuple[int, Key, str]] = []
        for s, members in zip(slots, indexes, strict=True):
            for m in members or ():
                key = key_of(m)
                if key is not None and key[0] != ALL:
                    wanted.append((s, key, self.data_key(window_s, s, m)))
        out: dict[int, dict[Key, SubWindow]] = {s: {} for s in slots}
        for i in range(0, len(wanted), _READ_CHUNK):
            chunk = wanted[i : i + _READ_CHUNK]
            (flat,) = await self._run([(_READ_S, [k for _, _, k in chunk], [])])
            for (s, key, _), text in zip(chunk, flat, strict=True):
                sub = _parse(text)
                if sub.count:
                    out[s][key] = sub
            await asyncio.sleep(0)  # parsing is CPU: let proxied requests run between chunks
        for subs in out.values():
            _add_all(subs)
        return out

    async def late_marks(self, window_s: int, lo: int, hi: int) -> dict[int, frozenset[str]]:
        """Slots of ``[lo, hi]`` written to after they settled, each with the marks of
        those late writes (new marks: read the slot again)."""
        try:
            raw = await self.client.zrangebyscore(self.late_key(window_s), lo, hi)
        except (RedisError, OSError) as exc:
            raise FleetError(str(exc)) from None
        marks: dict[int, set[str]] = {}
        for member in raw or ():
            slot, _, mark = str(member).partition(" ")
            with contextlib.suppress(ValueError):
                marks.setdefault(int(slot), set()).add(mark)
        return {s: frozenset(m) for s, m in marks.items()}

    async def members(
        self, alive_since: float, data_since: float, keys: Iterable[Key]
    ) -> tuple[list[str], dict[Key, int]]:
        """Instances that shared since ``alive_since`` (wall time), and per key how many
        of them had requests for it since ``data_since``."""
        keys = list(keys)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrangebyscore(self.key("instances"), int(alive_since * 1000), "+inf")
            for k in keys:
                pipe.zcount(self.key("pods", member_of(k)), int(data_since * 1000), "+inf")
            instances, *counts = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise FleetError(str(exc)) from None
        try:
            return sorted(instances), {k: int(n) for k, n in zip(keys, counts, strict=True)}
        except ValueError as exc:
            raise FleetError(f"malformed counts: {exc}") from None

    # --- fleet breach state and its events -------------------------------------------
    async def rule_states(self) -> dict[str, RuleState]:
        try:
            raw = await self.client.hgetall(self.key("breaches"))
        except (RedisError, OSError) as exc:
            raise FleetError(str(exc)) from None
        out = {}
        for rule, value in raw.items():
            gen, _, doc = str(value).partition(" ")
            try:
                version = int(gen)
            except ValueError:
                continue
            # a state no sidecar wrote is no open breach: the next change overwrites it
            out[str(rule)] = RuleState(version, _active_breach(doc))
        return out

    async def transition(
        self,
        lease: Lease,
        rule: str,
        gen: int,
        active: dict[str, Any] | None,
        event: dict[str, Any],
    ) -> bool:
        """Move ``rule`` from version ``gen`` to ``active`` and queue ``event``, both or
        neither; only while holding ``lease``. False: not ours to do (any more)."""
        keys = [self.key("lease"), self.key("breaches"), self.key("outbox")]
        value = f"{self.incarnation} {lease.token}"
        args = [value, rule, gen, json.dumps(active), json.dumps(event)]
        (done,) = await self._run([(_TRANSITION_S, keys, args)])
        return bool(done == 1)

    async def deliver_outbox(self, lease: Lease, stream: str, maxlen: int) -> list[dict[str, Any]]:
        """Copy queued fleet events to the stream once each (an event the stream's tail
        already holds, by event_id, is not added again), then drop them from the
        outbox. Returns the events that were queued (delivered now or before)."""
        try:
            raw = await self.client.lrange(self.key("outbox"), 0, 99)
            if not raw:
                return []
            events = [doc for doc in map(_outbox_entry, map(str, raw)) if doc is not None]
            if len(events) < len(raw):  # popped below with the rest: never a jam
                log.warning("fleet outbox: %d malformed entries dropped", len(raw) - len(events))
            tail = await self.client.xrevrange(stream, count=len(events) + 64) or []
            present = {f.get("event_id") for _, f in tail if f}
            pipe = self.client.pipeline(transaction=False)
            for doc in events:
                if doc["fields"]["event_id"] not in present:
                    pipe.xadd(stream, doc["fields"], maxlen=maxlen, approximate=True)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise FleetError(str(exc)) from None
        keys = [self.key("lease"), self.key("outbox")]
        await self._run([(_POP_S, keys, [f"{self.incarnation} {lease.token}", len(raw)])])
        return events

    async def aclose(self) -> None:
        await self.client.aclose()


_SHARE_S = _Script(_SHARE)
_LEASE_S = _Script(_LEASE)
_READ_S = _Script(_READ)
_TRANSITION_S = _Script(_TRANSITION)
_POP_S = _Script(_POP)


def _add_all(subs: dict[Key, SubWindow]) -> None:
    """`*` of one slot: the sum of its routes, per kind."""
    for stream in (False, True):
        parts = [sub for (route, kind), sub in subs.items() if kind is stream]
        if not parts:
            continue
        total = SubWindow()
        counts = total.counts
        for sub in parts:
            for bucket, n in sub.counts.items():
                counts[bucket] = counts.get(bucket, 0) + n
            total.count += sub.count
            total.max = max(total.max, sub.max)
        subs[(ALL, stream)] = total


def _payload(sub: SubWindow) -> str:
    return " ".join(f"{b}:{c}" for b, c in sub.counts.items()) + f" m{sub.max!r}"


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def event_of(doc: dict[str, Any]) -> Event:
    """The `Event` a stored document (its fields, as `dataclasses.asdict` wrote them)
    describes; raises TypeError when fields are missing."""
    return Event(**{k: v for k, v in doc.items() if k in EVENT_FIELDS})


def _event_doc(doc: Any) -> dict[str, Any] | None:
    """``doc`` if it is an event as a sidecar stores it, else None (Redis is shared, its
    contents are not ours)."""
    if not isinstance(doc, dict):
        return None
    try:
        event = event_of(doc)
        event.fields()  # every field formats: the event can be shown and sent
        float(event.ts)
    except (TypeError, ValueError, OverflowError):
        return None
    return doc


def _active_breach(text: str) -> dict[str, Any] | None:
    """A rule's open breach (Event fields) as `transition` stored it; None for
    anything else."""
    return _event_doc(_json(text))


def _outbox_entry(text: str) -> dict[str, Any] | None:
    """An outbox entry as `transition` queued it ({"fields": the stream entry, "event":
    the Event's fields}); None for anything else."""
    doc = _json(text)
    if not isinstance(doc, dict) or _event_doc(doc.get("event")) is None:
        return None
    fields = doc.get("fields")
    if not isinstance(fields, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fields.items()
    ):
        return None
    return doc if isinstance(fields.get("event_id"), str) else None


def _parse(text: str) -> SubWindow:
    """A slot hash as written by `_SHARE` ("bucket count ... m max"); a malformed one
    (not written by a sidecar) is skipped whole."""
    sub = SubWindow()
    parts = text.split()
    fields, values = parts[::2], parts[1::2]
    try:
        if "m" in fields:
            i = fields.index("m")
            vmax = float(values[i])
            del fields[i], values[i]
            sub.max = vmax if math.isfinite(vmax) else 0.0
        counts = dict(zip(map(int, fields), map(int, values), strict=True))
    except (ValueError, IndexError):
        return SubWindow()
    if counts and (
        min(counts) < 0
        or max(counts) >= NBUCKETS
        or min(counts.values()) < 0
        or max(counts.values()) >= COUNT_MAX
    ):
        return SubWindow()
    sub.counts = counts
    sub.count = sum(counts.values())
    return sub
