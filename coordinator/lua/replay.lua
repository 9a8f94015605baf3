-- Read a channel's retained events after an id, with what is needed to tell
-- whether any event after that id was trimmed away.
-- KEYS[1] stream; ARGV[1] exclusive start id ('ms-seq'), ARGV[2] max entries (0: none)
-- Returns {exists, last_generated_id, max_deleted_id, first_id, entries}:
-- max_deleted_id is '' on servers before 7.0 (no such field); first_id is ''
-- for an empty stream.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, '', '', '', {}}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last_generated, max_deleted, first_id = '', '', ''
for i = 1, #info, 2 do
  local name = info[i]
  if name == 'last-generated-id' then
    last_generated = info[i + 1]
  elseif name == 'max-deleted-entry-id' then
    max_deleted = info[i + 1]
  elseif name == 'first-entry' and info[i + 1] then
    first_id = info[i + 1][1]
  end
end
local entries = {}
if tonumber(ARGV[2]) > 0 then
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
end
return {1, last_generated, max_deleted, first_id, entries}
