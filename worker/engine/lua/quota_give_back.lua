-- quota_give_back: AWS refused to start work for A.member although it held a slot (LimitExceeded: others,
-- e.g. dashboards, use the same AWS quota). Give the slot back and lower the fleet's effective limit to
-- the holders left (at least 1), growing back by A.limit over A.recover seconds; a refusal within
-- A.cooldown of the last cut cuts nothing more. Returns the effective limit.
local t = now
if A.at > 0 then t = A.at end
redis.call('HDEL', K.holders, A.member)
local m = redis.call('HMGET', K.meta, 'cut_limit', 'cut_at')
local limit = A.limit
if m[1] then limit = math.min(A.limit, math.floor(tonumber(m[1]) + math.max(0, t - tonumber(m[2])) * A.limit / A.recover)) end
if not m[2] or t - tonumber(m[2]) >= A.cooldown then
  limit = math.max(1, math.min(limit, redis.call('HLEN', K.holders)))
  redis.call('HSET', K.meta, 'cut_limit', limit, 'cut_at', tostring(t))
  redis.call('HINCRBY', K.meta, 'cuts', 1)
  redis.call('EXPIRE', K.meta, A.ttl)
end
return limit
