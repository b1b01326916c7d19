"""An in-memory Redis for the provider health board, on an injected clock: the routing lab's state store.

The health board (``libs.routing.health``) keeps its breaker, latency, quota and rate-limit state in Redis and
changes it only through its Lua scripts. To run that same code on simulated time, this store answers the board's
calls — ``register_script`` and non-transactional pipelines of ``TIME``, ``GET``, ``HMGET``, ``DECRBY`` and
scripts — from Python dicts, and runs the board's **own Lua source** in an embedded Lua 5.1 (the version Redis
embeds) with a ``redis.call`` that serves the handful of commands those scripts use. ``TIME`` and key expiry read
the injected clock, so a simulated day needs no real time and is the same for the same inputs.

It implements only what the board uses, with Redis's conversions where the scripts can see them: numbers given to
``redis.call`` become strings as Redis makes them (integers as digits, others to 17 significant digits), a missing
value reads as ``false``, a number
returned from a script becomes an integer (truncated), ``false`` becomes nil and a table stops at its first nil.
``tests/routing/test_memory_redis.py`` runs the same sequence of board calls against a real Redis and this store
and compares every answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from lupa.lua51 import LuaRuntime

__all__ = ["MemoryRedis"]

_SHIM = """
local dispatch = ...
redis = {}
local function argument(v)
  if type(v) == 'number' then
    if v == math.floor(v) and v > -2^53 and v < 2^53 then return string.format('%d', v) end
    return string.format('%.17g', v)
  end
  return tostring(v)
end
redis.call = function(...)
  local n = select('#', ...)
  local args = {}
  for i = 1, n do args[i] = argument((select(i, ...))) end
  -- Unpacked: lupa hands each to Python as an argument, where reading a table from Python costs a call per item.
  return dispatch(unpack(args, 1, n))
