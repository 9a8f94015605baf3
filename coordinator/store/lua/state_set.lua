-- Compare-and-set one shared-state key, and announce the change, atomically.
-- KEYS[1] state hash
-- ARGV[1] key, ARGV[2] expected version ('' for none; 0: the key must not exist),
-- ARGV[3] value (compact JSON), ARGV[4] most keys allowed, ARGV[5] Pub/Sub channel,
-- ARGV[6] origin (the writer's instance id, no newline)
-- Returns {1, new version, epoch} on success; {0, current version, epoch} when the
-- expected version is not the current one; {-1, keys held, epoch} when a new key would
-- go over the limit. Stored value: '<version>\n<json>'. Message: '1\n<epoch>\n<origin>\n
-- <key>\n<version>\n<json>'.
local epoch = redis.call('HGET', KEYS[1], '~epoch')
local current = redis.call('HGET', KEYS[1], ARGV[1])
local version = 0
if current then
  version = tonumber(string.match(current, '^(%d+)\n'))
end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= version then
  return {0, version, epoch or ''}
end
if not current then
  local held = redis.call('HLEN', KEYS[1])
  if epoch then held = held - 1 end
  if held >= tonumber(ARGV[4]) then
    return {-1, held, epoch or ''}
  end
end
if not epoch then
  -- A new hash (first write, or the data was lost): a new epoch tells every process
  -- that versions restarted, so it reloads instead of ignoring "older" versions.
  local now = redis.call('TIME')
  epoch = now[1] .. '.' .. now[2]
  redis.call('HSET', KEYS[1], '~epoch', epoch)
end
version = version + 1
local encoded = string.format('%d', version)
redis.call('HSET', KEYS[1], ARGV[1], encoded .. '\n' .. ARGV[3])
redis.call('PUBLISH', ARGV[5],
  '1\n' .. epoch .. '\n' .. ARGV[6] .. '\n' .. ARGV[1] .. '\n' .. encoded .. '\n' .. ARGV[3])
return {1, version, epoch}
