-- Compare-and-delete, then tell followers to campaign now.
-- KEYS[1] lease; ARGV[1] value, ARGV[2] notice channel, ARGV[3] reason. Returns 1 or 0.
if lease_is_current(KEYS[1], ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
