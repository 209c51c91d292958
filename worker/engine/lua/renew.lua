-- renew: the lease holder is alive; extend its lease and append the log lines it has so far.
if not holds(K.step, A.token) then return {0, 0} end
append_logs(K.logs, A.logs, A.log_maxlen)
extend(K.step, K.schedule, A.member, A.lease_seconds)
return {1, redis.call('EXISTS', K.cancel)}
