-- Push forward the expiry of every open stream one process holds (its heartbeat).
-- KEYS: the clients' sorted sets
-- ARGV[1] ttl in ms, then for each key in order: the number of its streams, then their ids
-- Members lost meanwhile (a Redis restart) are added back: they are open streams.
-- Returns the number of streams renewed.
local now = redis.call('TIME')
local expiry = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[1])
local at = 2
local renewed = 0
for i = 1, #KEYS do
  local count = tonumber(ARGV[at])
  for j = 1, count do
    redis.call('ZADD', KEYS[i], expiry, ARGV[at + j])
  end
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
  at = at + count + 1
  renewed = renewed + count
end
return renewed
