-- Time left until each reservation's slot (µs, -1 when the log no longer has it).
-- KEYS: log. ARGV: ids.
local out = {}
for i, id in ipairs(ARGV) do
  local slot = redis.call('ZSCORE', KEYS[1], id)
  if slot then
    local w = tonumber(slot) - now
    if w < 0 then w = 0 end
    out[i] = s(w)
  else
    out[i] = '-1'
  end
end
return out
