-- Take one open-stream slot of a client, if it has fewer than the limit.
-- KEYS[1] the client's sorted set (member: stream id, score: expiry in ms)
-- ARGV[1] stream id, ARGV[2] limit, ARGV[3] ttl in ms
-- Returns {1, open streams} when taken; {0, open streams, ms until the first expires}
-- when the client is at the limit. Expired members (a crashed holder's) go first.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local open = redis.call('ZCARD', KEYS[1])
if open >= tonumber(ARGV[2]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, open, tonumber(first[2]) - now_ms}
end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, open + 1}
