-- write_rows: the lease holder appends result rows that start at position A.start of the step's output.
-- Rows already stored (a retried phase paging again) are skipped, a gap is refused, and the page cursor
-- (A.state, blank for none) is saved in the same script: rows can be neither duplicated nor dropped.
if not holds(K.step, A.token) then return {'fenced', 0} end
local stored = redis.call('LLEN', K.rows)
if A.start > stored then return {'gap', stored} end
local first = stored - A.start + 1
if first <= #A.rows then
  redis.call('RPUSH', K.rows, unpack(A.rows, first))
  stored = stored + #A.rows - first + 1
end
redis.call('HSET', K.step, 'row_count', stored)
if A.state ~= '' then redis.call('HSET', K.step, 'state', A.state) end
extend(K.step, K.schedule, A.member, A.lease_seconds)
return {'ok', stored}
