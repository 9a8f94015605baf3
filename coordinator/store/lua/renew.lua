-- Compare-and-expire. KEYS[1] lease, optional KEYS[2] heir; ARGV[1] value, ARGV[2] ttl_ms,
-- with KEYS[2]: ARGV[3] notice channel. Returns 1 or 0.
-- With no heir, the renewal tells followers to take the role ('heir vacant'), so an
-- heir that crashed is replaced within one renew interval.
if lease_is_current(KEYS[1], ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('PUBLISH', ARGV[3], 'heir vacant')
  end
  return 1
end
return 0
