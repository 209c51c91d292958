-- request_cancel: set the execution's cancel flag. A step between phases is made due at once, so its
-- next claim stops it; a leased phase sees the flag at its commit (or its next renew).
local status = redis.call('HGET', K.execution, 'status')
if not status then return {'missing'} end
if terminal[status] then return {'ended'} end
redis.call('SET', K.cancel, 1)
local current = number(K.execution, 'current', 0)
local step = K.steps[current + 1]
if number(step, 'lease_until', 0) > now then return {'leased'} end
redis.call('ZADD', K.schedule, now, A.execution_id .. ':' .. current)
return {'idle', current, redis.call('HGET', step, 'type'), redis.call('HGET', step, 'queue'),
        redis.call('HGET', step, 'phase')}
