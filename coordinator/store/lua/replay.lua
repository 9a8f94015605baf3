-- Read a channel's retained events after an id, with what is needed to tell
-- whether any event after that id was trimmed away.
-- KEYS[1] stream; ARGV[1] exclusive start id ('ms-seq'), ARGV[2] max entries (0: none)
-- Returns {exists, last_generated_id, first_id, trimmed, entries}:
-- first_id is '' for an empty stream; trimmed is 1 when entries were removed
-- from the head (entries-added > length), 0 when not, -1 on servers before
-- 7.0 (no entries-added).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, '', '', 0, {}}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last_generated, first_id, length, added = '', '', 0, -1
for i = 1, #info, 2 do
  local name = info[i]
  if name == 'last-generated-id' then
    last_generated = info[i + 1]
  elseif name == 'length' then
    length = info[i + 1]
  elseif name == 'entries-added' then
    added = info[i + 1]
  elseif name == 'first-entry' and info[i + 1] then
    first_id = info[i + 1][1]
  end
end
local trimmed = -1
if added >= 0 then
  trimmed = (added > length) and 1 or 0
end
local entries = {}
if tonumber(ARGV[2]) > 0 then
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
end
return {1, last_generated, first_id, trimmed, entries}
