-- Is this still the current term? KEYS[1] lease; ARGV[1] value. Returns 1 or 0.
if lease_is_current(KEYS[1], ARGV[1]) then
  return 1
end
return 0
