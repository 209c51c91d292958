-- Helpers shared by the state machine's scripts (see worker/engine/protocol.py).

-- Does the phase lease on `step` belong to `token`? Every write a phase makes is fenced by this.
local function holds(step, token)
  return redis.call('HGET', step, 'lease') == token
end

-- Extend the lease of `member` (execution:index) to now + seconds; the schedule follows the lease.
local function extend(step, schedule, member, seconds)
  local expires = now + seconds
  redis.call('HSET', step, 'lease_until', expires)
  redis.call('ZADD', schedule, expires, member)
end

-- Append a JSON array of log entries ({ts, level, step, event, fields}) to an execution's stream.
local function append_logs(key, encoded, maxlen)
  if encoded == '' or encoded == '[]' then return end
  for _, e in ipairs(cjson.decode(encoded)) do
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'ts', e.ts, 'level', e.level, 'step', e.step,
               'event', e.event, 'fields', e.fields)
  end
end

-- Number field of a hash, or `default` when it is missing or blank.
local function number(key, field, default)
  local value = redis.call('HGET', key, field)
  if not value or value == '' then return default end
  return tonumber(value)
end
