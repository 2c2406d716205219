"""The Lua scripts the Redis store runs: each change to shared state is one atomic script.

A stream ``S`` under the prefix ``P`` (a hash tag, ``{thinkstream}``, so that
every key of one relay lands in one cluster slot) keeps:

- ``P:log:S``, a Redis Stream whose entry ids are the event numbers
  (``<seq>-0``): the order of the events *is* the stream's, and no second
  counter can disagree with it. Fields ``t`` (the type's code) and ``d``
  (the event's JSON);
- ``P:meta:S``, a hash: ``owner`` (the process running the generation),
  ``client``, ``principal``, ``state`` (``running`` or ``done``), ``first``
  and ``last`` (the first kept and the last event), ``cancel``;
- ``P:lease:S``, the owner's heartbeat lease: gone means the owner is dead;
- ``P:readers:S``, the processes with readers of it, scored by when their
  registration runs out.

And each process ``Q``: ``P:inbox:Q``, a Redis Stream of the events appended
to the streams it reads (each entry: the stream, the first event's number,
the events), which its one blocking reader waits on.

And the relay as a whole: ``P:sizes`` (bytes kept per stream) and ``P:total``,
``P:expiry`` (when each stream's keys expire, so that their bytes are
forgotten with them), ``P:finished`` (finished streams by age: the first to
lose their events when the total is over budget), ``P:slots`` and
``P:cs:<client>`` (running generations, each a lease that a dead process
cannot hold past its end).

Every key gets a TTL; times come from the server's clock (``TIME``), so the
processes' clocks need not agree.
"""

from __future__ import annotations

__all__ = ["APPEND", "CANCEL", "CREATE", "FINISH", "HEARTBEAT", "JOIN", "OPEN", "READ", "READERS", "REAP"]

# Functions every script starts with. ARGV[1] is always the key prefix.
_COMMON = """
local P = ARGV[1]
local OVERHEAD = 32
-- A process's inbox: its last notifications (a reader that falls further behind reads the logs), kept
-- a minute after the last one, or after its process's last heartbeat.
local INBOX_LENGTH = 4096
local INBOX_TTL = 60000
local function key(kind, id) return P .. ':' .. kind .. ':' .. id end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Forget the bytes of streams whose keys have expired.
local function sweep(now)
  local gone = redis.call('ZRANGEBYSCORE', P .. ':expiry', '-inf', now, 'LIMIT', 0, 100)
  for _, id in ipairs(gone) do
    local size = tonumber(redis.call('HGET', P .. ':sizes', id) or '0')
    redis.call('DECRBY', P .. ':total', size)
    redis.call('HDEL', P .. ':sizes', id)
    redis.call('ZREM', P .. ':expiry', id)
    redis.call('ZREM', P .. ':finished', id)
  end
end
local function expire_stream(id, ms, now)
  redis.call('PEXPIRE', key('log', id), ms)
  redis.call('PEXPIRE', key('meta', id), ms)
  redis.call('PEXPIRE', key('readers', id), ms)
  redis.call('ZADD', P .. ':expiry', now + ms, id)
end
local function keep_globals(ms)
  for _, name in ipairs({':total', ':sizes', ':expiry', ':finished', ':slots'}) do
    redis.call('PEXPIRE', P .. name, ms)
  end
end
-- Drop the oldest events of stream id until it keeps at most target bytes.
local function trim(id, target)
  local sizes = P .. ':sizes'
  local size = tonumber(redis.call('HGET', sizes, id) or '0')
  local log = key('log', id)
  local freed, dropped, start = 0, nil, '-'
  while size - freed > target do
    local entries = redis.call('XRANGE', log, start, '+', 'COUNT', 64)
    if #entries == 0 then break end
    for _, e in ipairs(entries) do
      if size - freed <= target then break end
      freed = freed + string.len(e[2][4]) + OVERHEAD
      dropped = e[1]
    end
    if dropped then start = '(' .. dropped end
  end
  if not dropped then return 0 end
  -- Every id is '<seq>-0', so the first kept event's id is the threshold.
  local seq = tonumber(string.match(dropped, '^(%d+)'))
  redis.call('XTRIM', log, 'MINID', (seq + 1) .. '-0')
  redis.call('HSET', key('meta', id), 'first', seq + 1)
  redis.call('HINCRBY', sizes, id, -freed)
  redis.call('DECRBY', P .. ':total', freed)
  return freed
end
-- A finished stream loses every event; its record stays, so a resume hears of the gap.
local function empty(id)
  local size = tonumber(redis.call('HGET', P .. ':sizes', id) or '0')
  redis.call('DEL', key('log', id))
  local last = redis.call('HGET', key('meta', id), 'last')
  if last then redis.call('HSET', key('meta', id), 'first', tonumber(last) + 1) end
  redis.call('HSET', P .. ':sizes', id, 0)
  redis.call('DECRBY', P .. ':total', size)
end
-- The log takes no more events: slots freed, lease dropped, kept for retention.
local function close(id, retention, now)
  local meta = key('meta', id)
  redis.call('HSET', meta, 'state', 'done')
  local client = redis.call('HGET', meta, 'client')
  redis.call('ZREM', P .. ':slots', id)
  if client then redis.call('ZREM', P .. ':cs:' .. client, id) end
  redis.call('DEL', key('lease', id))
  redis.call('ZADD', P .. ':finished', now, id)
  expire_stream(id, retention, now)
end
-- Append events to id's log, numbered after its last one (the caller checked that it may), and put
-- them in the inbox of every process that has readers of the stream: its one blocking reader wakes.
local function add(id, kinds, lens, blob, now)
  local meta = key('meta', id)
  local last = tonumber(redis.call('HGET', meta, 'last'))
  local log = key('log', id)
  local pos, added, i = 1, 0, 0
  for len in string.gmatch(lens, '%d+') do
    i = i + 1
    len = tonumber(len)
    redis.call('XADD', log, (last + i) .. '-0', 't', string.sub(kinds, i, i), 'd', string.sub(blob, pos, pos + len - 1))
    pos = pos + len
    added = added + len + OVERHEAD
  end
  redis.call('HSET', meta, 'last', last + i)
  redis.call('HINCRBY', P .. ':sizes', id, added)
  redis.call('INCRBY', P .. ':total', added)
  for _, process in ipairs(redis.call('ZRANGEBYSCORE', key('readers', id), now, '+inf')) do
    local inbox = key('inbox', process)
    redis.call('XADD', inbox, 'MAXLEN', '~', INBOX_LENGTH, '*',
      's', id, 'f', last + 1, 'k', kinds, 'l', lens, 'd', blob)
    redis.call('PEXPIRE', inbox, INBOX_TTL)
  end
  return last + i
end
"""

