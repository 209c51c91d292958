-- claim: a phase message arrived; take the phase's lease, or say why it must not run.
local status = redis.call('HGET', K.step, 'status')
if not status then return {'missing'} end
if terminal[status] then return {'terminal'} end
if number(K.step, 'phase', -1) ~= A.phase then return {'stale'} end
local deliveries = number(K.step, 'deliveries', 0)
if not holds(K.step, A.token) then
  -- (a retried call of this same claim finds its own token and runs)
  if number(K.step, 'lease_until', 0) > now then return {'leased'} end
  deliveries = redis.call('HINCRBY', K.step, 'deliveries', 1)
  redis.call('HSET', K.step, 'lease', A.token)
end
extend(K.step, K.schedule, A.member, A.lease_seconds)
if status == S.queued then
  redis.call('HSET', K.step, 'status', S.running, 'started_at', now)
  redis.call('XADD', K.events, 'MAXLEN', '~', A.events_maxlen, '*', 'execution', A.execution_id,
             'step', redis.call('HGET', K.step, 'index'), 'status', S.running)
  if redis.call('HGET', K.execution, 'status') == S.queued then
    redis.call('HSET', K.execution, 'status', S.running, 'started_at', now)
  end
end
return {'run', redis.call('HGETALL', K.step), redis.call('HGETALL', K.execution),
        redis.call('EXISTS', K.cancel), deliveries}
