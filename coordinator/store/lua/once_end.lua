-- Finish a run-once task and wake the waiters.
-- KEYS[1] once hash
-- ARGV[1] instance id, ARGV[2] "done", "failed" or "abandoned" (the marker is deleted so
-- another process runs it), ARGV[3] result (JSON) or error text,
-- ARGV[4] ttl ms of a failed state (a done state never expires), ARGV[5] now ms,
-- ARGV[6] notice channel.
-- Returns 1, or 0 when the caller no longer held the marker (it expired meanwhile).
if redis.call('HGET', KEYS[1], 'state') ~= 'running'
   or redis.call('HGET', KEYS[1], 'instance_id') ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'abandoned' then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[6], ARGV[2])
  return 1
end
local field = 'result'
if ARGV[2] == 'failed' then field = 'error' end
redis.call('HSET', KEYS[1], 'state', ARGV[2], field, ARGV[3], 'finished_at', ARGV[5])
if ARGV[2] == 'failed' then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('PERSIST', KEYS[1])
end
redis.call('PUBLISH', ARGV[6], ARGV[2])
return 1
