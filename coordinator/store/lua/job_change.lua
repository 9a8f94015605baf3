-- Change one runtime job, or ask for a run now, and announce it to the leader, atomically.
-- Any process calls it (the api role too); the leader applies the change on the notice.
-- KEYS[1] runtime jobs hash (id -> definition JSON), KEYS[2] paused set,
-- KEYS[3] run requests hash (request id -> JSON), KEYS[4] due-dates sorted set (date job
-- id -> run_date ms, while pending and not paused), KEYS[5] recurring-jobs set,
-- KEYS[6] the job's taken marker (see claim_fire; any change of the id deletes it)
-- ARGV[1] op: add | replace | remove | pause | resume | run | hand_back
-- ARGV[2] job id, ARGV[3] definition JSON (add, replace) or request JSON (run),
-- ARGV[4] notice channel, ARGV[5] '1' when the caller declares the id in code,
-- ARGV[6] request id (run), ARGV[7] most runtime jobs allowed (add, replace),
-- ARGV[8] the run_date in ms of a date job, '' for a recurring one (add, replace,
-- hand_back), ARGV[9] the taken marker the hand-back expects ("<lease value>|<rev>")
-- hand_back: put back a date job whose claimed fire never started, only while the
-- marker its claim wrote is intact (no change of the id since, no newer claim); it is
-- then marked returned, so a retry of the same hand-back answers {1} again.
-- Returns {1} done; {0} no such job; {-1} the id is taken (add); {-2} the runtime job
-- limit is reached (add, replace of a new id).
-- Notices: 'job:<id>' for a change, 'run:<request id>' for a run request.
local op = ARGV[1]
local id = ARGV[2]
local known = redis.call('HEXISTS', KEYS[1], id) == 1
if op == 'hand_back' then
  local mark = redis.call('GET', KEYS[6])
  if mark == 'returned|' .. ARGV[9] then
    return {1}
  end
  if mark ~= ARGV[9] or known then
    return {0}
  end
  redis.call('SET', KEYS[6], 'returned|' .. ARGV[9], 'KEEPTTL')
  redis.call('HSET', KEYS[1], id, ARGV[3])
  redis.call('SREM', KEYS[2], id)
  redis.call('ZADD', KEYS[4], ARGV[8], id)
  redis.call('SREM', KEYS[5], id)
  redis.call('PUBLISH', ARGV[4], 'job:' .. id)
  return {1}
end
if op ~= 'run' and op ~= 'resume' then
  redis.call('DEL', KEYS[6])  -- the user changed the id: an in-flight fire is not put back
end
if op == 'add' or op == 'replace' then
  if known and op == 'add' then
    return {-1}
  end
  if not known and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[7]) then
    return {-2}
  end
  redis.call('HSET', KEYS[1], id, ARGV[3])
  redis.call('SREM', KEYS[2], id)
  if ARGV[8] ~= '' then
    redis.call('ZADD', KEYS[4], ARGV[8], id)
    redis.call('SREM', KEYS[5], id)
  else
    redis.call('ZREM', KEYS[4], id)
    redis.call('SADD', KEYS[5], id)
  end
  redis.call('PUBLISH', ARGV[4], 'job:' .. id)
  return {1}
end
if op == 'remove' then
  if not known then
    return {0}
  end
  redis.call('HDEL', KEYS[1], id)
  redis.call('SREM', KEYS[2], id)
  redis.call('ZREM', KEYS[4], id)
  redis.call('SREM', KEYS[5], id)
  redis.call('PUBLISH', ARGV[4], 'job:' .. id)
  return {1}
end
if not known and ARGV[5] ~= '1' then
  return {0}
end
if op == 'pause' then
  redis.call('SADD', KEYS[2], id)
  redis.call('ZREM', KEYS[4], id)
elseif op == 'resume' then
  redis.call('SREM', KEYS[2], id)
  if known then
    local due = cjson.decode(redis.call('HGET', KEYS[1], id))['due_ms']
    if type(due) == 'number' then
      redis.call('ZADD', KEYS[4], string.format('%d', due), id)
    end
  end
elseif op == 'run' then
  redis.call('HSET', KEYS[3], ARGV[6], ARGV[3])
  redis.call('PUBLISH', ARGV[4], 'run:' .. ARGV[6])
  return {1}
else
  return redis.error_reply('unknown op ' .. op)
end
redis.call('PUBLISH', ARGV[4], 'job:' .. id)
return {1}
