-- Start a cluster-wide run-once task, or report its state.
-- KEYS[1] once hash; ARGV[1] instance id, ARGV[2] marker ttl ms, ARGV[3] now ms.
-- Returns {"run"} when the caller must run it (the hash now names the caller and
-- expires unless renewed), else {state, instance_id, error, result} as stored.
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  return {state, redis.call('HGET', KEYS[1], 'instance_id') or '',
          redis.call('HGET', KEYS[1], 'error') or '', redis.call('HGET', KEYS[1], 'result') or ''}
end
redis.call('HSET', KEYS[1], 'state', 'running', 'instance_id', ARGV[1], 'started_at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {'run'}
