-- sweep_one: a due member; drop it if its step ended, follow its lease if held, else hand it out to publish
-- again (due once more after A.grace, in case that message is lost too).
local status = redis.call('HGET', K.step, 'status')
if not status or terminal[status] then
  redis.call('ZREM', K.schedule, A.member)
  return {'gone'}
end
local held = number(K.step, 'lease_until', 0)
if held > now then
  redis.call('ZADD', K.schedule, held, A.member)
  return {'leased'}
end
redis.call('ZADD', K.schedule, now + A.grace, A.member)
redis.call('HINCRBY', K.step, 'sweeps', 1)
return {'due', redis.call('HGET', K.step, 'type'), redis.call('HGET', K.step, 'queue'),
        redis.call('HGET', K.step, 'phase'), redis.call('HGET', K.execution, 'project') or ''}
