-- Acquire the lease if free, taking the next fencing token; else keep the heir role.
-- KEYS[1] lease, KEYS[2] fencing counter, optional KEYS[3] heir
-- ARGV[1] ttl_ms, ARGV[2] instance_id, ARGV[3] hostname, ARGV[4] pid, ARGV[5] client_id,
-- with KEYS[3]: ARGV[6] this follower's heir value (JSON: instance_id, hostname),
-- ARGV[7] heir ttl_ms, ARGV[8] notice channel
-- The heir is the one follower that checks the holder closely; the others wait for
-- notices. A follower takes the role when it is vacant, or from an heir on the holder's
-- own host when it is on another (so one host's crash does not take both).
-- Returns {1, value} on success; {0, current_value, role} when held by someone, role 1
-- when the caller is (now) the heir, else 0.
local current = redis.call('GET', KEYS[1])
if current then
  if not KEYS[3] then
    return {0, current, 0}
  end
  local heir = redis.call('GET', KEYS[3])
  local take = not heir or heir == ARGV[6]
  if not take then
    local ok_h, h = pcall(cjson.decode, heir)
    local ok_l, l = pcall(cjson.decode, current)
    take = ok_h and ok_l and h.hostname == l.hostname and ARGV[3] ~= l.hostname
  end
  if take then
    redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[7])
    return {0, current, 1}
  end
  return {0, current, 0}
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
if KEYS[3] and redis.call('GET', KEYS[3]) == ARGV[6] then
  -- The heir leads now: the role is vacant, let a follower take it.
  redis.call('DEL', KEYS[3])
  redis.call('PUBLISH', ARGV[8], 'heir vacant')
end
return {1, value}
