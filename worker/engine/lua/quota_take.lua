-- quota_take: take one token from every bucket in K.buckets, all or none (worker/quotas/store.py).
-- A.spec is JSON [[rate, burst], ...], one per bucket: the configured ceiling. A bucket's rate is the
-- ceiling unless AWS throttled it (quota_cut): then it grows back linearly over A.recover seconds (AIMD).
-- A.at > 0 replaces Redis time (tests' fake clock). Returns {1, ''} or {0, seconds until a token}.
-- A.reserve > 0: a caller that would wait at most that long gets its token now, in debt (the buckets go
-- below zero, so the next callers queue behind it), and {2, seconds}: it may call then without taking again.
-- One wait per caller, whatever the number of callers: no herd of retries at each refill.
local t = now
if A.at > 0 then t = A.at end
local specs = cjson.decode(A.spec)
local wait, fills = 0, {}
for i, key in ipairs(K.buckets) do
  local ceiling, burst = specs[i][1], specs[i][2]
  local b = redis.call('HMGET', key, 'tokens', 'ts', 'cut_rate', 'cut_at')
  local rate = ceiling
  if b[3] then rate = math.min(ceiling, tonumber(b[3]) + math.max(0, t - tonumber(b[4])) * ceiling / A.recover) end
  -- (a cut rate cuts the burst with it: a full bucket of the ceiling's burst is the overload AWS refused)
  burst = math.max(1, burst * rate / ceiling)
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or t
  tokens = math.min(burst, tokens + math.max(0, t - ts) * rate)
  if tokens < 1 then wait = math.max(wait, (1 - tokens) / rate) end
  fills[i] = tokens
end
if wait > 0 and (A.reserve <= 0 or wait > A.reserve) then return {0, tostring(wait)} end
for i, key in ipairs(K.buckets) do
  redis.call('HSET', key, 'tokens', tostring(fills[i] - 1), 'ts', tostring(t))
  redis.call('EXPIRE', key, A.ttl)
end
if wait > 0 then return {2, tostring(wait)} end
return {1, ''}