# ARGV: P, id, owner, client, principal, max_streams, client_streams, lease_ms, running_ttl_ms, globals_ttl_ms
# -> 'ok' | 'busy' | 'client_busy' | 'exists'
CREATE = (
    _COMMON
    + """
local id, owner, client, principal = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local max_streams, client_streams = tonumber(ARGV[6]), tonumber(ARGV[7])
local lease, ttl, globals_ttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local meta = key('meta', id)
if redis.call('EXISTS', meta) == 1 then
  -- A retried create that had already been applied is fine; anything else is a clash.
  if redis.call('HGET', meta, 'owner') == owner then return 'ok' end
  return 'exists'
end
local now = now_ms()
sweep(now)
local slots, mine = P .. ':slots', P .. ':cs:' .. client
redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
redis.call('ZREMRANGEBYSCORE', mine, '-inf', now)
if redis.call('ZCARD', slots) >= max_streams then return 'busy' end
if redis.call('ZCARD', mine) >= client_streams then return 'client_busy' end
redis.call('ZADD', slots, now + lease, id)
redis.call('ZADD', mine, now + lease, id)
redis.call('PEXPIRE', mine, ttl)
redis.call('HSET', meta, 'owner', owner, 'client', client, 'principal', principal,
  'state', 'running', 'first', 1, 'last', 0)
redis.call('SET', key('lease', id), owner, 'PX', lease)
redis.call('HSETNX', P .. ':sizes', id, 0)
redis.call('INCRBY', P .. ':total', 0)
expire_stream(id, ttl, now)
keep_globals(globals_ttl)
return 'ok'
"""
)

