-- Keep a run-once marker alive. KEYS[1] once hash; ARGV[1] instance id, ARGV[2] ttl ms.
-- Returns 1 while the caller still holds the running marker, else 0.
if redis.call('HGET', KEYS[1], 'state') == 'running'
   and redis.call('HGET', KEYS[1], 'instance_id') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
