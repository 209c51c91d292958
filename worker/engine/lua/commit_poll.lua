-- commit_poll: the lease holder's phase ends in a poll (or a retry); save its state and release the phase.
-- A cancel request seen here keeps the lease: the holder stops what it started, then finishes the step.
-- A.stopping = 1 is the retry of a stop that failed transiently: it is scheduled whatever the flag says.
-- A.watch (JSON, or '') is what the next phase waits for: the watcher looks at it after A.countdown, and the
-- schedule entry stays as for any poll, so the sweeper publishes the phase if no watcher does.
if not holds(K.step, A.token) then return 'fenced' end
append_logs(K.logs, A.logs, A.log_maxlen)
redis.call('HSET', K.step, 'state', A.state)
if A.stopping == 0 and redis.call('EXISTS', K.cancel) == 1 then return 'cancel' end
local due = now + A.countdown + A.grace
local timeout, started = number(K.step, 'timeout', nil), number(K.step, 'started_at', nil)
if timeout and started and started + timeout < due then due = started + timeout end
redis.call('HINCRBY', K.step, 'phase', 1)
redis.call('HINCRBY', K.step, 'polls', 1)
redis.call('HSET', K.step, 'attempts', A.attempts, 'deliveries', 0, 'lease', '', 'lease_until', 0)
redis.call('ZADD', K.schedule, due, A.member)
if A.watch ~= '' then
  redis.call('HSET', K.watch_items, A.member, A.watch)
  redis.call('ZADD', K.watch_due, now + A.countdown, A.member)
end
return 'ok'
