-- finish: the lease holder ends its step; the execution goes on with the next step or ends.
-- A.next is the next step's index (-1: none); A.final is '' (go on), 'auto' (succeeded unless a step
-- failed) or the execution's final status. K.steps holds every step key, then every rows key.
if not holds(K.step, A.token) then return {'fenced'} end
append_logs(K.logs, A.logs, A.log_maxlen)
redis.call('HSET', K.step, 'status', A.status, 'finished_at', now, 'lease', '', 'lease_until', 0)
for field, value in pairs(cjson.decode(A.fields)) do redis.call('HSET', K.step, field, value) end
redis.call('HINCRBY', K.step, 'completions', 1)
-- A step skipped by its when: condition is not a failure (worker/jobs).
if A.status ~= S.succeeded and A.status ~= S.skipped then redis.call('HINCRBY', K.execution, 'failures', 1) end
redis.call('ZREM', K.schedule, A.member)
-- The step's AWS quota slots (and its places in their lines) are given back with its end (worker/quotas).
for _, base in ipairs(redis.call('SMEMBERS', K.quota_held)) do
  redis.call('HDEL', base .. ':holders', A.member)
  redis.call('ZREM', base .. ':waiters', A.member)
  redis.call('HDEL', base .. ':seen', A.member)
end
redis.call('DEL', K.quota_held)
redis.call('XADD', K.events, 'MAXLEN', '~', A.events_maxlen, '*', 'execution', A.execution_id,
           'step', redis.call('HGET', K.step, 'index'), 'status', A.status)
local final = A.final
-- A cancel request ends the execution here, even when this step got to finish its work first.
if (final == '' or final == 'auto') and redis.call('EXISTS', K.cancel) == 1 then final = S.cancelled end
if final == 'auto' then
  if number(K.execution, 'failures', 0) > 0 then final = S.failed else final = S.succeeded end
end
if final ~= '' then
  redis.call('HSET', K.execution, 'status', final, 'finished_at', now)
  local count = #K.steps / 2
  for i = 1, count do
    if redis.call('HGET', K.steps[i], 'status') == S.queued then
      redis.call('HSET', K.steps[i], 'status', S.skipped)
    end
  end
  redis.call('XADD', K.events, 'MAXLEN', '~', A.events_maxlen, '*', 'execution', A.execution_id, 'status', final)
  -- Retention counts from the end: until now nothing of a running execution could expire.
  for _, key in ipairs({K.execution, K.logs, K.cancel, unpack(K.steps)}) do
    redis.call('EXPIRE', key, A.retention)
  end
  return {'ended', final}
end
local following = K.steps[A.next + 1]
redis.call('HSET', K.execution, 'current', A.next)
redis.call('ZADD', K.schedule, now + A.grace, A.execution_id .. ':' .. A.next)
return {'next', redis.call('HGET', following, 'type'), redis.call('HGET', following, 'queue')}
