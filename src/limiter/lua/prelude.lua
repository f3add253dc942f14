-- Prints a Lua number as an exact integer (the default `%.14g` would round µs times),
-- reads Redis `TIME`, and reads the windows: `ARGV[w]` is how many, then a limit and a
-- length (µs) each. Put in front of every script: KEYS none, ARGV where the script says.
local function s(x) return string.format('%.0f', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function windows(w, follow, adopted)
  local out, longest = {}, 0
  for k = 1, tonumber(ARGV[w]) do
    local limit = tonumber(ARGV[w + 2 * k - 1])
    local length = tonumber(ARGV[w + 2 * k])
    if k == follow and adopted and adopted < limit then limit = adopted end
    out[k] = {limit, length}
    if length > longest then longest = length end
  end
  return out, longest
end
-- The start of the log's entry `i` (0-based) in a log of `logged` entries, read from
-- `key` once, or (past them) one `added` in this call.
local function log_entries(key, logged, added)
  local fetched = {}
  return function(i)
    if i >= logged then return added[i - logged + 1] end
    local v = fetched[i]
    if v == nil then
      v = tonumber(redis.call('ZRANGE', key, i, i, 'WITHSCORES')[2])
      fetched[i] = v
    end
    return v
  end
end
-- The earliest slot every window of `ws` allows for the log's entry `n` (read through
-- `entry`) and after the pause, and the window that held it back (0: none).
local function slot_for(n, entry, ws, paused)
  local slot, binding = now, 0
  if paused > slot then slot = paused end
  if n > 0 and entry(n - 1) > slot then slot = entry(n - 1) end
  for k = 1, #ws do
    local limit, length = ws[k][1], ws[k][2]
    if n >= limit then
      local edge = entry(n - limit) + length
      if edge > slot or (edge == slot and binding == 0 and slot > now) then
        slot, binding = edge, k
      end
    end
  end
  return slot, binding
end
