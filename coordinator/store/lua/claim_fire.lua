--! include: lease_lib
-- Claim one scheduled fire "as leader", atomically with the lease check.
-- A recurring job's claim record is one field: the scheduled time of its last claimed
-- fire, in the last-fire hash. A claim must be strictly later and moves it forward, so no
-- (job id, scheduled time) is ever claimed twice, with O(1) keys per job.
-- A runtime date job's fire (ARGV[7] '1') is claimed by taking its entry in the due-dates
-- sorted set, which must hold exactly this scheduled time, while its definition still has
-- the revision the leader read (ARGV[8]); the definition goes with it, so a date job fires
-- once per time it is added and leaves the job list, and leaves no last-fire field behind.
-- KEYS[1] lease, KEYS[2] last-fire hash, KEYS[3] run history list,
-- optional KEYS[4] paused set, KEYS[5] runtime jobs hash, KEYS[6] due-dates sorted set,
-- KEYS[7] the date job's taken marker (string: "<lease value>|<rev>", for ARGV[9] ms; a
-- claim for a run writes it, so its leader can hand the fire back if it never starts it)
-- ARGV[1] caller's lease value, ARGV[2] job id, ARGV[3] scheduled ms, ARGV[4] "run" or
-- "missed", ARGV[5] history record (JSON, pushed only for "missed"), ARGV[6] history cap,
-- ARGV[7] '1' when this is a runtime date job's one fire, ARGV[8] its definition's rev,
-- ARGV[9] how long (ms) the taken marker lasts.
-- Returns {1} claimed; {0} the caller's lease is not current; {-1, last} the fire is not
-- later than the last fire claimed for the job (already claimed, or overtaken); {-2} the
-- job is paused (the pause holds from the moment it is written, whatever the leader knows);
-- {-3} a date job's fire that is no longer pending at this time (fired, removed, paused,
-- or replaced).
if not lease_is_current(KEYS[1], ARGV[1]) then
  return {0}
end
if KEYS[4] and redis.call('SISMEMBER', KEYS[4], ARGV[2]) == 1 then
  return {-2}
end
if ARGV[7] == '1' then
  local due = redis.call('ZSCORE', KEYS[6], ARGV[2])
  if not due or tonumber(due) ~= tonumber(ARGV[3]) then
    return {-3}
  end
  local ok, job = pcall(cjson.decode, redis.call('HGET', KEYS[5], ARGV[2]) or '')
  if not ok or type(job) ~= 'table' or job['rev'] ~= ARGV[8] then
    return {-3}
  end
  redis.call('ZREM', KEYS[6], ARGV[2])
  redis.call('HDEL', KEYS[5], ARGV[2])
  if ARGV[4] == 'run' and KEYS[7] then
    redis.call('SET', KEYS[7], ARGV[1] .. '|' .. ARGV[8], 'PX', ARGV[9])
  end
else
  local last = redis.call('HGET', KEYS[2], ARGV[2])
  if last and tonumber(last) >= tonumber(ARGV[3]) then
    return {-1, last}
  end
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
end
if ARGV[4] == 'missed' then
  redis.call('LPUSH', KEYS[3], ARGV[5])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
end
return {1}
