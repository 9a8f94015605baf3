-- Shared by every script that acts "as leader": is `value` the current lease?
-- The lease value is immutable for a term and carries its fencing token, so an
-- exact comparison identifies the term.
local function lease_is_current(lease_key, value)
  return redis.call('GET', lease_key) == value
end
