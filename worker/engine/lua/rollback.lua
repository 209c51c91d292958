-- rollback: undo a submit whose first message could not be published, unless a worker already claimed it.
local first = K.steps[1]
if redis.call('HGET', first, 'status') ~= S.queued or number(first, 'deliveries', 0) > 0 then return 0 end
redis.call('DEL', K.execution, K.logs, K.cancel, unpack(K.steps))
redis.call('ZREM', K.schedule, A.execution_id .. ':0')
redis.call('ZREM', K.by_project, A.execution_id)
redis.call('ZREM', K.all_executions, A.execution_id)
return 1
