-- watch_look: the watcher's verdict on one watched step. 'defer' (what it waits for has not changed) moves
-- its watch and its schedule entry on by A.delay and stores A.item (the watch with its next backoff);
-- 'wake' ends the watch and keeps the step due within the grace period (the caller publishes its phase).
-- Fenced by the phase the watch was written for: a watch replaced by a newer one is left alone, and one
-- whose step moved on (ended, or a phase is running: a cancel nudge, the sweeper) is dropped.
local item = redis.call('HGET', K.items, A.member)
if not item or tonumber(cjson.decode(item).phase) ~= A.phase then return 'gone' end
local status = redis.call('HGET', K.step, 'status')
if not status or terminal[status] or number(K.step, 'phase', -1) ~= A.phase
    or number(K.step, 'lease_until', 0) > now then
  redis.call('HDEL', K.items, A.member)
  redis.call('ZREM', K.due, A.member)
  return 'gone'
end
if A.verdict == 'wake' or redis.call('EXISTS', K.cancel) == 1 then
  redis.call('HDEL', K.items, A.member)
  redis.call('ZREM', K.due, A.member)
  local due = now + A.grace
  local current = tonumber(redis.call('ZSCORE', K.schedule, A.member))
  if current and current < due then due = current end
  redis.call('ZADD', K.schedule, due, A.member)
  return 'wake'
end
local due = now + A.delay + A.grace
local timeout, started = number(K.step, 'timeout', nil), number(K.step, 'started_at', nil)
if timeout and started and started + timeout < due then due = started + timeout end
redis.call('ZADD', K.schedule, due, A.member)
redis.call('ZADD', K.due, now + A.delay, A.member)
redis.call('HSET', K.items, A.member, A.item)
redis.call('HINCRBY', K.step, 'looks', 1)
return 'defer'