end
"""

Value = str | dict[str, str]


class MemoryRedis:
    """The subset of ``redis.asyncio.Redis`` the health board uses, in memory, on the clock ``clock()`` (seconds
    since the epoch)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._data: dict[str, Value] = {}
        self._expires: dict[str, float] = {}
        self._lua = LuaRuntime(unpack_returned_tuples=False)
        self._lua.execute(_SHIM, self._dispatch)
        self._table_from = self._lua.table_from
        self._commands: dict[str, Callable[[list[str]], Any]] = {
            "TIME": self._time, "GET": self._get, "SET": self._set, "INCRBY": self._incrby,
            "DECRBY": self._decrby, "EXPIRE": self._expire, "HGET": self._hget, "HMGET": self._hmget,
            "HSET": self._hset, "HDEL": self._hdel, "HINCRBY": self._hincrby,
        }

    # -- the redis.asyncio surface the board uses ----------------------------------------------------------------
    def register_script(self, script: str) -> MemoryScript:
        """A script object called as redis-py's: ``await script(keys=..., args=..., client=pipeline)``."""
        return MemoryScript(self, self._lua.eval(f"function(KEYS, ARGV)\n{script}\nend"))

    def pipeline(self, transaction: bool = True) -> MemoryPipeline:
        """A pipeline: commands queued, then run in order by ``execute`` (nothing else runs in between)."""
        return MemoryPipeline(self)

    # -- commands as Python calls them (replies as redis-py returns them: bytes, ints, None) ---------------------
    def command(self, name: str, *args: object) -> Any:
        """Run one command given from Python; replies as redis-py gives them."""
        reply = self._commands[name]([_encode(a) for a in args])
        return _python_reply(reply)

    def run_script(self, function: Any, keys: Sequence[object], args: Sequence[object]) -> Any:
        """Run a registered script's function; its reply converted as Redis converts a Lua value."""
        reply = function(self._table_from([_encode(k) for k in keys]), self._table_from([_encode(a) for a in args]))
        return _lua_reply(reply)

    # -- redis.call from Lua (replies as Lua sees them: strings, numbers, false, tables) ---------------------------
    def _dispatch(self, name: str, *args: str) -> Any:
        handler = self._commands.get(name.upper())
        if handler is None:
            raise ValueError(f"MemoryRedis does not implement {name.upper()}")
        reply = handler(list(args))
        if isinstance(reply, list):
            return self._table_from([False if v is None else v for v in reply])
        return False if reply is None else reply

    def _live(self, key: str) -> Value | None:
        expires = self._expires.get(key)
        if expires is not None and expires <= self.clock():
            del self._expires[key]
            self._data.pop(key, None)
        return self._data.get(key)

    def _hash(self, key: str) -> dict[str, str]:
        value = self._live(key)
        if value is None:
            created: dict[str, str] = {}
            self._data[key] = created
            return created
        if not isinstance(value, dict):
            raise TypeError(f"WRONGTYPE {key} is not a hash")
        return value

    def _string(self, key: str) -> str | None:
        value = self._live(key)
        if isinstance(value, dict):
            raise TypeError(f"WRONGTYPE {key} is a hash")
        return value

    def _time(self, args: list[str]) -> list[str]:
        micros = round(self.clock() * 1_000_000)
        return [str(micros // 1_000_000), str(micros % 1_000_000)]

    def _get(self, args: list[str]) -> str | None:
        return self._string(args[0])

    def _set(self, args: list[str]) -> str:
        key, value = args[0], args[1]
        self._data[key] = value
        self._expires.pop(key, None)
        options = [a.upper() for a in args[2:]]
        if "PX" in options:
            self._expires[key] = self.clock() + int(args[2 + options.index("PX") + 1]) / 1000
        elif "EX" in options:
            self._expires[key] = self.clock() + int(args[2 + options.index("EX") + 1])
        return "OK"

    def _incrby(self, args: list[str]) -> int:
        value = int(self._string(args[0]) or 0) + int(args[1])
        self._data[args[0]] = str(value)
        return value

    def _decrby(self, args: list[str]) -> int:
        return self._incrby([args[0], str(-int(args[1]))])

    def _expire(self, args: list[str]) -> int:
        if self._live(args[0]) is None:
            return 0
        self._expires[args[0]] = self.clock() + int(args[1])
        return 1

    def _hget(self, args: list[str]) -> str | None:
        value = self._live(args[0])
        return value.get(args[1]) if isinstance(value, dict) else None

    def _hmget(self, args: list[str]) -> list[str | None]:
        value = self._live(args[0])
        found = value if isinstance(value, dict) else {}
        return [found.get(f) for f in args[1:]]

    def _hset(self, args: list[str]) -> int:
        fields = self._hash(args[0])
        added = 0
        for i in range(1, len(args) - 1, 2):
            added += args[i] not in fields
            fields[args[i]] = args[i + 1]
        return added

    def _hdel(self, args: list[str]) -> int:
        value = self._live(args[0])
        if not isinstance(value, dict):
            return 0
        removed = sum(1 for f in args[1:] if value.pop(f, None) is not None)
        if not value:
            del self._data[args[0]]
        return removed

    def _hincrby(self, args: list[str]) -> int:
        fields = self._hash(args[0])
        value = int(fields.get(args[1], "0")) + int(args[2])
        fields[args[1]] = str(value)
        return value


class MemoryScript:
    """A registered script: runs at once, or queued when given a pipeline as ``client``."""

    def __init__(self, store: MemoryRedis, function: Any) -> None:
        self._store = store
        self._function = function

    async def __call__(self, keys: Sequence[object] = (), args: Sequence[object] = (),
                       client: MemoryPipeline | None = None) -> Any:
        """Run the script (or queue it in ``client``, a pipeline, whose ``execute`` returns its reply)."""
        if client is not None:
            client.queue(lambda: self._store.run_script(self._function, keys, args))
            return client
        return self._store.run_script(self._function, keys, args)


class MemoryPipeline:
    """Commands queued and run in order by ``execute``; usable as ``async with``."""

    def __init__(self, store: MemoryRedis) -> None:
        self._store = store
        self._queued: list[Callable[[], Any]] = []

    async def __aenter__(self) -> MemoryPipeline:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self._queued.clear()

    def queue(self, run: Callable[[], Any]) -> None:
        """Add one call to run at ``execute``."""
        self._queued.append(run)

    def time(self) -> MemoryPipeline:
        """Queue ``TIME`` (replies ``(seconds, microseconds)`` as redis-py does)."""
        self.queue(lambda: tuple(int(x) for x in self._store.command("TIME")))
        return self

    def get(self, key: str) -> MemoryPipeline:
        """Queue ``GET``."""
        self.queue(lambda: self._store.command("GET", key))
        return self

    def hmget(self, key: str, fields: Sequence[str]) -> MemoryPipeline:
        """Queue ``HMGET``."""
        self.queue(lambda: self._store.command("HMGET", key, *fields))
        return self

    def decrby(self, key: str, amount: int) -> MemoryPipeline:
        """Queue ``DECRBY``."""
        self.queue(lambda: self._store.command("DECRBY", key, amount))
        return self

    async def execute(self) -> list[Any]:
        """Run the queued calls in order; their replies."""
        queued, self._queued = self._queued, []
        return [run() for run in queued]


def _encode(value: object) -> str:
    """An argument as redis-py sends it: ints as digits, floats by ``repr``, text as is."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _python_reply(reply: Any) -> Any:
    if isinstance(reply, str):
        return reply.encode()
    if isinstance(reply, list):
        return [_python_reply(v) for v in reply]
    return reply


def _lua_reply(value: Any) -> Any:
    """A script's Lua value as Redis replies it."""
    if value is None or value is False:
        return None
    if value is True:
        return 1
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    items: list[Any] = []
    index = 1
    while True:
        item = value[index]
        if item is None:
            break
        items.append(_lua_reply(item))
        index += 1
    return items
