-- quota_cut: AWS throttled a call; halve the shared rate of every bucket in K.buckets (the multiplicative
-- decrease of AIMD, for the whole fleet) and empty them. Throttling answers that arrive within A.cooldown
-- of a cut are the same overload seen by other workers: they cut nothing more. Returns the new rates.
local t = now
if A.at > 0 then t = A.at end
local specs = cjson.decode(A.spec)
local rates = {}
for i, key in ipairs(K.buckets) do
  local ceiling = specs[i][1]
  local b = redis.call('HMGET', key, 'cut_rate', 'cut_at', 'tokens')
  local rate = ceiling
  if b[1] then rate = math.min(ceiling, tonumber(b[1]) + math.max(0, t - tonumber(b[2])) * ceiling / A.recover) end
  if not b[2] or t - tonumber(b[2]) >= A.cooldown then
    rate = math.max(ceiling * A.floor, rate / 2)
    -- (emptied, but debts stay: tokens reserved before the cut are still owed)
    local tokens = math.min(0, tonumber(b[3]) or 0)
    redis.call('HSET', key, 'cut_rate', tostring(rate), 'cut_at', tostring(t), 'tokens', tostring(tokens),
               'ts', tostring(t))
    redis.call('HINCRBY', key, 'cuts', 1)
    redis.call('EXPIRE', key, A.ttl)
  end
  rates[i] = tostring(rate)
end
return rates
