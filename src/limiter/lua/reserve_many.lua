-- The reservations of several waiters of this instance, in their order, in one call.
-- Each gets the earliest slot every window allows after the ones before it (and after
-- a pause), or is refused with the slot it would have had and the window that held it
-- back. The log's tail is read once and the grants are appended to it in Lua.
-- KEYS: log, pause, limit. ARGV: followed window (1-based), windows from 2, then how
-- many reservations and an id and a max_wait (µs) each.
-- Returns one whole number per id (exact: Redis answers a Lua number as an integer),
-- read by Granted::of: the wait (µs) when granted, and when refused
-- `-(wait * (windows + 1) + binding window (1-based, 0 for none)) - 1`.
local kept = redis.call('MGET', KEYS[3], KEYS[2])
local adopted = tonumber(kept[1] or 'nil')
local ws, longest = windows(2, tonumber(ARGV[1]), adopted)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', s(now - longest))
local paused = tonumber(kept[2] or '0')
local logged = redis.call('ZCARD', KEYS[1])
local added = {}
local entry = log_entries(KEYS[1], logged, added)
local n = logged
local at = 3 + 2 * #ws
local out, furthest = {}, 0
-- One ZADD for the whole batch; consecutive grants usually share a slot, printed once.
local zadd, printed, text = {}, nil, nil
for j = 1, tonumber(ARGV[at]) do
  local id, max_wait = ARGV[at + 2 * j - 1], tonumber(ARGV[at + 2 * j])
  local slot, binding = slot_for(n, entry, ws, paused)
  if slot > now + max_wait then
    out[#out + 1] = -((slot - now) * (#ws + 1) + binding) - 1
  else
    if slot ~= printed then printed, text = slot, s(slot) end
    zadd[#zadd + 1] = text
    zadd[#zadd + 1] = id
    added[#added + 1] = slot
    n = n + 1
    if slot > furthest then furthest = slot end
    out[#out + 1] = slot - now
  end
end
if #zadd > 0 then redis.call('ZADD', KEYS[1], unpack(zadd)) end
if furthest > 0 then
  redis.call('PEXPIRE', KEYS[1], s(math.ceil((furthest - now + longest) / 1000) + 1000))
end
return out
