-- Read the lease with its time left and the server clock, in one round trip.
-- KEYS[1] lease. Returns {value or false, pttl, now_ms}.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1]), now_ms}
