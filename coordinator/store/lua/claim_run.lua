--! include: lease_lib
-- Claim one "run now" request "as leader", atomically with the lease check. The request
-- is its own claim record (taking it deletes it), so a manual run never touches the
-- job's last-fire field and never holds back a scheduled fire.
-- KEYS[1] lease, KEYS[2] run requests hash
-- ARGV[1] caller's lease value, ARGV[2] request id
-- Returns {1, request JSON} claimed; {0} the caller's lease is not current; {-1} no such
-- request (claimed already, or never made).
if not lease_is_current(KEYS[1], ARGV[1]) then
  return {0}
end
local request = redis.call('HGET', KEYS[2], ARGV[2])
if not request then
  return {-1}
end
redis.call('HDEL', KEYS[2], ARGV[2])
return {1, request}
