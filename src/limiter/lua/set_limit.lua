-- A new limit for the followed window, for everyone (or, with limit 0, new windows
-- from a reload and no adopted limit): stored for the reserve script, and slots not yet
-- started laid out again under every window, earlier or later, order kept.
-- KEYS: log, limit, pause. ARGV: limit, followed window (1-based), channel, windows.
local adopted = nil
if ARGV[1] == '0' then
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[1], 'EX', 86400)
  adopted = tonumber(ARGV[1])
end
local ws = windows(4, tonumber(ARGV[2]), adopted)
local paused = tonumber(redis.call('GET', KEYS[3]) or '0')
local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local ids, slots = {}, {}
for i = 1, #all, 2 do
  ids[#ids + 1] = all[i]
  slots[#slots + 1] = tonumber(all[i + 1])
end
local moved = 0
for i = 1, #slots do
  if slots[i] > now then
    local want = now
    if paused > want then want = paused end
    if i > 1 and slots[i - 1] > want then want = slots[i - 1] end
    for k = 1, #ws do
      local limit, length = ws[k][1], ws[k][2]
      if i > limit and slots[i - limit] + length > want then want = slots[i - limit] + length end
    end
    if want ~= slots[i] then
      slots[i] = want
      redis.call('ZADD', KEYS[1], s(want), ids[i])
      moved = 1
    end
  end
end
if moved == 1 then redis.call('PUBLISH', ARGV[3], 'moved') end
return moved
