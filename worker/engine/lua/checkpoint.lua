-- checkpoint: the lease holder saves its state now (an id it just started), with its log lines so far.
if not holds(K.step, A.token) then return 0 end
append_logs(K.logs, A.logs, A.log_maxlen)
redis.call('HSET', K.step, 'state', A.state)
extend(K.step, K.schedule, A.member, A.lease_seconds)
return 1
