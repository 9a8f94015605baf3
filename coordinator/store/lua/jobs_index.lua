-- Index one runtime job stored before the due-dates index existed (run by a new leader).
-- KEYS[1] runtime jobs hash, KEYS[2] paused set, KEYS[3] due-dates sorted set,
-- KEYS[4] recurring-jobs set
-- ARGV[1] job id, ARGV[2] its definition as read, ARGV[3] the definition to store (with
-- due_ms), ARGV[4] the run_date in ms of a date job, '' for a recurring one
-- Returns 1 indexed; 0 the definition changed since it was read (its change indexed it).
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[4] == '' then
  redis.call('SADD', KEYS[4], ARGV[1])
elseif redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
end
return 1
