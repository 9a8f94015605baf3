-- Append an event to its channel's capped stream and publish it, atomically.
-- KEYS[1] stream
-- ARGV[1] legacy namespace Pub/Sub channel, ARGV[2] channel name, ARGV[3] event name,
-- ARGV[4] data (compact JSON), ARGV[5] history (MAXLEN ~), ARGV[6] idle TTL in seconds,
-- ARGV[7] the channel's own Pub/Sub channel, ARGV[8] the current listeners' marker channel,
-- ARGV[9] '1' on Redis Cluster: ARGV[7] is a shard channel in KEYS[1]'s slot (SPUBLISH),
-- and no older version ever listened there (ARGV[1] and ARGV[8] are unused)
-- Returns the stream id, which is also the SSE id.
--
-- Rolling updates: a listener of an older version hears only the namespace channel.
-- Current listeners subscribe to it and to the marker, so the difference counts the
-- older ones; with none (the steady state) nothing is sent there. Counted first, so
-- an error here (an ACL without +pubsub|numsub) writes nothing: a retry cannot
-- duplicate the event.
local sharded = ARGV[9] == '1'
local n = sharded and {'', 0, '', 0} or redis.call('PUBSUB', 'NUMSUB', ARGV[1], ARGV[8])
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
  'event', ARGV[3], 'data', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[6])
-- Envelope: version, channel, id, event, data; newline-separated (see events.py).
local envelope = '1\n' .. ARGV[2] .. '\n' .. id .. '\n' .. ARGV[3] .. '\n' .. ARGV[4]
if sharded then
  redis.call('SPUBLISH', ARGV[7], envelope)
  return id
end
redis.call('PUBLISH', ARGV[7], envelope)
if n[2] > n[4] then
  redis.call('PUBLISH', ARGV[1], envelope)
end
return id
