-- due: schedule members whose time has come (oldest first).
return redis.call('ZRANGEBYSCORE', K.schedule, '-inf', now, 'LIMIT', 0, A.limit)
