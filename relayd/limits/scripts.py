"""The Lua scripts the Redis store runs: each call is one atomic step on the server.

Both scripts read the Redis server's clock (``TIME``), so every relayd instance sees the
same time whatever its own clock says. Every key a script touches is passed in
``KEYS`` and carries the same hash tag, so the scripts also run on Redis Cluster.

ADMIT — ``ARGV[1]`` is the number of checks; then five arguments per check:
kind (``w`` window, ``p`` period, ``c`` concurrency), limit, amount, extra (the period
``day``/``month``, or the lease TTL in ms), lease id. Phase one evaluates every check
(pruning what has expired); if one does not fit, the script returns
``{0, index, retry_ms}`` (``retry_ms`` -1: not before the period ends) having consumed
nothing. Phase two applies every check and returns
``{1, used_1, slot_1, reset_ms_1, used_2, ...}``.

SETTLE — three arguments per key: kind (``w``/``p`` adjust a reservation, ``r`` release
a lease, ``u`` add to a usage counter), slot / lease / field, delta. A reservation whose
bucket or period is already gone is left alone.

Windows are hashes of 1-second buckets (field: epoch second, value: amount); a bucket
counts until 60 seconds after its second. The hash's EXPIRE only collects keys nobody
uses any more: what is counted is decided by the bucket times, so a busy key's TTL
being refreshed never stretches the window. Periods are hashes keyed by period number
(UTC day since 1970, or year*12+month-1) whose key expires a day after its period ends.
"""

ADMIT = r"""
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec + tonumber(t[2]) / 1000000

local function period(kind, s)
  local day = math.floor(s / 86400)
  if kind == 'day' then
    return day, (day + 1) * 86400
  end
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  local yy = nm <= 2 and ny - 1 or ny
  local era2 = math.floor(yy / 400)
  local yoe2 = yy - era2 * 400
  local mm = nm > 2 and nm - 3 or nm + 9
  local doe2 = yoe2 * 365 + math.floor(yoe2 / 4) - math.floor(yoe2 / 100)
    + math.floor((153 * mm + 2) / 5)
  return y * 12 + m - 1, (era2 * 146097 + doe2 - 719468) * 86400
end

local n = tonumber(ARGV[1])
local used, slot, reset, ends = {}, {}, {}, {}
for i = 1, n do
  local key = KEYS[i]
  local b = 1 + (i - 1) * 5
  local kind, limit, amount = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  if kind == 'w' then
    local h = redis.call('HGETALL', key)
    local sum, stale, buckets = 0, {}, {}
    for j = 1, #h, 2 do
      local s, v = tonumber(h[j]), tonumber(h[j + 1])
      if s <= sec - 60 then
        stale[#stale + 1] = h[j]
      else
        sum = sum + v
        buckets[#buckets + 1] = {s, v}
      end
    end
    if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
    if sum + amount > limit then
      table.sort(buckets, function(x, y) return x[1] < y[1] end)
      local need, freed, retry = sum + amount - limit, 0, 60
      for _, bv in ipairs(buckets) do
        freed = freed + bv[2]
        if freed >= need then
          retry = bv[1] + 60 - now
          break
        end
      end
      return {0, i, math.max(math.ceil(retry * 1000), 1)}
    end
    used[i], slot[i], reset[i] = sum + amount, sec, sec + 60 - now
  elseif kind == 'p' then
    local number, period_end = period(ARGV[b + 4], sec)
    local h = redis.call('HGETALL', key)
    local cur, stale = 0, {}
    for j = 1, #h, 2 do
      local p = tonumber(h[j])
      if p < number then
        stale[#stale + 1] = h[j]
      elseif p == number then
        cur = tonumber(h[j + 1])
      end
    end
    if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
    if cur + amount > limit then return {0, i, -1} end
    used[i], slot[i], reset[i], ends[i] = cur + amount, number, period_end - now, period_end
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local count = redis.call('ZCARD', key)
    if count >= limit then return {0, i, 1000} end
    used[i], slot[i], reset[i] = count + 1, 0, tonumber(ARGV[b + 4]) / 1000
  end
end

local out = {1}
for i = 1, n do
  local key = KEYS[i]
  local b = 1 + (i - 1) * 5
  local kind, amount = ARGV[b + 1], tonumber(ARGV[b + 3])
  if kind == 'w' then
    redis.call('HINCRBY', key, sec, amount)
    redis.call('EXPIRE', key, 61)
  elseif kind == 'p' then
    redis.call('HINCRBY', key, slot[i], amount)
    redis.call('EXPIREAT', key, ends[i] + 86400)
  else
    local ttl = tonumber(ARGV[b + 4])
    redis.call('ZADD', key, now + ttl / 1000, ARGV[b + 5])
    redis.call('PEXPIRE', key, ttl + 60000)
  end
  out[#out + 1] = used[i]
  out[#out + 1] = slot[i]
  out[#out + 1] = math.floor(reset[i] * 1000)
end
return out
"""

SETTLE = r"""
local sec = tonumber(redis.call('TIME')[1])
for i = 1, #KEYS do
  local key, kind, a, d = KEYS[i], ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  if kind == 'w' or kind == 'p' then
    local live = kind == 'p' or tonumber(a) > sec - 60
    if live and redis.call('HEXISTS', key, a) == 1 then
      if redis.call('HINCRBY', key, a, d) < 0 then redis.call('HSET', key, a, 0) end
    end
  elseif kind == 'r' then
    redis.call('ZREM', key, a)
  else
    redis.call('HINCRBY', key, a, d)
  end
end
return #KEYS
"""
