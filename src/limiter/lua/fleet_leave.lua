-- Waiters of this instance leave the fleet line. 'go': past its deadline, a waiter goes
-- if its grant is already on its way; 'back': its caller is gone, and a slot it was
-- granted but never used goes back to the log.
-- KEYS: 1 log, 2-4 the classes' lines, 5 promoted, 6 waiters, 7 tags.
-- ARGV: 1 instance, 2 granted lists' prefix, 3 mode ('go' or 'back'), then ids.
-- Returns per id: 'left' (it was waiting), 'granted' (its grant was in its list, taken
-- out), 'gone' (neither: decided already, the decision on its way).
local lines = {KEYS[2], KEYS[3], KEYS[4]}
local out = {}
for i = 4, #ARGV do
  local m = ARGV[i]
  local v = redis.call('HGET', KEYS[6], m)
  local res = 'gone'
  if v then
    local c, st, tg, cl = string.match(v, '^%S+ %S+ (%S+) (%S+) (%S+) (.*)$')
    if redis.call('GET', KEYS[5]) == m then
      redis.call('DEL', KEYS[5])
    else
      redis.call('ZREM', lines[tonumber(c)], m)
    end
    redis.call('HDEL', KEYS[6], m)
    -- The client's next request takes the turn this one leaves, when it was its last.
    local lk = 'c' .. c .. ':' .. cl
    if tonumber(redis.call('HGET', KEYS[7], lk) or '0') == tonumber(tg) then
      redis.call('HSET', KEYS[7], lk, s(tonumber(tg) - tonumber(st)))
    end
    res = 'left'
  else
    -- Its grant, if it waits in this instance's list: "g <id> <granted at>".
    local list, want = ARGV[2] .. ARGV[1], 'g ' .. m .. ' '
    for _, d in ipairs(redis.call('LRANGE', list, 0, -1)) do
      if d:sub(1, #want) == want then
        redis.call('LREM', list, 1, d)
        res = 'granted'
        break
      end
    end
  end
  if ARGV[3] == 'back' and res ~= 'left' then redis.call('ZREM', KEYS[1], m) end
  out[#out + 1] = res
end
return out
