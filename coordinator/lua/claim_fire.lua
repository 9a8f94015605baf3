--! include: lease_lib
-- Claim one scheduled fire "as leader", atomically with the lease check.
-- KEYS[1] lease, KEYS[2] fire claim (job id + scheduled time), KEYS[3] last-fire hash,
-- KEYS[4] run history list
-- ARGV[1] caller's lease value, ARGV[2] job id, ARGV[3] scheduled ms, ARGV[4] claim ttl ms,
-- ARGV[5] claim value (JSON), ARGV[6] "run" or "missed", ARGV[7] history record (JSON,
-- pushed only for "missed"), ARGV[8] history cap
-- Returns {1} claimed; {0} the caller's lease is not current; {-1, last} the fire is
-- already claimed or not newer than the last fire claimed for the job.
if not lease_is_current(KEYS[1], ARGV[1]) then
  return {0}
end
local last = redis.call('HGET', KEYS[3], ARGV[2])
if last and tonumber(last) >= tonumber(ARGV[3]) then
  return {-1, last}
end
if not redis.call('SET', KEYS[2], ARGV[5], 'NX', 'PX', ARGV[4]) then
  return {-1, last or false}
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
if ARGV[6] == 'missed' then
  redis.call('LPUSH', KEYS[4], ARGV[7])
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[8]) - 1)
end
return {1}
