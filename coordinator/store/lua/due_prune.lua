-- Drop due-dates index entries that match no pending date job (written outside the
-- library), checked atomically so an entry a concurrent change just wrote is kept.
-- KEYS[1] runtime jobs hash, KEYS[2] due-dates sorted set; ARGV job ids.
-- Returns the number of entries removed.
local removed = 0
for _, id in ipairs(ARGV) do
  local score = redis.call('ZSCORE', KEYS[2], id)
  if score then
    local raw = redis.call('HGET', KEYS[1], id)
    local ok, job = pcall(cjson.decode, raw or '')
    if not raw or not ok or type(job) ~= 'table' or job['due_ms'] ~= tonumber(score) then
      redis.call('ZREM', KEYS[2], id)
      removed = removed + 1
    end
  end
end
return removed
