-- Acquire the lease if free, taking the next fencing token.
-- KEYS[1] lease, KEYS[2] fencing counter
-- ARGV[1] ttl_ms, ARGV[2] instance_id, ARGV[3] hostname, ARGV[4] pid, ARGV[5] client_id
-- Returns {1, value} on success, {0, current_value, pttl} when held by someone.
local current = redis.call('GET', KEYS[1])
if current then
  return {0, current, redis.call('PTTL', KEYS[1])}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if redis.call('EXISTS', KEYS[2]) == 0 then
  -- Seed from the server clock so tokens keep increasing after a restart
  -- that lost every key (milliseconds * 1000 leaves room for 1000 terms/ms).
  redis.call('SET', KEYS[2], string.format('%d', now_ms * 1000))
end
local token = redis.call('INCR', KEYS[2])
local value = cjson.encode({
  instance_id = ARGV[2], hostname = ARGV[3], pid = tonumber(ARGV[4]),
  client_id = tonumber(ARGV[5]), fencing_token = string.format('%d', token),
  acquired_at = now_ms, ttl_ms = tonumber(ARGV[1])
})
redis.call('SET', KEYS[1], value, 'PX', ARGV[1])
return {1, value}
