-- quota_acquire: step A.member (of project A.project) takes one of A.limit concurrency slots, or waits its
-- turn. Holders: hash member -> project; a slot is held until the step ends (finish.lua gives it back
-- through K.held). Waiters: zset member -> virtual start; each project's next waiter starts one after its
-- previous one and never before the line's clock, so projects take turns (start-time fair queueing).
-- Seen: hash waiter -> "time|project"; a waiter not seen for A.stale seconds has left the line.
-- A.project_limit > 0 caps the project's own holders. A.at > 0 replaces Redis time (tests).
-- Returns {granted 1|0, holders, effective limit, place in line}.
local t = now
if A.at > 0 then t = A.at end
local function limit_now()
  local m = redis.call('HMGET', K.meta, 'cut_limit', 'cut_at')
  if not m[1] then return A.limit end
  return math.min(A.limit, math.floor(tonumber(m[1]) + math.max(0, t - tonumber(m[2])) * A.limit / A.recover))
end
-- A holder whose step ended or vanished without giving its slot back (its finish never ran).
local function reap()
  local flat = redis.call('HGETALL', K.holders)
  for i = 1, #flat, 2 do
    local eid, idx = string.match(flat[i], '^(.*):(%d+)$')
    local status = eid and redis.call('HGET', A.prefix .. ':exec:' .. eid .. ':step:' .. idx, 'status')
    if not status or terminal[status] then redis.call('HDEL', K.holders, flat[i]) end
  end
end
local limit = limit_now()
if redis.call('HEXISTS', K.holders, A.member) == 1 then
  return {1, redis.call('HLEN', K.holders), limit, 0}
end
local count = redis.call('HLEN', K.holders)
if count >= limit then reap(); count = redis.call('HLEN', K.holders) end
local per_project = {}
for _, project in ipairs(redis.call('HVALS', K.holders)) do per_project[project] = (per_project[project] or 0) + 1 end
redis.call('SADD', K.held, A.base)
redis.call('EXPIRE', K.held, A.ttl)
local score = tonumber(redis.call('ZSCORE', K.waiters, A.member))
if not score then
  local clock = tonumber(redis.call('HGET', K.meta, 'clock')) or 0
  score = math.max((tonumber(redis.call('HGET', K.meta, 'v:' .. A.project)) or 0) + 1, clock)
  redis.call('ZADD', K.waiters, score, A.member)
  redis.call('HSET', K.meta, 'v:' .. A.project, score)
end
redis.call('HSET', K.seen, A.member, t .. '|' .. A.project .. '|' .. A.project_limit)
for _, key in ipairs({K.waiters, K.seen, K.meta, K.holders}) do redis.call('EXPIRE', key, A.ttl) end
local free = limit - count
local capped = A.project_limit > 0 and (per_project[A.project] or 0) >= A.project_limit
local ahead = 0
if free > 0 and not capped then
  -- Waiters ahead that can take a slot now: not gone, and not held back by their project's cap.
  for _, other in ipairs(redis.call('ZRANGEBYSCORE', K.waiters, '-inf', score)) do
    if other == A.member or ahead >= free then break end
    local seen = redis.call('HGET', K.seen, other)
    local at, project, cap = string.match(seen or '', '^([^|]*)|(.*)|([^|]*)$')
    if not seen or t - tonumber(at) > A.stale then
      redis.call('ZREM', K.waiters, other)
      redis.call('HDEL', K.seen, other)
    elseif tonumber(cap) == 0 or (per_project[project] or 0) < tonumber(cap) then
      ahead = ahead + 1
    end
  end
  if ahead < free then
    redis.call('HSET', K.holders, A.member, A.project)
    redis.call('ZREM', K.waiters, A.member)
    redis.call('HDEL', K.seen, A.member)
    redis.call('HSET', K.meta, 'clock', math.max(score, tonumber(redis.call('HGET', K.meta, 'clock')) or 0))
    return {1, count + 1, limit, 0}
  end
end
return {0, count, limit, redis.call('ZRANK', K.waiters, A.member) + 1}
