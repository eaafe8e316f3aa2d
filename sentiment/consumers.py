"""Consumer names: the default one, unique per process, and removing the group's dead consumers.

A consumer name must be unique among the live members of a group: two processes under one name share
one pending list, and each re-reads (ID 0) what the other still has in flight. `hostname-pid` is not
unique where containers share a hostname and are all pid 1 (host networking), so the default adds six
random hex digits, drawn once per process: `<hostname>-<pid>-<hex>`. `CONSUMER_NAME` still fixes a name
(a fixed name's restart re-reads its own pending entries at once instead of waiting for reclaim).

Every restart under a fresh name leaves a consumer behind. The reclaimer removes those that have nothing
pending and were idle longer than `CONSUMER_REMOVE_IDLE_MS` (a live worker's blocking read keeps its idle
time near BLOCK_MS). XGROUP DELCONSUMER drops the consumer's pending entries with it, so the check and the
removal run in one Lua script: atomic, no read can give the consumer an entry in between. The script
names one key (the stream), so it runs on a cluster too."""

from __future__ import annotations

import os
import secrets
import socket

_names: dict[int, str] = {}

# KEYS[1] stream; ARGV group, minimum idle ms, the caller's own name (never removed). Returns the names
# removed. XINFO CONSUMERS replies with flat name/value lists; `idle` is the time since the consumer's
# last read or claim (Redis 7.2 also reports `inactive`, which a quiet live reader would exceed).
REMOVE_IDLE = """
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] ~= ARGV[3] and tonumber(f['pending']) == 0 and tonumber(f['idle']) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed[#removed + 1] = f['name']
  end
end
return removed
"""


def default_consumer_name() -> str:
    """`<hostname>-<pid>-<6 hex digits>`, the same for the life of the process. Keyed by pid, so a
    forked child draws a name of its own."""
    pid = os.getpid()
    if pid not in _names:
        _names[pid] = f"{socket.gethostname()}-{pid}-{secrets.token_hex(3)}"
    return _names[pid]
