-- Compare-and-expire. KEYS[1] lease; ARGV[1] value, ARGV[2] ttl_ms. Returns 1 or 0.
if lease_is_current(KEYS[1], ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