# ARGV: P, id, owner, expected_last, stream_bytes, total_bytes, running_ttl_ms, retention_ms, globals_ttl_ms,
#       kinds (one digit per event), lengths (space-separated), the events' JSON texts back to back
# -> 'ok' | 'closed' (not this owner's, or ended) | 'conflict' (the log has other events than expected)
# A batch that ends with a last event (done, error) finishes the log in the same step.
APPEND = (
    _COMMON
    + """
local id, owner, expected = ARGV[2], ARGV[3], tonumber(ARGV[4])
local stream_bytes, total_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local ttl, retention, globals_ttl = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local kinds, lens, blob = ARGV[10], ARGV[11], ARGV[12]
local meta = key('meta', id)
local m = redis.call('HMGET', meta, 'owner', 'state', 'last')
local n = string.len(kinds)
if m[1] ~= owner then return 'closed' end
local last = tonumber(m[3])
-- A retried append that had already been applied.
if last == expected + n then return 'ok' end
if m[2] ~= 'running' then return 'closed' end
if last ~= expected then return 'conflict' end
local now = now_ms()
add(id, kinds, lens, blob, now)
-- The first event makes the log's key: it expires like the rest. (Renewing every key's TTL, and
-- forgetting expired streams, is the owner's heartbeat's work, once a second, not every append's.)
if last == 0 then redis.call('PEXPIRE', key('log', id), ttl) end
local size = tonumber(redis.call('HGET', P .. ':sizes', id))
if size > stream_bytes then trim(id, stream_bytes) end
local total = tonumber(redis.call('GET', P .. ':total'))
while total > total_bytes do
  local oldest = redis.call('ZRANGE', P .. ':finished', 0, 0)
  if #oldest == 0 then break end
  redis.call('ZREM', P .. ':finished', oldest[1])
  empty(oldest[1])
  total = tonumber(redis.call('GET', P .. ':total'))
end
if total > total_bytes then
  size = tonumber(redis.call('HGET', P .. ':sizes', id))
  trim(id, math.max(0, size - (total - total_bytes)))
end
local final = string.sub(kinds, n, n)
if final == '4' or final == '5' then
  close(id, retention, now)
  keep_globals(globals_ttl)
end
return 'ok'
"""
)

# ARGV: P, id, owner, retention_ms, globals_ttl_ms -> 'ok' | 'closed'
FINISH = (
    _COMMON
    + """
local id, owner = ARGV[2], ARGV[3]
local m = redis.call('HMGET', key('meta', id), 'owner', 'state')
if m[1] ~= owner then return 'closed' end
if m[2] == 'running' then
  local now = now_ms()
  close(id, tonumber(ARGV[4]), now)
  keep_globals(tonumber(ARGV[5]))
end
return 'ok'
"""
)

# ARGV: P, id, after, max_bytes
# -> {'ok', finished (0/1), kinds, lengths, texts} | {'missing'} | {'gap'} | {'beyond'}
READ = (
    _COMMON
    + """
local id, after, max_bytes = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local m = redis.call('HMGET', key('meta', id), 'state', 'first', 'last')
if not m[1] then return {'missing'} end
local first, last = tonumber(m[2]), tonumber(m[3])
local finished = 0
if m[1] == 'done' then finished = 1 end
if after > last then return {'beyond'} end
if after == last then return {'ok', finished, '', '', ''} end
if after < first - 1 then return {'gap'} end
local kinds, lens, texts = {}, {}, {}
local bytes, start = 0, after .. '-0'
local log = key('log', id)
repeat
  local entries = redis.call('XRANGE', log, '(' .. start, '+', 'COUNT', 64)
  if #entries == 0 then break end
  for _, e in ipairs(entries) do
    local text = e[2][4]
    kinds[#kinds + 1] = e[2][2]
    lens[#lens + 1] = string.len(text)
    texts[#texts + 1] = text
    bytes = bytes + string.len(text)
    start = e[1]
    if bytes >= max_bytes then break end
  end
until bytes >= max_bytes or #entries < 64
if #kinds == 0 or tonumber(string.match(start, '^(%d+)')) ~= after + #kinds then return {'gap'} end
return {'ok', finished, table.concat(kinds), table.concat(lens, ' '), table.concat(texts)}
"""
)

