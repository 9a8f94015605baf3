-- Append an event to its channel's capped stream and publish it, atomically.
-- KEYS[1] stream
-- ARGV[1] Pub/Sub channel, ARGV[2] channel name, ARGV[3] event name,
-- ARGV[4] data (compact JSON), ARGV[5] history (MAXLEN ~), ARGV[6] idle TTL in seconds
-- Returns the stream id, which is also the SSE id.
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
  'event', ARGV[3], 'data', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[6])
-- Envelope: version, channel, id, event, data; newline-separated (see events.py).
redis.call('PUBLISH', ARGV[1], '1\n' .. ARGV[2] .. '\n' .. id .. '\n' .. ARGV[3] .. '\n' .. ARGV[4])
return id