# Ends running streams whose owner's lease ran out with the given error event.
# Used by OPEN and REAP: ARGV[a] retention_ms, ARGV[a+1] globals_ttl_ms, ARGV[a+2] the error's JSON.
_REAP = """
local function reap(id, retention, globals_ttl, error_json)
  local meta = key('meta', id)
  if redis.call('HGET', meta, 'state') ~= 'running' then return false end
  if redis.call('EXISTS', key('lease', id)) == 1 then return false end
  local now = now_ms()
  add(id, '5', tostring(string.len(error_json)), error_json, now)
  close(id, retention, now)
  -- Owned by no process now: a stalled owner that comes back is told its log is closed.
  redis.call('HSET', meta, 'owner', '')
  keep_globals(globals_ttl)
  return true
end
"""

# ARGV: P, id, retention_ms, globals_ttl_ms, error_json
# -> nil | {principal, state, last}; a stream whose owner died is ended first.
OPEN = (
    _COMMON
    + _REAP
    + """
local id = ARGV[2]
local meta = key('meta', id)
if redis.call('EXISTS', meta) == 0 then return nil end
reap(id, tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
return redis.call('HMGET', meta, 'principal', 'state', 'last')
"""
)

# ARGV: P, retention_ms, globals_ttl_ms, error_json, id... -> the ids it ended
REAP = (
    _COMMON
    + _REAP
    + """
local ended = {}
for i = 5, #ARGV do
  if reap(ARGV[i], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]) then ended[#ended + 1] = ARGV[i] end
end
return ended
"""
)

# ARGV: P, owner, lease_ms, running_ttl_ms, globals_ttl_ms, n_owned, owned ids..., ids read here...
# For each owned id: {cancel (0/1), processes with readers, closed (0/1)}. Leases, slots and TTLs of the
# owned streams are renewed, and so are this process's registrations as a reader of the others.
HEARTBEAT = (
    _COMMON
    + """
local owner, lease, ttl, globals_ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local owned = tonumber(ARGV[6])
local now = now_ms()
sweep(now)
local out = {}
for i = 7, 6 + owned do
  local id = ARGV[i]
  local meta = key('meta', id)
  local m = redis.call('HMGET', meta, 'owner', 'state', 'cancel', 'client')
  if m[1] == owner and m[2] == 'running' then
    redis.call('SET', key('lease', id), owner, 'PX', lease)
    -- Not XX: a slot that lapsed while this process stalled counts again.
    redis.call('ZADD', P .. ':slots', now + lease, id)
    redis.call('ZADD', P .. ':cs:' .. m[4], now + lease, id)
    redis.call('PEXPIRE', P .. ':cs:' .. m[4], ttl)
    expire_stream(id, ttl, now)
    local readers = key('readers', id)
    redis.call('ZREMRANGEBYSCORE', readers, '-inf', now)
    local cancel = 0
    if m[3] then cancel = 1 end
    out[#out + 1] = {cancel, redis.call('ZCARD', readers), 0}
  else
    out[#out + 1] = {0, 0, 1}
  end
end
-- Registrations as a reader are renewed, or made again if they lapsed while this process stalled.
for i = 7 + owned, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', key('meta', id), 'state') == 'running' then
    local readers = key('readers', id)
    redis.call('ZADD', readers, now + lease, owner)
    redis.call('PEXPIRE', readers, ttl)
  end
end
redis.call('PEXPIRE', key('inbox', owner), INBOX_TTL)
keep_globals(globals_ttl)
return out
"""
)

# ARGV: P, id, process, lease_ms, running_ttl_ms -> 1 if registered (the stream runs), else 0
JOIN = (
    _COMMON
    + """
local id = ARGV[2]
if redis.call('HGET', key('meta', id), 'state') ~= 'running' then return 0 end
local readers = key('readers', id)
redis.call('ZADD', readers, now_ms() + tonumber(ARGV[4]), ARGV[3])
redis.call('PEXPIRE', readers, tonumber(ARGV[5]))
return 1
"""
)

# ARGV: P, id -> processes with readers of the stream now
READERS = (
    _COMMON
    + """
local readers = key('readers', ARGV[2])
redis.call('ZREMRANGEBYSCORE', readers, '-inf', now_ms())
return redis.call('ZCARD', readers)
"""
)

# ARGV: P, id -> 1 if the stream was running (its owner will stop it), else 0
CANCEL = (
    _COMMON
    + """
local id = ARGV[2]
local meta = key('meta', id)
if redis.call('HGET', meta, 'state') ~= 'running' then return 0 end
redis.call('HSET', meta, 'cancel', 1)
redis.call('PUBLISH', P .. ':cancel', id)
return 1
"""
)
